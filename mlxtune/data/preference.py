"""Preference pairs: read the shapes people have, normalise them to (prompt, chosen, rejected) conversations,
and tokenize each side with the supervision mask on the answer only.

Shapes understood (one per file):
- `{"prompt": str, "chosen": str, "rejected": str}` (optional "system");
- TRL conversational: `chosen`/`rejected` message lists, with a shared `prompt` message list or without one
  (the prompt is then the messages both lists share, up to the last assistant turn);
- Anthropic HH: `chosen`/`rejected` full "\\n\\nHuman: … \\n\\nAssistant: …" transcripts sharing a prefix;
- LLaMA-Factory ranking: alpaca `instruction`/`input` with `chosen`/`rejected` strings (or `output: [chosen,
  rejected]`), and sharegpt `conversations` (or `messages`) with `chosen`/`rejected` message objects.

Both answers are rendered with the same chat template as supervised training, so a preference run after an SFT
run sees the format the SFT run learned.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxtune.data.dataset import hold_out_validation
# _raw_rows: formats.py's file reader (JSONL/JSON/CSV/Parquet with real file:line), shared rather than duplicated
from mlxtune.data.formats import (PAIRED, PREFERENCE_DESCRIPTION, ROLE_ALIASES, UNPAIRED, Record, RecordError,
                                   _raw_rows, detect_preference, find_splits)
from mlxtune.data.template import TemplateChoice, TokenizedExample, choose_template, tokenize_record
from mlxtune.errors import UsageError

PREFERENCE_KEYS = ("chosen", "rejected")
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclass
class PreferenceRecord:
    source: str  # file:line
    prompt: list[dict[str, Any]]  # the conversation before the answers
    chosen: list[dict[str, Any]]  # the preferred continuation (assistant turns)
    rejected: list[dict[str, Any]]
    shape: str  # "prompt/chosen/rejected" | "conversational" | "hh" | "llamafactory"

    @property
    def identical(self) -> bool:
        return self.chosen == self.rejected


@dataclass
class PreferenceExample:
    """One tokenized pair; batching sees its length as the longer side."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    source: str

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha1(self.chosen.ids.tobytes())
        digest.update(b"|")
        digest.update(self.rejected.ids.tobytes())
        return digest.hexdigest()


def is_preference_row(row: Any) -> bool:
    """True for a decoded row in one of the preference shapes (chosen + rejected, or LLaMA-Factory's output pair)."""
    if not isinstance(row, dict):
        return False
    if detect_preference(row) == PAIRED:
        return True
    output = row.get("output")
    return "instruction" in row and isinstance(output, list) and len(output) == 2


