"""Model references: a local directory or a Hugging Face hub id, resolved to a local MLX-loadable directory."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mlxtune.errors import UsageError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what MLX needs: never pickled weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve_model(reference: str | os.PathLike | None) -> Path:
    """A local model directory for `reference`; hub ids are fetched (or taken from the local cache)."""
    if reference is None or str(reference).strip() == "":
        raise UsageError("no model given", "pass --model with a local model directory or a Hugging Face repo id")
    text = str(reference)
    path = Path(text).expanduser()
    if path.exists():
        return _check_model_dir(path)
    if HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return _from_hub(text)
    raise UsageError(
        f"model not found: {text}",
        "give a local model directory (with config.json) or a Hugging Face repo id like org/name",
    )


def _check_model_dir(path: Path) -> Path:
    if not path.is_dir():
        raise UsageError(f"model path is not a directory: {path}", "give the directory that holds config.json")
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(f"no config.json in {path}", "point --model at a Hugging Face or MLX model directory")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config}: invalid JSON ({exc})", "re-download or fix the model's config.json") from None
    if not any(path.glob("*.safetensors")):
        raise UsageError(f"no .safetensors weights in {path}", "convert the model to safetensors first")
    return path.resolve()


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")  # never hang on a dead network
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        local = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except LocalEntryNotFoundError:
        raise UsageError(
            f"{repo_id} is not in the local Hugging Face cache and the hub can't be reached",
            "connect and run again, or pass --model with a local model directory",
        ) from None
    except Exception as exc:  # repository not found, gated, network errors
        raise UsageError(f"could not fetch {repo_id}: {type(exc).__name__}: {exc}".splitlines()[0],
                         "check the repo id and your network or HF_TOKEN") from None
    return _check_model_dir(Path(local))


def load_model(path: Path, adapter_path: Path | None = None):
    """(model, tokenizer, config) through mlx-lm (with an adapter when given), with its errors turned into ours."""
    from mlx_lm.utils import load

    from mlxtune.backend import check_blas

    check_blas()
    try:
        model, tokenizer, config = load(str(path), return_config=True,
                                        adapter_path=str(adapter_path) if adapter_path else None)
    except ValueError as exc:
        message = str(exc)
        if "not supported" in message.lower():
            raise UsageError(f"{path}: {message}", "mlx-lm cannot load this architecture") from None
        raise
    return model, tokenizer, config


def model_name(path: Path) -> str:
    return Path(path).name
