"""Where mlxtune keeps its files: `MLXTUNE_HOME` (default `~/.cache/mlxtune`)."""

from __future__ import annotations

import os
from pathlib import Path


def mlxtune_home() -> Path:
    return Path(os.environ.get("MLXTUNE_HOME") or Path.home() / ".cache" / "mlxtune").expanduser()


def cache_dir(kind: str) -> Path:
    path = mlxtune_home() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
