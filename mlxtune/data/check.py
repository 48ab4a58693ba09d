"""`mlxtune data check`: what a dataset holds, as the model will see it, and every problem with file:line."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mlxtune.data.dataset import fingerprint, load_datasets, read_splits, record_fingerprint, resolve_data_path
from mlxtune.data.formats import RecordError, dataset_kind, find_splits
from mlxtune.data.quality import (DataWarning, context_warnings, length_warnings, record_warnings, split_warnings,
                                  steps_warning)
from mlxtune.data.template import TokenizedExample, choose_template, template_name, tokenize_records
from mlxtune.data.preference_check import is_preference_data, preference_facts
from mlxtune.data.prompts import is_prompt_only_data, prompt_facts
from mlxtune.errors import UsageError
from mlxtune.settings import UPPER_BOUNDS


@dataclass
class SplitStats:
    split: str
    file: str | None  # None for a validation split held out from the training file
    kind: str
    records: int
    lengths: dict  # min / median / p95 / max (tokens, or characters without a model)
    histogram: list[int]  # counts in 10 equal-width bins between min and max
    supervised_share: float | None  # supervised tokens / all tokens
    duplicates: int  # records identical to an earlier one in the same split
    over_max_length: int
    held_out_from: str | None = None  # the file a held-out validation split comes from
    convention: str = ""  # the convention the records were read as


@dataclass
class DataReport:
    path: str
    unit: str  # "tokens" or "characters"
    splits: list[SplitStats] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)  # {"where", "message", "hint"}: records that can't train
    warnings: list[dict] = field(default_factory=list)  # {"code", "where", "message"}: records that would hurt
    notes: list[str] = field(default_factory=list)
    overlap_train_valid: int = 0
    template: str | None = None  # the choice's origin key ("model", "fallback", "file:<path>", "none"), as in run.json
    examples: list[dict] = field(default_factory=list)  # rendered samples: [{"source", "segments": [(text, bool)]}]
    from_cache: bool = False
    context_length: int | None = None  # the model's (max_position_embeddings)
    measured_up_to: int | None = None  # token lengths are exact below this; a record reaching it is at least as long
    max_seq_length: int | None = None  # the length checked against: given, or min(2048, the model's context)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def template_name(self) -> str | None:
        """The template in the words every other command prints."""
        return template_name(self.template) if self.template else None

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


def _segments(tokenizer, example: TokenizedExample) -> list[tuple[str, bool]]:
    """The rendered example cut into (text, supervised) runs; decoding prefixes keeps spaces right."""
    ids = [int(t) for t in example.ids]
    flags = example.supervised.tolist()
    cuts = [0] + [i for i in range(1, len(ids)) if flags[i] != flags[i - 1]] + [len(ids)]
    texts = [tokenizer.decode(ids[:c]) for c in cuts]
    return [(texts[k + 1][len(texts[k]):], bool(flags[cuts[k]])) for k in range(len(cuts) - 1)]


def _problem(error: UsageError) -> dict:
    if isinstance(error, RecordError):
        return {"where": error.where, "message": error.message, "detail": error.detail, "hint": error.hint}
    where = error.message.split(": ", 1)[0]
    return {"where": where, "message": error.message, "detail": error.message, "hint": error.hint}


def _context_length(model_path: Path) -> int | None:
    from mlxtune.model_config import read_config, text_config

    try:
        value = text_config(read_config(model_path)).get("max_position_embeddings")
    except Exception:  # a tokenizer-only directory: no context to compare with
        return None
    return int(value) if isinstance(value, int) else None


def _facts_report(path, facts, kind: str) -> DataReport:
    """The report of preference pairs or prompt-only records, from their facts."""
    report = DataReport(str(path), facts.unit, problems=[_problem(e) for e in facts.problems],
                        warnings=[w.to_dict() for w in facts.warnings], notes=facts.notes,
                        overlap_train_valid=facts.overlap_train_valid, template=facts.template)
    for s in facts.splits:
        stats, histogram = _length_stats(s.lengths)
        report.splits.append(SplitStats(s.split, s.file, kind, s.records, stats, histogram,
                                        s.supervised_share, s.duplicates, s.over_max_length, s.held_out_from,
                                        s.convention))
    report.examples = [{"source": label, "segments": _segments(facts.tokenizer, e)} for label, e in facts.shown]
    return report


def _default_max_seq_length(model: str | Path | None) -> int:
    """--max-seq-length when not given, as `lora` resolves it: min(2048, the model's context window)."""
    from mlxtune.model_config import DEFAULT_MAX_SEQ_LENGTH, max_seq_length_for, read_config
    from mlxtune.models import resolve_model

    return DEFAULT_MAX_SEQ_LENGTH if model is None else max_seq_length_for(read_config(resolve_model(model)))


def check_data(path: str | Path, model: str | Path | None = None, *, show: int = 0, max_seq_length: int | None = None,
               train_on_prompt: bool = False, chat_template: str | None = None, seed: int = 0,
               keys: tuple[str, str] | None = None, iters: int | None = None,
               batch_size: int | None = None) -> DataReport:
    """Read every split, collect every problem and warning, and (with a model) measure it in that model's tokens.

    `iters` and `batch_size` describe the planned run, to warn when it would pass over the data too often.
    """
    files = find_splits(resolve_data_path(path))
    if max_seq_length is None:
        max_seq_length = _default_max_seq_length(model)
    if not 1 <= max_seq_length <= UPPER_BOUNDS["max_seq_length"]:
        raise UsageError(f"max_seq_length must be in [1, {UPPER_BOUNDS['max_seq_length']:,}], got {max_seq_length}",
                         "set --max-seq-length, or omit it for min(2048, the model's context)")
    if keys is None and is_preference_data(files):  # pairs for mlxtune dpo/orpo: checked as pairs
        report = _facts_report(path, preference_facts(resolve_data_path(path), model, show=show,
                                                      max_seq_length=max_seq_length, chat_template=chat_template,
                                                      seed=seed), "preference")
        report.max_seq_length = max_seq_length
        return report
    if keys is None and is_prompt_only_data(files):  # prompts for reinforcement learning (GRPO)
        report = _facts_report(path, prompt_facts(resolve_data_path(path), model, chat_template=chat_template,
                                                  seed=seed), "prompt-only")
        report.max_seq_length = max_seq_length
        return report
    problems: list[UsageError] = []
    records, notes = read_splits(files, seed, keys, problems)
    report = DataReport(str(path), "tokens" if model else "characters", notes=notes, max_seq_length=max_seq_length)
    report.problems = [_problem(e) for e in problems]

    tokenizer = None
    examples: dict[str, list[TokenizedExample]] = {}
    if model is not None:
        from mlx_lm.utils import load_tokenizer

        from mlxtune.models import resolve_model

        model_path = resolve_model(model)
        tokenizer = load_tokenizer(model_path)
        report.context_length = _context_length(model_path)
        kind = dataset_kind([r for recs in records.values() for r in recs])
        # Lengths are measured exactly up to well past every limit that matters; a longer record (a 50 MB line) is
        # measured as "at least this", never tokenized whole.
        measure = report.measured_up_to = max(4 * max_seq_length, report.context_length or 0)
        if not problems:
            datasets = load_datasets(path, tokenizer, max_seq_length=measure, train_on_prompt=train_on_prompt,
                                     chat_template=chat_template, seed=seed, keys=keys)
            examples = {"train": datasets.train, "valid": datasets.valid, "test": datasets.test}
            report.template, report.from_cache = datasets.template.origin, datasets.from_cache
        else:  # tokenize what parsed, so the stats still describe the good records
            template = choose_template(tokenizer, kind, chat_template)
            report.template = template.origin
            for split, recs in records.items():
                examples[split], _ = tokenize_records(recs, tokenizer, template.template, train_on_prompt, measure)

    warnings: list[DataWarning] = []
    for split in ("train", "valid", "test"):
        for record in records.get(split, []):
            warnings += record_warnings(record)
    prints: dict[str, list[tuple[str, str]]] = {}
    lengths_all: list[tuple[str, int]] = []
    for split, recs in records.items():
        if not recs:
            continue
        file = files.get(split)
        if tokenizer is not None:
            tokenized = examples.get(split, [])
            lengths = [len(e) for e in tokenized]
            supervised = [int(e.supervised.sum()) for e in tokenized]
            share = sum(supervised) / max(sum(lengths), 1)
            prints[split] = [(e.source, fingerprint(e)) for e in tokenized]
            over = [(e.source, len(e), s, int(e.supervised[max_seq_length:].sum()))
                    for e, s in zip(tokenized, supervised) if len(e) > max_seq_length]
            warnings += length_warnings(split, str(file or files["train"]), over, len(recs), sum(supervised),
                                        max_seq_length, cap=report.measured_up_to)
            lengths_all += [(e.source, len(e)) for e in tokenized]
        else:
            lengths = [len(r.text or "") + len(r.prompt or "") + len(r.completion or "")
                       + sum(len(m["content"]) for m in (r.messages or [])) for r in recs]
            share = None
            prints[split] = [(r.source, record_fingerprint(r)) for r in recs]
            over = []
        counts = Counter(fp for _, fp in prints[split])
        stats, histogram = _length_stats(lengths)
        conventions = sorted({r.convention for r in recs})
        report.splits.append(SplitStats(
            split, str(file) if file else None, dataset_kind(recs), len(recs), stats, histogram,
            share, sum(c - 1 for c in counts.values()), len(over),
            held_out_from=None if file else str(files["train"]), convention=", ".join(conventions),
        ))
    if tokenizer is not None:
        warnings += context_warnings(max_seq_length, report.context_length, lengths_all, report.measured_up_to)
    warnings += split_warnings(prints.get("train", []), prints.get("valid", []),
                               str(files.get("valid", files["train"])))
    if iters and records.get("train"):
        warnings += steps_warning(iters, batch_size or 4, len(records["train"]))
    report.overlap_train_valid = len({fp for _, fp in prints.get("train", [])}
                                     & {fp for _, fp in prints.get("valid", [])})
    report.warnings = [w.to_dict() for w in warnings]
    if tokenizer is not None and show:
        report.examples = [{"source": e.source, "segments": _segments(tokenizer, e)}
                           for e in examples.get("train", [])[:show]]
    return report
