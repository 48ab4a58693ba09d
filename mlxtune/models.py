"""Models: resolve a `--model` reference to a local directory, and load one through mlx-lm.

A reference is a library name (`mlxtune models`), a local model directory, or a hub id `org/name`; hub ids are
pulled on first use (`hub.pull`: downloaded, converted, quantized with the `pull` defaults) and reused from the
library (`library`) after. What a model directory holds is read by `model_config`.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from mlxtune.cpu_activations import use_fast_swiglu
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
    use_fast_swiglu(model)  # on the CPU backend, the blocks' SwiGLU through a kernel MLX compiles well there
    return model, tokenizer, config


def floating_parameters(model) -> list:
    """Every floating-point parameter of `model` (frozen or trainable): what a dtype change would touch."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]


def compute_in_float32(model, budget: int | None = None) -> bool:
    """On the CPU backend, upcast a half-precision model (and the float copies of its quantized layers) to float32
    for computing, where it fits half the memory `budget` (None: this machine's); True when it did. MLX's CPU
    backend has no BLAS for float16/bfloat16: a forward pass of the imported SmolLM2 (float16 scales and norms) took
    ~12x longer than in float32 (docs/BENCHMARKS.md). Training upcasts the same way (train/engine.py), so a model
    evaluated this way scores in the precision it was trained and validated in. Not for commands that save the
    weights (fuse, export): they keep the stored dtype."""
    import mlx.core as mx

    from mlxtune.cpu_quantized import float_weight_bytes, match_dtype
    from mlxtune.memory.budget import machine_budget

    if mx.default_device() != mx.cpu:
        return False  # Metal/CUDA: half precision is the fast path there
    floats = floating_parameters(model)
    if not any(v.dtype in (mx.float16, mx.bfloat16) for v in floats):
        return False
    float32_bytes = sum(v.size * 4 for v in floats) + 2 * float_weight_bytes(model)  # float copies, then float32
    if float32_bytes > (budget if budget is not None else machine_budget()[0]) // 2:
        return False
    model.set_dtype(mx.float32)
    match_dtype(model)  # the quantized layers' float copies, made again in float32
    return True
