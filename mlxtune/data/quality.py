"""Warnings about data that parses but would hurt the run, each pointing at file:line.

Errors (records that can't be trained on) stop a run; these don't: `mlxtune data check` lists them (and fails with
`--strict`), and `mlxtune lora` prints them and counts them in its header. The same problem gets the same rule in
every format: an empty prompt is "no user turn" just as a conversation without one is.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from mlxtune.data.formats import Record
from mlxtune.ui import group_by

# code → what the group is called in summaries
TITLES = {
    "no-user-turn": "no user turn",
    "empty-turn": "empty turn",
    "ends-on-user": "ends on an unanswered user or tool turn",
    "near-empty-reply": "near-empty reply",
    "placeholder": "placeholder text left in",
    "over-max-length": "over --max-seq-length",
    "truncation": "supervised tokens lost to truncation",
    "max-length-over-context": "--max-seq-length over the model's context",
    "over-context": "longer than the model's context",
    "in-train": "validation record also in train",
    "valid-copies-train": "validation is a copy of train",
    "too-small": "too little data for the planned steps",
}

PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][\w.\-]*\s*\}\}")
PASSES_WARNING = 10  # more passes over the training set than this and a model mostly memorises


@dataclass
class DataWarning:
    code: str
    where: str  # "file:line" (or the file, or the flag, for warnings about the whole set)
    message: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def record_warnings(record: Record) -> list[DataWarning]:
    """What is wrong with one parsed record's content (structure errors were raised while parsing)."""
    out: list[DataWarning] = []

    def warn(code: str, message: str):
        out.append(DataWarning(code, record.source, message))

    texts: list[tuple[str, str]] = []  # (label, text) for the placeholder scan
    if record.kind == "text":
        texts.append(("text", record.text or ""))
    elif record.messages is None:  # prompt/completion
        if not (record.prompt or "").strip():
            warn("no-user-turn", "no user turn: the prompt is empty, so the reply answers nothing")
        if not _has_words(record.completion or ""):
            warn("near-empty-reply", f"near-empty reply {record.completion.strip()!r}: it teaches next to nothing")
        texts += [("prompt", record.prompt or ""), ("completion", record.completion or "")]
    else:
        messages, trained = record.messages, record.supervised_turns()
        roles = [m["role"] for m in messages]
        if "user" not in roles:
            warn("no-user-turn", f"no user turn (roles: {', '.join(roles)}): the replies answer nothing")
        for number, (message, train) in enumerate(zip(messages, trained), start=1):
            content = message["content"]
            if not content.strip() and not message.get("tool_calls"):
                why = (": the model learns to end its turn at once" if message["role"] == "assistant" and train
                       else "")
                warn("empty-turn", f"message {number} ({message['role']}) is empty{why}")
            elif message["role"] == "assistant" and train and content.strip() and not _has_words(content):
                warn("near-empty-reply", f"message {number}: near-empty reply {content.strip()!r}")
            texts.append((f"message {number}", content))
        if roles[-1] in ("user", "tool"):  # trailing context the model never answers: wasted, or a cut record
            warn("ends-on-user", f"ends on a {roles[-1]} turn (message {len(roles)}) that is never answered")
    for label, text in texts:
        match = PLACEHOLDER.search(text)
        if match:
            warn("placeholder", f"placeholder {match.group(0)!r} left in the {label}")
            break
    return out


def at_least(count: int, cap: int | None) -> str:
    """A count measured only up to `cap` (a record tokenized no further): "at least N" once it reaches the cap."""
    return f"at least {count:,}" if cap and count >= cap else f"{count:,}"


def length_warnings(split: str, file: str, over: list[tuple[str, int, int, int]], records: int,
                    supervised_tokens: int, max_seq_length: int, dropped: bool = False,
                    cap: int | None = None) -> list[DataWarning]:
    """One warning per record over --max-seq-length (what truncation loses), and one for the share of the set.

    `cap`: lengths were measured only up to this many tokens; a record that reaches it is "at least" that long."""
    out = []
    for source, tokens, supervised, lost in over:
        capped = cap if cap and tokens >= cap else None
        share = lost / supervised if supervised else 0.0
        action = ("dropped (--drop-long)" if dropped
                  else f"truncation drops {'at least ' if capped else ''}{lost:,} of its "
                       f"{'at least ' if capped else ''}{supervised:,} supervised tokens"
                       + ("" if capped else f" ({share:.0%})"))
        out.append(DataWarning("over-max-length", source,
                               f"{at_least(tokens, capped)} tokens, over --max-seq-length {max_seq_length}: {action}"))
    if over:
        lost = sum(o[3] for o in over)
        out.append(DataWarning(
            "truncation", file,
            f"{len(over):,} of {records:,} {split} records ({len(over) / max(records, 1):.0%}) are over "
            f"--max-seq-length {max_seq_length}: {lost:,} of {supervised_tokens:,} supervised tokens "
            f"({lost / max(supervised_tokens, 1):.1%}) {'dropped' if dropped else 'lost to truncation'}",
        ))
    return out


def context_warnings(max_seq_length: int, context_length: int | None,
                     lengths: list[tuple[str, int]], cap: int | None = None) -> list[DataWarning]:
    """--max-seq-length and examples past the positions the model was pretrained on."""
    if not context_length or max_seq_length <= context_length:
        return []
    out = [DataWarning("max-length-over-context", "--max-seq-length",
                       f"{max_seq_length} is over the model's context window ({context_length} tokens, its "
                       f"max_position_embeddings): use --max-seq-length {context_length} or less")]
    for source, tokens in lengths:
        if tokens > context_length:
            out.append(DataWarning("over-context", source,
                                   f"{at_least(tokens, cap)} tokens, over the model's context window ({context_length}): "
                                   "positions it was never trained on"))
    return out


def split_warnings(train: list[tuple[str, str]], valid: list[tuple[str, str]], valid_file: str) -> list[DataWarning]:
    """Validation records that are also training records; `train`/`valid` are (source, fingerprint) pairs."""
    if not valid or not train:
        return []
    first_in_train: dict[str, str] = {}
    for source, fingerprint in train:
        first_in_train.setdefault(fingerprint, source)
    shared = [(source, first_in_train[fp]) for source, fp in valid if fp in first_in_train]
    if len(shared) == len(valid) and len(valid) > 1:
        return [DataWarning("valid-copies-train", valid_file,
                            f"all {len(valid):,} validation records are also in train: the validation loss "
                            "can't show overfitting; hold out records that are not trained on")]
    return [DataWarning("in-train", source, f"also in train ({where}): its validation loss measures memorising")
            for source, where in shared]


def steps_warning(steps: int, examples_per_step: float, train_records: int) -> list[DataWarning]:
    """A plan that passes over the training set so often that the model memorises it."""
    if not train_records or steps <= 0:
        return []
    passes = steps * examples_per_step / train_records
    if passes <= PASSES_WARNING:
        return []
    return [DataWarning("too-small", "--iters",
                        f"{steps:,} steps of ~{examples_per_step:.0f} examples are {passes:.0f} passes over "
                        f"{train_records:,} training records: expect memorising; add data or lower --iters")]


def summary(warnings: list[DataWarning]) -> str:
    """One line for a run header: "3 warnings: no user turn ×2, over --max-seq-length ×1"."""
    if not warnings:
        return "none"
    parts = [f"{TITLES.get(g[0].code, g[0].code)} ×{len(g)}" for g in group_by(warnings, lambda w: w.code)]
    return f"{len(warnings):,} warning(s): " + ", ".join(parts)
