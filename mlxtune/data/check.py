"""`mlxtune data check`: what a dataset holds, as the model will see it, and every problem with file:line."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mlxtune.data.dataset import load_datasets, read_splits, resolve_data_path
from mlxtune.data.formats import find_splits
from mlxtune.data.template import TokenizedExample, choose_template, tokenize_records
from mlxtune.errors import UsageError


@dataclass
class SplitStats:
    split: str
    file: str
    kind: str
    records: int
    lengths: dict  # min / median / p95 / max (tokens, or characters without a model)
    histogram: list[int]  # counts in 10 equal-width bins between min and max
    supervised_share: float | None  # supervised tokens / all tokens
    duplicates: int  # records identical to an earlier one in the same split
    over_max_length: int


@dataclass
class DataReport:
    path: str
    unit: str  # "tokens" or "characters"
    splits: list[SplitStats] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)  # {"where", "message", "hint"}
    notes: list[str] = field(default_factory=list)
    overlap_train_valid: int = 0
    template: str | None = None
    examples: list[dict] = field(default_factory=list)  # rendered samples: [{"source", "segments": [(text, bool)]}]
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return asdict(self)


def _length_stats(lengths: list[int]) -> tuple[dict, list[int]]:
    if not lengths:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}, []
    values = np.asarray(lengths)
    stats = {"min": int(values.min()), "median": float(np.median(values)),
             "p95": float(np.percentile(values, 95)), "max": int(values.max())}
    counts, _ = np.histogram(values, bins=10)
    return stats, counts.tolist()


def _fingerprint(example: TokenizedExample) -> str:
    return hashlib.sha1(example.ids.tobytes()).hexdigest()


def _segments(tokenizer, example: TokenizedExample) -> list[tuple[str, bool]]:
    """The rendered example cut into (text, supervised) runs; decoding prefixes keeps spaces right."""
    ids = [int(t) for t in example.ids]
    flags = example.supervised.tolist()
    cuts = [0] + [i for i in range(1, len(ids)) if flags[i] != flags[i - 1]] + [len(ids)]
    texts = [tokenizer.decode(ids[:c]) for c in cuts]
    return [(texts[k + 1][len(texts[k]):], bool(flags[cuts[k]])) for k in range(len(cuts) - 1)]


def check_data(path: str | Path, model: str | Path | None = None, *, show: int = 0, max_seq_length: int = 2048,
               train_on_prompt: bool = False, chat_template: str | None = None, seed: int = 0,
               keys: tuple[str, str] | None = None) -> DataReport:
    """Read every split, collect every problem, and (with a model) measure it in that model's tokens."""
    files = find_splits(resolve_data_path(path))
    problems: list[UsageError] = []
    records, notes = read_splits(files, seed, keys, problems)
    report = DataReport(str(path), "tokens" if model else "characters", notes=notes)
    report.problems = [{"where": e.message.split(": ", 1)[0], "message": e.message, "hint": e.hint} for e in problems]

    tokenizer = None
    examples: dict[str, list[TokenizedExample]] = {}
    if model is not None:
        from mlx_lm.utils import load_tokenizer

        from mlxtune.models import resolve_model

        tokenizer = load_tokenizer(resolve_model(model))
        kind = next((recs[0].kind for recs in records.values() if recs), "text")
        if not problems:
            datasets = load_datasets(path, tokenizer, max_seq_length=10**9, train_on_prompt=train_on_prompt,
                                     chat_template=chat_template, seed=seed, keys=keys)
            examples = {"train": datasets.train, "valid": datasets.valid, "test": datasets.test}
            report.template, report.from_cache = datasets.template.origin, datasets.from_cache
        else:  # tokenize what parsed, so the stats still describe the good records
            template = choose_template(tokenizer, kind, chat_template)
            report.template = template.origin
            for split, recs in records.items():
                examples[split], _ = tokenize_records(recs, tokenizer, template.template, train_on_prompt, 10**9)

    fingerprints: dict[str, set[str]] = {}
    for split, recs in records.items():
        if not recs and split != "valid":
            continue
        if tokenizer is not None:
            tokenized = examples.get(split, [])
            lengths = [len(e) for e in tokenized]
            supervised = sum(int(e.supervised.sum()) for e in tokenized)
            share = supervised / max(sum(lengths), 1)
            prints = [_fingerprint(e) for e in tokenized]
        else:
            lengths = [len(r.text or "") + len(r.prompt or "") + len(r.completion or "")
                       + sum(len(m["content"]) for m in (r.messages or [])) for r in recs]
            share = None
            prints = [hashlib.sha1(repr((r.text, r.prompt, r.completion, r.messages)).encode()).hexdigest()
                      for r in recs]
        counts = Counter(prints)
        fingerprints[split] = set(prints)
        stats, histogram = _length_stats(lengths)
        report.splits.append(SplitStats(
            split, str(files.get(split, files["train"])), recs[0].kind if recs else "-", len(recs), stats, histogram,
            share, sum(c - 1 for c in counts.values()),
            sum(1 for n in lengths if n > max_seq_length) if tokenizer is not None else 0,
        ))
    report.overlap_train_valid = len(fingerprints.get("train", set()) & fingerprints.get("valid", set()))
    if tokenizer is not None and show:
        report.examples = [{"source": e.source, "segments": _segments(tokenizer, e)}
                           for e in examples.get("train", [])[:show]]
    return report
