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


def ollama_models_dir() -> Path:
    """Ollama's local store (`OLLAMA_MODELS`, default `~/.ollama/models`): manifests/ and blobs/."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def lmstudio_models_dir() -> Path:
    """LM Studio's models folder: `~/.lmstudio/models` (LM Studio 0.3+), else the older `~/.cache/lm-studio/models`."""
    for path in (Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"):
        if path.is_dir():
            return path
    return Path.home() / ".lmstudio" / "models"
