"""Models: resolve a `--model` reference to a local directory, and load one through mlx-lm.

A reference is a library name (`mlxtune models`), a local model directory, or a hub id `org/name`; hub ids are
pulled on first use (`hub.pull`: downloaded, converted, quantized with the `pull` defaults) and reused from the
library (`library`) after. What a model directory holds is read by `model_config`.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from mlxtune.cpu_quantized import accelerate_quantized
from mlxtune.errors import UsageError
from mlxtune.storage import environment_error
from mlxtune.hub import is_hub_id, pull
from mlxtune.library import find_entry, list_models
from mlxtune.model_config import check_architecture, check_model_dir, check_weights_match, read_config

# The base model `mlxtune lora` uses when no --model is given: a small instruct model whose 4-bit QLoRA fits
# an 8 GB Mac with room for batch 4 x 1024 tokens (see configs/mac-8gb-qwen2.5-1.5b-qlora.yaml).
DEFAULT_BASE_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"


def resolve_model(reference: str | os.PathLike | None, console=None) -> Path:
    """A local MLX-loadable directory for `reference` (library name, directory, or hub id pulled on demand)."""
    if reference is None or str(reference).strip() == "":
        raise UsageError("no model given", "pass --model with a library name, a local directory or a hub id")
    text = str(reference)
    path = Path(text).expanduser()
    if path.exists():
        return check_model_dir(path)
    entry = find_entry(text)
    if entry is not None:
        return Path(entry.path)
    if is_hub_id(text):
        pulled = [e for e in list_models() if e.source == text]
        if pulled:  # any quantization the user already has beats a new download
            return Path(pulled[0].path)
        return Path(pull(text, console=console).path)
    known = [e.name for e in list_models()]
    close = difflib.get_close_matches(text, known, n=3)
    raise UsageError(
        f"model not found: {text}",
        (f"did you mean {', '.join(close)}? " if close else "")
        + "give a library name (`mlxtune models`), a local model directory, or a Hugging Face repo id org/name",
    )


def load_model(path: Path, adapter_path: Path | None = None):
    """(model, tokenizer, config) through mlx-lm (with an adapter when given), with its errors turned into ours."""
    from mlx_lm.utils import load

    from mlxtune.backend import check_blas

    check_blas()
    config = read_config(path)
    check_architecture(config, Path(path))
    check_weights_match(path, config)  # a config claiming 10^6 blocks is refused, not built until memory runs out
    try:
        model, tokenizer, config = load(str(path), return_config=True,
                                        adapter_path=str(adapter_path) if adapter_path else None)
    except (TypeError, ValueError, KeyError, RuntimeError, OSError) as exc:
        # A config that doesn't describe the weights, weights cut short or not safetensors (never unpickled), an
        # adapter from another model: the files' fault, not ours (a full disk or memory is said as such).
        error = environment_error(exc)
        if error is not None:
            raise error from None
        what = f"{path} with the adapter in {adapter_path}" if adapter_path else str(path)
        raise UsageError(f"could not load {what}: {type(exc).__name__}: {exc}".splitlines()[0][:300],
                         "its config.json and weight files must match and be complete (download it again); an "
                         "adapter must come from a run on this same base model") from None
    # The one hook for every command that loads a model (chat, generate, serve, eval, fuse, training): on the CPU
    # backend a quantized base computes through dequantized weights, ~35x faster; Metal/CUDA keep MLX's kernels.
    # Training chooses again with its memory plan once its adapters are attached (train/loop.py).
    accelerate_quantized(model)
    return model, tokenizer, config
