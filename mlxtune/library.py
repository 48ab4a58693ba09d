"""The model library: `$MLXTUNE_HOME/models/<name>/`, one MLX model directory per entry with an `mlxtune.json`
that says where it came from. Listing, finding, removing and describing entries; `hub.pull` adds them.
"""

from __future__ import annotations

import difflib
import fcntl
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from pathlib import Path

from mlxtune.errors import UsageError
from mlxtune.model_config import (
    DTYPE_TAGS,
    check_model_dir,
    directory_size,
    has_chat_template,
    read_config,
    text_config,
)
from mlxtune.paths import mlxtune_home

METADATA = "mlxtune.json"
ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")


@dataclass
class ModelEntry:
    """One model in the library."""

    name: str
    path: str
    architecture: str
    parameters: int
    quantization: dict | None  # {"bits": 4, "group_size": 64} or None
    dtype: str
    size_bytes: int
    source: str
    revision: str | None = None
    created: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def quantization_label(self) -> str:
        if not self.quantization:
            return DTYPE_TAGS.get(self.dtype, self.dtype)
        return f"{self.quantization['bits']}-bit g{self.quantization['group_size']}"

    def to_dict(self) -> dict:
        return {**asdict(self), "quantization_label": self.quantization_label}


def library_dir() -> Path:
    return mlxtune_home() / "models"


def read_entry(path: Path) -> ModelEntry | None:
    meta = Path(path) / METADATA
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    data.pop("quantization_label", None)
    known = set(ModelEntry.__dataclass_fields__)
    entry = ModelEntry(**{k: v for k, v in data.items() if k in known})
    entry.path = str(Path(path).resolve())  # the library may have moved with MLXTUNE_HOME
    return entry


def write_entry(path: Path, entry: ModelEntry) -> None:
    from mlxtune.storage import atomic_write_text

    atomic_write_text(Path(path) / METADATA, json.dumps(entry.to_dict(), indent=2) + "\n")


def list_models() -> list[ModelEntry]:
    """Library entries, newest first."""
    root = library_dir()
    if not root.is_dir():
        return []
    entries = [read_entry(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted((e for e in entries if e is not None), key=lambda e: e.created, reverse=True)


def find_entry(name: str) -> ModelEntry | None:
    if "/" in name or name.startswith("."):
        return None
    path = library_dir() / name
    return read_entry(path) if path.is_dir() else None


def require_entry(name: str) -> ModelEntry:
    entry = find_entry(name)
    if entry is None:
        close = difflib.get_close_matches(name, [e.name for e in list_models()], n=3)
        raise UsageError(f"no model named {name!r} in the library ({library_dir()})",
                         f"did you mean {', '.join(close)}?" if close else "`mlxtune models` lists them")
    return entry


def check_entry_name(name: str) -> str:
    """`name` if it is a plain library entry name (one path component inside the library), else a UsageError."""
    if not ENTRY_NAME.fullmatch(str(name)) or name in (".", ".."):
        raise UsageError(f"--name {name!r} is not a plain model name",
                         "use letters, digits, '.', '_', '+' or '-' (no '/', no leading '.'), "
                         "e.g. --name my-model-4bit")
    return name


def models_in_use() -> list[Path]:
    """The library's entries: an output (fuse, export) that is, holds or lies in one would destroy a model that runs
    and other commands read."""
    root = library_dir()
    return [p for p in root.iterdir() if not p.name.startswith(".")] if root.is_dir() else []


_held_models: dict[Path, int] = {}  # model directories this process trains on (shared locks, until it exits)


def hold_model(path: Path) -> None:
    """Take a shared lock on the model directory a run trains on: `models rm` refuses it while the lock is held.
    The kernel drops the lock when the process ends, however it ends."""
    key = Path(path).resolve()
    if key in _held_models or not key.is_dir():
        return
    fd = os.open(key, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # a removal holds it right now (or the file system has no locks): train without the guard
        os.close(fd)
        return
    _held_models[key] = fd


def _in_training(path: Path) -> bool:
    """Whether a process holds `hold_model`'s shared lock on `path`."""
    if Path(path).resolve() in _held_models:
        return True
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def remove_model(name: str, force: bool = False, used_by: Sequence[Path] = ()) -> ModelEntry:
    """Delete a library entry; refused while a run trains on it, or (unless `force`) when `used_by` names runs
    trained on it (`runs.remove_unused_model` finds them: the run layout sits above the library)."""
    entry = require_entry(name)
    path = library_dir() / name
    if _in_training(path):
        raise UsageError(f"model {name!r} is in use by a training run",
                         f"wait for the run to finish (or stop it), then: mlxtune models rm {name}")
    users = list(used_by)
    if users and not force:
        listed = ", ".join(str(r) for r in users[:3]) + (", ..." if len(users) > 3 else "")
        raise UsageError(f"model {name!r} is the base of {len(users)} run(s) in ./runs ({listed}); without it they "
                         "can't be resumed, fused, exported or chatted with",
                         f"fuse what you need first (mlxtune fuse RUN --out fused/NAME), or remove it anyway: "
                         f"mlxtune models rm {name} --force")
    if path.is_symlink():  # an entry linked in from elsewhere: remove the link, never what it points at
        path.unlink()
    else:
        shutil.rmtree(path)
    return entry


def base_source(path: Path) -> str:
    """Where a model directory came from: the hub id or directory recorded by `pull`, else the path itself."""
    entry = read_entry(path)
    return entry.source if entry else str(path)


def model_info(reference: str) -> dict:
    """Config summary and estimated memory (inference, LoRA at default settings) of a library entry or directory."""
    from mlxtune.memory.estimate import model_memory

    entry = find_entry(reference)
    local = Path(reference).expanduser()
    if entry is None and not local.exists():
        entry = require_entry(reference)  # neither a library name nor a directory: say what the library has
    path = Path(entry.path) if entry else check_model_dir(local)
    config = read_config(path)
    text = text_config(config)
    summary = {
        "name": entry.name if entry else path.name,
        "path": str(path),
        "architecture": config.get("model_type"),
        "layers": text.get("num_hidden_layers"),
        "hidden_size": text.get("hidden_size"),
        "attention_heads": text.get("num_attention_heads"),
        "kv_heads": text.get("num_key_value_heads", text.get("num_attention_heads")),
        "vocab_size": text.get("vocab_size"),
        "context_length": text.get("max_position_embeddings"),
        "quantization": config.get("quantization"),
        "size_bytes": directory_size(path),
        "has_chat_template": has_chat_template(path),
        "source": entry.source if entry else str(path),
    }
    # Estimate at the model's context, capped at 4096 (what a Mac user chats with), training rows of 1024 tokens.
    context = min(summary["context_length"] or 4096, 4096)
    summary["memory"] = model_memory(path, context=context, seq_len=min(context, 1024))
    return summary
