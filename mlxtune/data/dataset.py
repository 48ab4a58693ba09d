"""Turn a data path into tokenized train/valid(/test) sets, reporting every choice made on the user's behalf."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxtune.data import cache
from mlxtune.data.formats import Record, dataset_kind, find_splits, read_records
from mlxtune.data.quality import DataWarning, context_warnings, length_warnings, record_warnings, split_warnings
from mlxtune.data.template import (
    LengthReport,
    TemplateChoice,
    TokenizedExample,
    choose_template,
    tokenize_records,
)
from mlxtune.errors import UsageError
from mlxtune.paths import cache_dir

VALID_FRACTION = 0.1
HUB_DATASET = re.compile(r"^(hf:)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Datasets:
    train: list[TokenizedExample]
    valid: list[TokenizedExample]
    test: list[TokenizedExample]
    kind: str  # chat | completion | text
    template: TemplateChoice
    notes: list[str] = field(default_factory=list)  # what we decided for the user, to print
    from_cache: bool = False
    warnings: list[DataWarning] = field(default_factory=list)  # data that parses but would hurt the run


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


def hold_out_validation(records: dict[str, list], train_file: Path, seed: int, unit: str) -> list[str]:
    """Without a validation split, hold one out of `records["train"]` (in place); the note saying so."""
    if "valid" in records:
        return []
    records["train"], records["valid"] = split_validation(records["train"], seed)
    if not records["valid"]:
        return []
    return [f"no validation file: held out {len(records['valid'])} of {len(records['train']) + len(records['valid'])} "
            f"{unit} from {train_file.name} (seed {seed})"]


def _length_note(split: str, report: LengthReport, max_seq_length: int) -> list[str]:
    notes = []
    if report.truncated:
        notes.append(
            f"{split}: {report.truncated} examples longer than {max_seq_length} tokens were truncated "
            f"(longest {report.longest}); {report.supervised_tokens_lost} supervised tokens lost"
        )
    if report.dropped:
        notes.append(
            f"{split}: {report.dropped} examples dropped (longer than {max_seq_length} tokens with --drop-long, "
            f"or nothing left to learn after truncation); {report.supervised_tokens_lost} supervised tokens lost"
            if not report.truncated else f"{split}: {report.dropped} examples dropped (nothing left to learn)"
        )
    return notes


def resolve_data_path(data: str | Path) -> Path:
    """A local path as it is; a Hugging Face dataset id (`org/name` or `hf:org/name`) exported to local JSONL."""
    path = Path(data).expanduser()
    text = str(data)
    if path.exists() or not HUB_DATASET.match(text) or text.startswith((".", "/", "~")):
        return path
    return _export_hub_dataset(text.removeprefix("hf:"))


def _export_hub_dataset(name: str) -> Path:
    try:
        import datasets as hf_datasets
    except ImportError:
        raise UsageError(f"data not found: {name} (not a local path; as a Hugging Face dataset it needs `datasets`)",
                         "pip install 'mlxtune[datasets]', or give a local directory/file") from None
    target = cache_dir("datasets") / name.replace("/", "--")
    if (target / "train.jsonl").is_file():
        return target
    try:
        loaded = hf_datasets.load_dataset(name)
    except Exception as exc:  # not found, offline, gated
        raise UsageError(f"could not load dataset {name}: {exc}".splitlines()[0],
                         "check the name and network, or give a local directory") from None
    target.mkdir(parents=True, exist_ok=True)
    names = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}
    for split, rows in loaded.items():
        if split in names:
            with open(target / f"{names[split]}.jsonl", "w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return target


def read_splits(files: dict[str, Path], seed: int, keys=None,
                problems=None) -> tuple[dict[str, list[Record]], list[str]]:
    """Records per split (a held-out "valid" when there is no validation file) and notes on what was decided.

    Without `problems`, every record is still read, and the first error is raised with the count of the others.
    """
    collected: list[UsageError] = [] if problems is None else problems
    records = {split: read_records(path, collected, keys) for split, path in files.items()}
    if problems is None and collected:
        first = collected[0]
        more = len(collected) - 1
        if more:
            listing = f"`mlxtune data check` lists all {more + 1:,}"
            raise UsageError(f"{first.message} (and {more:,} more problem(s))",
                             f"{first.hint}; {listing}" if first.hint else listing)
        raise first
    notes = []
    if "valid" not in records:
        records["train"], records["valid"] = split_validation(records["train"], seed)
        if records["valid"]:
            notes.append(
                f"no validation file: held out {len(records['valid'])} of "
                f"{len(records['train']) + len(records['valid'])} records from {files['train'].name} (seed {seed})"
            )
        elif len(records["train"]) == 1:
            notes.append("only one record: training without a validation set")
    return records, notes


def fingerprint(example: TokenizedExample) -> str:
    return hashlib.sha1(example.ids.tobytes()).hexdigest()


def record_fingerprint(record: Record) -> str:
    """What a record says, not where it is: the same record in two files (or two splits) has one fingerprint."""
    return hashlib.sha1(repr((record.text, record.prompt, record.completion, record.messages)).encode()).hexdigest()


@dataclass
class ScoredSplit:
    """The records an evaluation scores and what the run trained on (both read by `read_splits`, as training did)."""

    records: list[Record]
    file: Path
    split: str  # test | valid | held-out validation | file
    trained: list[Record] | None  # the run's training records; None when its data can't be read any more


def scored_split(data: str | Path | None, train_data: str | Path, seed: int, keys=None) -> ScoredSplit:
    """What to evaluate on: `data` (default: the training data) split exactly as training split it, so a single
    training file gives the records training held out (same seed), never the ones it trained on. A different single
    file is scored whole; `trained` lets the caller state any overlap with the training records by content."""
    own = resolve_data_path(train_data)
    source = resolve_data_path(data) if data else own
    trained = None
    if source.is_file() and not (own.exists() and source.resolve() == own.resolve()):
        records, split, file = read_records(source, None, keys), "file", source
    else:
        files = find_splits(source)
        splits, _ = read_splits(files, seed, keys)
        name = "test" if "test" in files else "valid"
        records, file = splits[name], files.get(name, files["train"])
        split = name if name in files else "held-out validation"
        if source.resolve() == own.resolve():
            trained = splits["train"]
    if trained is None:
        try:
            trained = read_splits(find_splits(own), seed, keys)[0]["train"]
        except UsageError:  # moved or deleted since training: the overlap can't be checked
            trained = None
    return ScoredSplit(records, file, split, trained)


def data_warnings(records: dict[str, list[Record]], tokenized: dict[str, list[TokenizedExample]],
                  reports: dict[str, LengthReport], files: dict[str, Path], max_seq_length: int,
                  context_length: int | None = None, drop_long: bool = False) -> list[DataWarning]:
    """Every warning about a tokenized dataset: record content, lengths, context window, train/valid overlap."""
    warnings: list[DataWarning] = []
    for split in ("train", "valid", "test"):
        for record in records.get(split, []):
            warnings += record_warnings(record)
    lengths = []
    for split in ("train", "valid", "test"):
        report = reports.get(split)
        if report is None:
            continue
        file = str(files.get(split, files["train"]))
        warnings += length_warnings(split, file, report.over, len(records.get(split, [])),
                                    report.supervised_tokens, max_seq_length, drop_long)
        lengths += [(e.source, len(e)) for e in tokenized.get(split, [])]
    warnings += context_warnings(max_seq_length, context_length, lengths)
    warnings += split_warnings([(e.source, fingerprint(e)) for e in tokenized.get("train", [])],
                               [(e.source, fingerprint(e)) for e in tokenized.get("valid", [])],
                               str(files.get("valid", files["train"])))
    return warnings


def load_datasets(
    data: str | Path,
    tokenizer,
    *,
    max_seq_length: int = 2048,
    train_on_prompt: bool = False,
    chat_template: str | None = None,
    seed: int = 0,
    drop_long: bool = False,
    keys: tuple[str, str] | None = None,
    use_cache: bool = True,
    context_length: int | None = None,
) -> Datasets:
    """Tokenized splits plus the notes and warnings a run prints; `context_length`: the model's, for warnings."""
    files = find_splits(resolve_data_path(data))
    template_text = Path(chat_template).read_text(encoding="utf-8") if chat_template and Path(chat_template).is_file() else chat_template
    key_settings = {"max_seq_length": max_seq_length, "train_on_prompt": train_on_prompt, "seed": seed,
                    "template": template_text, "drop_long": drop_long, "keys": keys,
                    "context_length": context_length}
    key = cache.cache_key(files, tokenizer, key_settings) if use_cache else None
    cached = cache.load_cached(key) if key else None
    if cached is not None:
        splits, meta = cached
        template = TemplateChoice(meta["template"], meta["template_origin"])
        return Datasets(splits.get("train", []), splits.get("valid", []), splits.get("test", []), meta["kind"],
                        template, meta["notes"], from_cache=True,
                        warnings=[DataWarning(**w) for w in meta.get("warnings", [])])

    records, notes = read_splits(files, seed, keys)
    kinds = {split: dataset_kind(recs) for split, recs in records.items() if recs}
    if "text" in kinds.values() and set(kinds.values()) != {"text"}:
        detail = ", ".join(f"{split}={kind}" for split, kind in kinds.items())
        raise UsageError(f"the splits use different formats ({detail})", "use one format for train, valid and test")
    kind = dataset_kind([r for recs in records.values() for r in recs])
    template = choose_template(tokenizer, kind, chat_template)
    if template.origin == "fallback":
        notes.append("the model has no chat template: using mlxtune's fallback template (### User: / ### Assistant:)")
    tokenized, reports = {}, {}
    for split in ("train", "valid", "test"):
        examples, report = tokenize_records(
            records.get(split, []), tokenizer, template.template, train_on_prompt, max_seq_length, drop_long
        )
        notes.extend(_length_note(split, report, max_seq_length))
        tokenized[split], reports[split] = examples, report
    if not tokenized["train"]:
        raise UsageError(f"no usable training examples in {files['train']}", "check --max-seq-length and the data")
    warnings = data_warnings(records, tokenized, reports, files, max_seq_length, context_length, drop_long)
    if key:
        unsaved = cache.save_cached(key, tokenized, {"splits": list(tokenized), "kind": kind,
                                                     "template": template.template,
                                                     "template_origin": template.origin, "notes": notes,
                                                     "warnings": [w.to_dict() for w in warnings]})
        if unsaved:
            notes = [*notes, unsaved]
    return Datasets(tokenized["train"], tokenized["valid"], tokenized["test"], kind, template, notes,
                    warnings=warnings)
