"""Prompt-only records for reinforcement learning (GRPO): a prompt to sample from, and the other fields of the
record, which the reward functions receive by name (TRL's dataset convention).

One record per line: `{"prompt": "What is 7 × 6?", "answer": "42"}`, or a message list as the prompt
(`{"prompt": [{"role": "system", …}, {"role": "user", …}], "answer": …}`), optionally with a `system` string.
Another field can hold the prompt (`prompt_key="question"` reads GSM8K as is; its `answer` is then a field).
The prompt is rendered with the model's chat template and the generation prompt (the assistant turn's opening).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxtune.data.dataset import hold_out_validation
# _raw_rows / _messages: formats.py's file reader (real file:line) and message normaliser, shared, not duplicated
from mlxtune.data.formats import RecordError, _messages, _raw_rows, detect_preference, find_splits
from mlxtune.data.preference_check import PreferenceFacts as DataFacts, SplitFacts
from mlxtune.data.template import choose_template, render_chat
from mlxtune.errors import UsageError

PROMPT_KEY = "prompt"
ANSWER_KEYS = ("completion", "chosen", "rejected", "messages", "conversations")  # present: not prompt-only data


@dataclass
class PromptRecord:
    source: str  # file:line
    prompt: str | list[dict[str, Any]]  # as the rewards receive it (TRL: text, or the message list)
    messages: list[dict[str, Any]]  # the conversation rendered for the model
    fields: dict[str, Any]  # every other field of the record, passed to the rewards by name

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def is_prompt_only_row(row: Any, prompt_key: str = PROMPT_KEY) -> bool:
    """A decoded row with a prompt and nothing a supervised or preference record would have."""
    return (isinstance(row, dict) and prompt_key in row and detect_preference(row) is None
            and not any(key in row for key in ANSWER_KEYS))


def parse_prompt_record(row: Any, where: str, prompt_key: str = PROMPT_KEY) -> PromptRecord:
    if not isinstance(row, dict):
        raise RecordError(where, f"expected a JSON object, got {type(row).__name__}", "one object per line")
    if prompt_key not in row:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise RecordError(where, f"no {prompt_key!r} field (keys: {keys})",
                          'RL data is one {"prompt": …, "answer": …} per line; name the prompt\'s field with '
                          "--prompt-key")
    prompt, system = row[prompt_key], row.get("system")
    fields = {k: v for k, v in row.items() if k != prompt_key}
    if system is not None and not isinstance(system, str):
        raise RecordError(where, f"'system' must be text, got {type(system).__name__}", "give a string")
    head = [{"role": "system", "content": system}] if system else []
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RecordError(where, f"empty {prompt_key!r}", "every record needs a prompt to sample answers for")
        return PromptRecord(where, prompt, head + [{"role": "user", "content": prompt}], fields)
    if isinstance(prompt, list):
        messages, _ = _messages(prompt, where, prompt_key)
        if messages[-1]["role"] == "assistant":
            raise RecordError(where, f"{prompt_key!r} ends with an assistant turn",
                              "the prompt is what comes before the answer: end it with the user's turn")
        if not any(m["role"] == "user" for m in messages):
            raise RecordError(where, f"{prompt_key!r} has no user turn", "add the user's question")
        return PromptRecord(where, prompt, head + messages, fields)
    raise RecordError(where, f"{prompt_key!r} must be text or a message list, got {type(prompt).__name__}",
                      'write "prompt": "…" or "prompt": [{"role": "user", "content": "…"}]')


def read_prompt_records(path: str | Path, problems: list[UsageError] | None = None,
                        prompt_key: str = PROMPT_KEY) -> list[PromptRecord]:
    """All records of one file; with `problems`, bad records are collected there instead of raising."""
    records = []
    for where, row in _raw_rows(Path(path)):
        try:
            if isinstance(row, UsageError):
                raise row
            records.append(parse_prompt_record(row, where, prompt_key))
        except UsageError as error:
            if problems is None:
                raise
            problems.append(error)
    return records


def is_prompt_only_data(files: dict[str, Path], prompt_key: str = PROMPT_KEY) -> bool:
    """True when the training file's first readable record is prompt-only."""
    try:
        rows = _raw_rows(files["train"])
    except UsageError:
        return False
    first = next((row for _, row in rows if not isinstance(row, UsageError)), None)
    return is_prompt_only_row(first, prompt_key)


def read_prompt_splits(data: str | Path, seed: int = 0, problems: list[UsageError] | None = None,
                       prompt_key: str = PROMPT_KEY) -> tuple[dict[str, list[PromptRecord]], list[str]]:
    """Every split's records and notes (a fixed-seed 10% of train held out when there is no validation file).

    Without `problems`, the first bad record raises its one-line error."""
    files = find_splits(data)
    records = {split: read_prompt_records(path, problems, prompt_key) for split, path in files.items()}
    notes = hold_out_validation(records, files["train"], seed, "prompts")
    return records, notes


def prompt_ids(record: PromptRecord, tokenizer, template: str) -> list[int]:
    """The prompt rendered with the chat template, ending where the assistant's answer begins, as token ids."""
    rendered = render_chat(tokenizer, record.messages, template, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    # templates write their own BOS; the tokenizer must not add a second one
    return list(tokenizer.encode(rendered, add_special_tokens=not (bos and rendered.startswith(bos))))


# ---------------------------------------------------------------------------------------------------------------
# What `data check` reports


def _fingerprint(record: PromptRecord) -> str:
    return hashlib.sha1(repr(record.messages).encode()).hexdigest()


def prompt_facts(path: str | Path, model: str | Path | None = None, *, chat_template: str | None = None,
                 seed: int = 0) -> DataFacts:
    files = find_splits(path)
    facts = DataFacts("tokens" if model else "characters")
    records, facts.notes = read_prompt_splits(path, seed, facts.problems)
    tokenizer = template = None
    if model is not None:
        from mlx_lm.utils import load_tokenizer

        from mlxtune.models import resolve_model

        tokenizer = load_tokenizer(resolve_model(model))
        choice = choose_template(tokenizer, "chat", chat_template)
        template, facts.template = choice.template, choice.origin
    prints: dict[str, set[str]] = {}
    for split, recs in records.items():
        if not recs:
            continue
        lengths = ([len(prompt_ids(r, tokenizer, template)) for r in recs] if tokenizer is not None
                   else [sum(len(m["content"]) for m in r.messages) for r in recs])
        fingerprints = [_fingerprint(r) for r in recs]
        prints[split] = set(fingerprints)
        file = files.get(split)
        shapes = sorted({"prompt (messages)" if r.conversational else "prompt (text)" for r in recs})
        facts.splits.append(SplitFacts(split, str(file) if file else None, len(recs), lengths, None,
                                       sum(c - 1 for c in Counter(fingerprints).values()), 0,
                                       None if file else str(files["train"]), ", ".join(shapes)))
    facts.overlap_train_valid = len(prints.get("train", set()) & prints.get("valid", set()))
    columns = sorted({k for recs in records.values() for r in recs for k in r.fields})
    total = sum(len(r) for r in records.values())
    facts.notes.insert(0, f"{total} prompt-only records (for reinforcement learning, GRPO); fields passed to the "
                          f"rewards: {', '.join(columns) or 'none'}; lengths are the rendered prompt")
    return facts
