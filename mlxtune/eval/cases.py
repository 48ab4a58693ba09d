"""What an evaluation runs on: each held-out record as tokens with its supervised mask (for the loss) and, where
the data has one, a prompt and a reference answer (for generation and task metrics).

- prompt/completion: the prompt rendered as a user turn with the run's template; the completion is the reference.
- chat: everything before the last assistant reply is the prompt; that reply is the reference.
- plain text: when a record has several lines, the last line is the reference and the lines before it the prompt
  (question/answer text such as WikiSQL's `Q: … / A: …`); single-line records give a loss only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlxtune.data.dataset import record_fingerprint, scored_split
from mlxtune.data.formats import Record, dataset_kind
from mlxtune.data.template import TokenizedExample, tokenize_records
from mlxtune.errors import UsageError
from mlxtune.runs import Run


@dataclass
class Case:
    example: TokenizedExample  # tokens + supervised mask, exactly as training tokenized them
    prompt: str | None  # what generation starts from (display text)
    messages: list[dict] | None  # the prompt as chat messages (None for plain text)
    reference: str | None


@dataclass
class EvalData:
    cases: list[Case]
    kind: str
    path: str
    split: str  # test | valid | held-out validation | file
    skipped: int  # records that tokenized to nothing to score (e.g. truncated away)
    trained_on: list[str] | None  # sources of scored records the run trained on (same content); None: not checked


def _prompt_and_reference(record: Record) -> tuple[str | None, list[dict] | None, str | None]:
    if record.kind == "completion":
        return record.prompt, [{"role": "user", "content": record.prompt}], record.completion
    if record.kind == "chat":
        last = max((i for i, m in enumerate(record.messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None, None, None
        before = record.messages[:last]
        return before[-1]["content"] if before else "", before, record.messages[last]["content"]
    lines = record.text.rstrip("\n").split("\n")
    if len(lines) < 2 or not lines[-1].strip():
        return None, None, None
    return "\n".join(lines[:-1]) + "\n", None, lines[-1]


def load_cases(run: Run, tokenizer, template: str | None, data: str | Path | None = None,
               limit: int | None = None) -> EvalData:
    """The evaluation cases from `data` (a file, or a directory: its test split, else valid), by default the run's
    own data, split as training split it: a single training file gives the records training held out (same seed)."""
    settings = run.settings
    chosen = scored_split(data, settings.data, settings.seed, settings.record_keys)
    file, records = chosen.file, chosen.records
    if not records:
        raise UsageError(f"{file} has one record: nothing held out to evaluate on",
                         "give --data a file or a directory with test.jsonl")
    if limit:
        records = records[:limit]
    kind = dataset_kind(records)
    if (kind == "text") != (run.data_kind == "text"):
        raise UsageError(f"the run was trained on {run.data_kind} data but {file} holds {kind} records",
                         "evaluate on data of the format the run was trained on")
    trained = None if chosen.trained is None else {record_fingerprint(r) for r in chosen.trained}
    cases, skipped, trained_on = [], 0, []
    for record in records:
        examples, _ = tokenize_records([record], tokenizer, template, settings.train_on_prompt,
                                       settings.max_seq_length, settings.drop_long)
        if not examples:
            skipped += 1
            continue
        prompt, messages, reference = _prompt_and_reference(record)
        cases.append(Case(examples[0], prompt, messages, reference))
        if trained is not None and record_fingerprint(record) in trained:
            trained_on.append(record.source)
    if not cases:
        raise UsageError(f"no example of {file} has supervised tokens to score", "check --max-seq-length and the data")
    return EvalData(cases, kind, str(file), chosen.split, skipped, None if trained is None else trained_on)
