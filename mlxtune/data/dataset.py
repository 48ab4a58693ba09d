"""Turn a data path into tokenized train/valid(/test) sets, reporting every choice made on the user's behalf."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxtune.data.formats import Record, find_splits, read_records
from mlxtune.data.template import (
    LengthReport,
    TemplateChoice,
    TokenizedExample,
    choose_template,
    tokenize_records,
)
from mlxtune.errors import UsageError

VALID_FRACTION = 0.1


@dataclass
class Datasets:
    train: list[TokenizedExample]
    valid: list[TokenizedExample]
    test: list[TokenizedExample]
    kind: str  # chat | completion | text
    template: TemplateChoice
    notes: list[str] = field(default_factory=list)  # what we decided for the user, to print


def split_validation(records: list[Record], seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a fixed-seed 10% (at least one record) for validation."""
    if len(records) < 2:
        return records, []
    order = np.random.default_rng(seed).permutation(len(records))
    n_valid = max(1, int(round(len(records) * VALID_FRACTION)))
    valid_ids = set(order[:n_valid].tolist())
    train = [r for i, r in enumerate(records) if i not in valid_ids]
    valid = [r for i, r in enumerate(records) if i in valid_ids]
    return train, valid


def _length_note(split: str, report: LengthReport, max_seq_length: int) -> list[str]:
    notes = []
    if report.truncated:
        notes.append(
            f"{split}: {report.truncated} examples longer than {max_seq_length} tokens were truncated "
            f"(longest {report.longest}); {report.supervised_tokens_lost} supervised tokens lost"
        )
    if report.dropped:
        notes.append(f"{split}: {report.dropped} examples dropped (nothing left to learn after truncation)")
    return notes


def load_datasets(
    data: str | Path,
    tokenizer,
    *,
    max_seq_length: int = 2048,
    train_on_prompt: bool = False,
    chat_template: str | None = None,
    seed: int = 0,
) -> Datasets:
    files = find_splits(data)
    records = {split: read_records(path) for split, path in files.items()}
    notes = []
    if "valid" not in records:
        records["train"], records["valid"] = split_validation(records["train"], seed)
        if records["valid"]:
            notes.append(
                f"no validation file: held out {len(records['valid'])} of "
                f"{len(records['train']) + len(records['valid'])} records from {files['train'].name} (seed {seed})"
            )
        else:
            notes.append("only one record: training without a validation set")
    kinds = {split: recs[0].kind for split, recs in records.items() if recs}
    if len(set(kinds.values())) > 1:
        detail = ", ".join(f"{split}={kind}" for split, kind in kinds.items())
        raise UsageError(f"the splits use different formats ({detail})", "use one format for train, valid and test")
    kind = kinds["train"]
    template = choose_template(tokenizer, kind, chat_template)
    if template.origin == "fallback":
        notes.append("the model has no chat template: using mlxtune's fallback template (### User: / ### Assistant:)")
    tokenized = {}
    for split in ("train", "valid", "test"):
        examples, report = tokenize_records(
            records.get(split, []), tokenizer, template.template, train_on_prompt, max_seq_length
        )
        notes.extend(_length_note(split, report, max_seq_length))
        tokenized[split] = examples
    if not tokenized["train"]:
        raise UsageError(f"no usable training examples in {files['train']}", "check --max-seq-length and the data")
    return Datasets(tokenized["train"], tokenized["valid"], tokenized["test"], kind, template, notes)
