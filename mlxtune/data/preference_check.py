"""What `mlxtune data check` reports about preference pairs: pairs per split, lengths, identical chosen/rejected,
prompt-only and malformed records (problems with file:line), duplicates and train/valid overlap.

Plain values; data/check.py turns them into its report (this module sits below it).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mlxtune.data.formats import find_splits
from mlxtune.data.preference import (
    PreferenceRecord,
    dropped_note,
    fit_pair,
    is_preference_row,
    read_preference_splits,
    tokenize_pair,
)
from mlxtune.data.quality import DataWarning
from mlxtune.data.template import TokenizedExample, choose_template
from mlxtune.errors import UsageError


def is_preference_data(files: dict[str, Path]) -> bool:
    """True when the training file's first readable record is a preference pair."""
    from mlxtune.data.formats import _raw_rows

    try:
        rows = _raw_rows(files["train"])
    except UsageError:
        return False
    first = next((row for _, row in rows if not isinstance(row, UsageError)), None)
    return is_preference_row(first)


def _chars(record: PreferenceRecord) -> int:
    prompt = sum(len(m["content"]) for m in record.prompt)
    return prompt + max(sum(len(m["content"]) for m in side) for side in (record.chosen, record.rejected))


def _fingerprint(record: PreferenceRecord) -> str:
    return hashlib.sha1(repr((record.prompt, record.chosen, record.rejected)).encode()).hexdigest()


@dataclass
class SplitFacts:
    split: str
    file: str | None
    records: int
    lengths: list[int]  # prompt + the longer answer, in tokens (characters without a model)
    supervised_share: float | None  # answer tokens / all tokens
    duplicates: int
    over_max_length: int
    held_out_from: str | None
    convention: str


@dataclass
class PreferenceFacts:
    unit: str
    problems: list[UsageError] = field(default_factory=list)
    warnings: list[DataWarning] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    splits: list[SplitFacts] = field(default_factory=list)
    overlap_train_valid: int = 0
    template: str | None = None
    shown: list[tuple[str, TokenizedExample]] = field(default_factory=list)  # (label, example) for --show
    tokenizer: object = None


def preference_facts(path: str | Path, model: str | Path | None = None, *, show: int = 0,
                     max_seq_length: int = 2048, chat_template: str | None = None, seed: int = 0) -> PreferenceFacts:
    files = find_splits(path)
    facts = PreferenceFacts("tokens" if model else "characters")
    splits = read_preference_splits(path, seed, facts.problems)
    facts.notes = list(splits.notes)
    template = None
    if model is not None:
        from mlx_lm.utils import load_tokenizer

        from mlxtune.models import resolve_model

        facts.tokenizer = load_tokenizer(resolve_model(model))
        choice = choose_template(facts.tokenizer, "chat", chat_template)
        template, facts.template = choice.template, choice.origin

    prints: dict[str, set[str]] = {}
    for split, records in splits.records.items():
        if not records:
            continue
        facts.warnings += [DataWarning("identical-pair", r.source, "chosen and rejected are identical: the pair "
                                                                   "teaches nothing (skipped in training)")
                           for r in records if r.identical]
        share, over = None, 0
        if facts.tokenizer is not None:
            pairs = [tokenize_pair(r, facts.tokenizer, template) for r in records]
            lengths = [len(p) for p in pairs]
            tokens = sum(len(p.chosen) + len(p.rejected) for p in pairs)
            share = sum(int(p.chosen.supervised.sum() + p.rejected.supervised.sum()) for p in pairs) / max(tokens, 1)
            over = sum(1 for n in lengths if n > max_seq_length)
            dropped = [p.source for p in pairs if len(p) > max_seq_length and fit_pair(p, max_seq_length) is None]
            if dropped:  # what training will drop, predicted by the same cut
                facts.warnings.append(DataWarning("dropped-by-truncation", str(files.get(split, files["train"])),
                                                  dropped_note(split, dropped, max_seq_length)))
            if over:
                facts.warnings.append(DataWarning(
                    "too-long", str(files.get(split, files["train"])),
                    f"{over} pairs longer than {max_seq_length} tokens (truncated in training; the end of the "
                    "answers is lost)"))
            if split == "train":
                for pair in pairs[:show]:
                    facts.shown += [(f"{pair.source} (chosen)", pair.chosen), (f"{pair.source} (rejected)",
                                                                              pair.rejected)]
        else:
            lengths = [_chars(r) for r in records]
        fingerprints = [_fingerprint(r) for r in records]
        prints[split] = set(fingerprints)
        file = files.get(split)
        facts.splits.append(SplitFacts(split, str(file) if file else None, len(records), lengths, share,
                                       sum(c - 1 for c in Counter(fingerprints).values()), over,
                                       None if file else str(files["train"]),
                                       ", ".join(sorted({r.shape for r in records}))))
    facts.overlap_train_valid = len(prints.get("train", set()) & prints.get("valid", set()))
    total = sum(len(r) for r in splits.records.values())
    facts.notes.insert(0, f"{total} preference pairs (for mlxtune dpo / mlxtune orpo); lengths are prompt + the "
                          "longer answer; sup = answer share of tokens")
    return facts