def _text(value: Any, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise RecordError(where, f"{key!r} must be text here, got {type(value).__name__}",
                     "give a string, or message lists for prompt, chosen and rejected")


def _message(item: Any, where: str, what: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise RecordError(where, f"{what} is not a message object", "each message is {role, content}")
    role_value = item.get("role", item.get("from", ""))
    role = ROLE_ALIASES.get(str(role_value).lower())
    if role is None:
        raise RecordError(where, f"{what} has unknown role {role_value!r}", "use system, user, assistant or tool")
    content = item.get("content", item.get("value"))
    message: dict[str, Any] = {"role": role, "content": "" if content is None else _text(content, where, what)}
    if item.get("tool_calls"):
        message["tool_calls"] = item["tool_calls"]
    return message


def _messages(value: Any, where: str, key: str) -> list[dict[str, Any]]:
    if isinstance(value, dict):  # LLaMA-Factory sharegpt: one message object
        value = [value]
    if not isinstance(value, list):
        raise RecordError(where, f"{key!r} must be a message list", "use [{role, content}, ...]")
    return [_message(item, where, f"{key} message {n}") for n, item in enumerate(value, start=1)]


def _hh_messages(text: str) -> list[dict[str, Any]] | None:
    """An Anthropic HH transcript as messages; None when the text has no Human/Assistant turns."""
    text = text if text.startswith("\n\n") else "\n\n" + text
    pieces = HH_TURN.split(text)
    if len(pieces) < 3 or pieces[0].strip():
        return None
    return [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
            for speaker, content in zip(pieces[1::2], pieces[2::2])]


def _split_shared_prefix(chosen: list[dict], rejected: list[dict], where: str):
    """(prompt, chosen answer, rejected answer): the shared messages up to the last assistant turn are the prompt."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # the prompt ends before the last assistant turn of either side
    last_assistant = max((i for i, m in enumerate(chosen) if m["role"] == "assistant"), default=-1)
    cut = min(shared, last_assistant if last_assistant >= 0 else shared)
    if cut == len(chosen) == len(rejected):  # identical transcripts
        cut = last_assistant if last_assistant >= 0 else cut
    prompt, chosen_answer, rejected_answer = chosen[:cut], chosen[cut:], rejected[cut:]
    for name, answer in (("chosen", chosen_answer), ("rejected", rejected_answer)):
        if not answer or answer[0]["role"] != "assistant":
            raise RecordError(where, f"chosen and rejected differ before their last assistant turn",
                             "the two transcripts must share everything up to the answer being compared")
    return prompt, chosen_answer, rejected_answer


def _system(row: dict, where: str) -> list[dict[str, Any]]:
    system = row.get("system")
    return [{"role": "system", "content": _text(system, where, "system")}] if system else []


def parse_preference(row: Any, where: str) -> PreferenceRecord:
    """Normalise one decoded row; prompt-only and malformed records raise UsageError naming file:line."""
    if not isinstance(row, dict):
        raise RecordError(where, f"expected a JSON object, got {type(row).__name__}", "one object per line")
    if "instruction" in row and isinstance(row.get("output"), list) and "chosen" not in row:
        if len(row["output"]) != 2:
            raise RecordError(where, f"'output' must hold two answers [chosen, rejected]",
                             "LLaMA-Factory ranking data lists the better answer first")
        row = {**row, "chosen": row["output"][0], "rejected": row["output"][1]}
    missing = [key for key in PREFERENCE_KEYS if key not in row or row[key] in (None, "", [])]
    if missing and detect_preference(row) == UNPAIRED:  # KTO: said as `lora` says it
        raise RecordError(where, PREFERENCE_DESCRIPTION[UNPAIRED][0], PREFERENCE_DESCRIPTION[UNPAIRED][1])
    if missing:
        if any(key in row for key in ("prompt", "instruction", "messages", "conversations")):
            raise RecordError(where, f"prompt-only record (no {' or '.join(missing)})",
                             "preference training needs a chosen and a rejected answer for every prompt")
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise RecordError(where, f"not a preference record (keys: {keys})",
                         "use prompt+chosen+rejected, chosen/rejected message lists, or HH transcripts")
    chosen, rejected = row["chosen"], row["rejected"]
    conversation = row.get("conversations", row.get("messages"))
    if "instruction" in row:  # LLaMA-Factory alpaca ranking
        prompt = _text(row["instruction"], where, "instruction")
        if row.get("input"):
            prompt = f"{prompt}\n\n{_text(row['input'], where, 'input')}"
        return _strings(_system(row, where) + [{"role": "user", "content": prompt}], chosen, rejected, where,
                        "llamafactory")
    if conversation is not None:  # LLaMA-Factory sharegpt ranking: the conversation is the prompt
        prompt = _system(row, where) + _messages(conversation, where, "conversations")
        return _finish(prompt, _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected"), where,
                       "llamafactory")
    if "prompt" in row:
        if isinstance(row["prompt"], list):  # TRL conversational with explicit prompt
            return _finish(_system(row, where) + _messages(row["prompt"], where, "prompt"),
                           _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected"), where,
                           "conversational")
        prompt = _system(row, where) + [{"role": "user", "content": _text(row["prompt"], where, "prompt")}]
        return _strings(prompt, chosen, rejected, where, "prompt/chosen/rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):  # TRL conversational, implicit prompt
        prompt, chosen_answer, rejected_answer = _split_shared_prefix(
            _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected"), where)
        return _finish(_system(row, where) + prompt, chosen_answer, rejected_answer, where, "conversational")
    if isinstance(chosen, str) and isinstance(rejected, str):
        chosen_messages, rejected_messages = _hh_messages(chosen), _hh_messages(rejected)
        if chosen_messages is None or rejected_messages is None:
            raise RecordError(where, f"chosen/rejected strings without a prompt",
                             "add a 'prompt' field, or give full Human:/Assistant: transcripts (Anthropic HH)")
        prompt, chosen_answer, rejected_answer = _split_shared_prefix(chosen_messages, rejected_messages, where)
        return _finish(prompt, chosen_answer, rejected_answer, where, "hh")
    raise RecordError(where, f"chosen and rejected must both be strings or both message lists",
                     "use the same shape for both answers")


def _strings(prompt, chosen, rejected, where, shape) -> PreferenceRecord:
    answers = []
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, (list, dict)) and not _is_text_parts(value):
            answers.append(_messages(value, where, key))
        else:
            answers.append([{"role": "assistant", "content": _text(value, where, key)}])
    return _finish(prompt, answers[0], answers[1], where, shape)


def _is_text_parts(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(p, dict) and p.get("type") == "text"
                                                           for p in value)


def _finish(prompt, chosen, rejected, where, shape) -> PreferenceRecord:
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in answer):
            raise RecordError(where, f"empty {key} answer", "every pair needs two non-empty answers")
    if not any(m["role"] == "user" for m in prompt):
        raise RecordError(where, f"no user turn before the answers", "give the prompt the answers respond to")
    return PreferenceRecord(where, prompt, chosen, rejected, shape)


def read_preference_records(path: str | Path, problems: list[UsageError] | None = None) -> list[PreferenceRecord]:
    """All pairs of one file; with `problems`, bad records are collected there instead of raising."""
    records = []
    for where, row in _raw_rows(Path(path)):
        try:
            if isinstance(row, UsageError):
                raise row
            records.append(parse_preference(row, where))
        except UsageError as error:
            if problems is None:
                raise
            problems.append(error)
    return records


def tokenize_pair(record: PreferenceRecord, tokenizer, template: str) -> PreferenceExample:
    """Both sides rendered with the prompt; only the answer's assistant turns are supervised (scored)."""
    sides = []
    for answer in (record.chosen, record.rejected):
        chat = Record("chat", record.source, messages=record.prompt + answer,
                      trained=[False] * len(record.prompt) + [m["role"] == "assistant" for m in answer])
        sides.append(tokenize_record(chat, tokenizer, template, False))
    return PreferenceExample(sides[0], sides[1], record.source)


@dataclass
class PreferenceSets:
    train: list[PreferenceExample]
    valid: list[PreferenceExample]
    test: list[PreferenceExample]
    template: TemplateChoice
    shape: str
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    kind: str = "chat"  # what inference on the run renders with


def _truncate(example: TokenizedExample, limit: int) -> TokenizedExample:
    if len(example) <= limit:
        return example
    return TokenizedExample(example.ids[:limit], example.supervised[:limit], example.source)


def fit_pair(pair: PreferenceExample, max_seq_length: int) -> PreferenceExample | None:
    """The pair cut to `max_seq_length` tokens; None when the cut leaves either side no answer token (dropped)."""
    if len(pair) > max_seq_length:
        pair = PreferenceExample(_truncate(pair.chosen, max_seq_length), _truncate(pair.rejected, max_seq_length),
                                 pair.source)
    return pair if pair.chosen.supervised.any() and pair.rejected.supervised.any() else None


def dropped_note(split: str, sources: list[str], max_seq_length: int) -> str:
    """Which pairs truncation empties, by file:line (training drops them; `data check` predicts the same)."""
    return (f"{split}: {len(sources)} pairs dropped (truncation to {max_seq_length} tokens left no answer): "
            + bad_places(sources))


def bad_places(sources: list[str]) -> str:
    """file:line, :line, :line — a file named once."""
    file = sources[0].rsplit(":", 1)[0] if ":" in sources[0] else ""
    return ", ".join([sources[0]] + [p[len(file):] if file and p.startswith(file + ":") else p for p in sources[1:]])


@dataclass
class PreferenceSplits:
    """The records of every split, before tokenization."""

    records: dict[str, list[PreferenceRecord]]
    files: dict[str, Path]
    notes: list[str] = field(default_factory=list)


def bad_records_summary(errors: list[UsageError]) -> str:
    """Every bad record in one line, grouped by what is wrong: "empty chosen answer: pairs.jsonl:12, :57, :300"."""
    groups: dict[str, list[str]] = {}
    for error in errors:
        where, detail = (error.where, error.detail) if isinstance(error, RecordError) else ("", error.message)
        groups.setdefault(detail, []).append(where)
    return "; ".join(f"{detail} ({bad_places(places)})" if places[0] else detail for detail, places in groups.items())


def read_preference_splits(data: str | Path, seed: int = 0, problems: list[UsageError] | None = None,
                           skip_invalid: bool = False) -> PreferenceSplits:
    """Read every split (a fixed-seed 10% of train held out when there is no validation file).

    Every bad record is found before anything is refused: with `problems` they are collected there; otherwise all of
    them are named in one error, or with `skip_invalid` left out and named in a note."""
    files = find_splits(data)
    collected: list[UsageError] = [] if problems is None else problems
    records = {split: read_preference_records(path, collected) for split, path in files.items()}
    notes = []
    if problems is None and collected:
        summary = f"{len(collected):,} bad preference record(s): {bad_records_summary(collected)}"
        if not skip_invalid:
            raise UsageError(summary, "fix them, or pass --skip-invalid to train without them")
        notes.append(f"--skip-invalid: left out {summary}")
    notes += hold_out_validation(records, files["train"], seed, "pairs")
    return PreferenceSplits(records, files, notes)


def tokenize_preference_splits(splits: PreferenceSplits, tokenizer, *, max_seq_length: int = 2048,
                               chat_template: str | None = None) -> PreferenceSets:
    """Tokenize every split; identical pairs and pairs truncated to nothing are dropped (noted)."""
    records, notes = splits.records, list(splits.notes)
    template = choose_template(tokenizer, "chat", chat_template)
    if template.origin == "fallback":
        notes.append("the model has no chat template: using mlxtune's fallback template (### User: / ### Assistant:)")
    tokenized: dict[str, list[PreferenceExample]] = {}
    for split in ("train", "valid", "test"):
        kept, identical, truncated, emptied = [], 0, 0, []
        for record in records.get(split, []):
            if record.identical:
                identical += 1
                continue
            pair = tokenize_pair(record, tokenizer, template.template)
            truncated += len(pair) > max_seq_length
            fitted = fit_pair(pair, max_seq_length)
            if fitted is None:
                emptied.append(pair.source)
                continue
            kept.append(fitted)
        if identical:
            notes.append(f"{split}: {identical} pairs with identical chosen and rejected answers skipped")
        if truncated:
            notes.append(f"{split}: {truncated} pairs longer than {max_seq_length} tokens truncated")
        if emptied:
            notes.append(dropped_note(split, emptied, max_seq_length))
        tokenized[split] = kept
    if not tokenized["train"]:
        raise UsageError(f"no usable preference pairs in {splits.files['train']}",
                         "check the data and --max-seq-length")
    shapes = sorted({r.shape for recs in records.values() for r in recs})
    return PreferenceSets(tokenized["train"], tokenized["valid"], tokenized["test"], template, ", ".join(shapes),
                          notes, {k: str(v) for k, v in splits.files.items()})


def load_preference_sets(data: str | Path, tokenizer, *, max_seq_length: int = 2048, chat_template: str | None = None,
                         seed: int = 0, skip_invalid: bool = False) -> PreferenceSets:
    """Read, check and tokenize every split."""
    return tokenize_preference_splits(read_preference_splits(data, seed, skip_invalid=skip_invalid), tokenizer,
                                      max_seq_length=max_seq_length, chat_template=chat_template)


def chosen_examples(data: str | Path, tokenizer, chat_template: str | None = None, seed: int = 0
                    ) -> list[TokenizedExample]:
    """The chosen sides of the validation pairs (training pairs without any): what a preference run's model should
    now say, for checks that compare models on ordinary examples (fuse's verification)."""
    sets = load_preference_sets(data, tokenizer, chat_template=chat_template, seed=seed)
    return [pair.chosen for pair in (sets.valid or sets.train)]
