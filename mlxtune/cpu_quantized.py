"""Quantized bases at full speed on MLX's CPU backend: their layers compute through dequantized weights.

MLX's CPU `quantized_matmul` is a plain loop (≈0.7 GFLOP/s for a 4-bit 1536×576 weight on 2 cores) where
`mx.dequantize` + a BLAS matmul runs at ≈28 GFLOP/s, so a QLoRA step there is ~35× slower than it needs to be.
On the CPU backend, the frozen base's `QuantizedLinear`/`QuantizedEmbedding` instances get a subclass whose
`__call__` computes the same product another way:

- `load`: a float copy of the weight, dequantized once, multiplies directly (used when all the copies fit in a
  quarter of the memory budget, `memory/estimate.py`'s `quantized_path`). The copy is a plain attribute, not a parameter: never
  saved, trained, counted or fused.
- `call`: each call dequantizes, multiplies and lets the float weight go; a custom VJP dequantizes again for the
  backward pass, so no float weight is kept from the forward pass to the backward. The output head alone keeps a
  float copy (every loss chunk would dequantize it, and the chunks' copies are alive together).

Only the class changes: the packed weights, scales and biases stay the module's parameters, and every
`isinstance(m, nn.QuantizedLinear)` (mlx-lm's LoRA/DoRA `from_base` and `fuse`, `dequantize_model`, saving) still
holds, so fused and exported models come out exactly as before. Metal and CUDA keep MLX's quantized kernels
(https://ml-explore.github.io/mlx/build/html/python/_autosummary/mlx.core.quantized_matmul.html).
`MLXTUNE_DEQUANTIZE=off|call|load` overrides the choice on the CPU backend.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx
import mlx.nn as nn

from mlxtune.errors import UsageError

ENV = "MLXTUNE_DEQUANTIZE"
PATHS = ("off", "call", "load")


@functools.cache
def _dequantized_matmul(group_size: int, bits: int, mode: str, with_biases: bool, dtype):
    """`x @ dequantize(w).T` for one quantization format, with a backward pass that dequantizes again."""

    def dequantized(w, scales, biases, after):
        # Only once `after` (the layer's input) exists: the weights alone are ready from the start, and MLX's
        # scheduler would otherwise dequantize every layer up front and hold all the float weights at once.
        w, scales, biases = mx.depends([w, scales, biases], [after])
        return mx.dequantize(w, scales, biases if with_biases else None, group_size=group_size, bits=bits,
                             mode=mode, dtype=dtype)

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return x @ dequantized(w, scales, biases, x).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        # The base is frozen: only x's cotangent is ever used; the others are lazy zeros nothing evaluates.
        return (cotangent @ dequantized(w, scales, biases, cotangent), mx.zeros_like(w), mx.zeros_like(scales),
                mx.zeros_like(biases))

    if with_biases:
        return matmul
    # Formats without biases (mxfp4 and kin): a zero stands in (unused) so that one custom function serves both.
    return lambda x, w, scales, biases: matmul(x, w, scales, mx.zeros((1,), dtype=dtype))


def _float_copy(module) -> mx.array | None:
    return module.__dict__.get("_float_weight")


def _product(module, x: mx.array) -> mx.array:
    """x times the module's weight transposed, through the float copy or a per-call dequantization."""
    weight = _float_copy(module)
    if weight is not None:
        return x @ weight.T
    biases = module.get("biases")
    matmul = _dequantized_matmul(module.group_size, module.bits, getattr(module, "mode", "affine"),
                                 biases is not None, _float_dtype(module))
    return matmul(x, module["weight"], module["scales"], biases)


class DequantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear (same parameters, same results) that multiplies through dequantized weights."""

    def __call__(self, x):
        y = _product(self, x)
        return y + self["bias"] if "bias" in self else y


class DequantizedEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose tied-head product (`as_linear`) multiplies through dequantized weights."""

    def __call__(self, x):
        weight = _float_copy(self)
        return super().__call__(x) if weight is None else weight[x]

    def as_linear(self, x):
        return _product(self, x)


SUBCLASSES = {nn.QuantizedLinear: DequantizedLinear, nn.QuantizedEmbedding: DequantizedEmbedding}


def _is_quantized(module) -> bool:
    return type(module) in SUBCLASSES or type(module) in SUBCLASSES.values()


def quantized_modules(model) -> list:
    """The model's quantized linear and embedding layers (whatever wraps them, e.g. LoRA)."""
    return [m for _, m in model.named_modules() if _is_quantized(m)]


def _float_dtype(module):
    """The dtype of the module's weight as floats: its scales' (affine), else float32 (mxfp4 and kin, whose
    integer scales would otherwise make MLX dequantize to bfloat16, slow on the CPU; their values are exact in
    float32)."""
    scales = module["scales"].dtype
    return scales if mx.issubdtype(scales, mx.floating) else mx.float32


def _dequantize(module) -> mx.array:
    return mx.dequantize(module["weight"], module["scales"], module.get("biases"), group_size=module.group_size,
                         bits=module.bits, mode=getattr(module, "mode", "affine"), dtype=_float_dtype(module))


def float_weight_bytes(model) -> int:
    """Bytes the float copies of every quantized weight would take."""
    total = 0
    for module in quantized_modules(model):
        rows, packed = module["weight"].shape
        total += rows * (packed * 32 // module.bits) * _float_dtype(module).size
    return total


def requested_path() -> str | None:
    """The path MLXTUNE_DEQUANTIZE asks for, or None to let the budget decide."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in PATHS:
        raise UsageError(f"{ENV}={value} is not a way to compute quantized layers",
                         f"use one of {', '.join(PATHS)}, or leave it unset to choose by the memory budget")
    return value


def choose_path(float_bytes: int, budget: int | None = None, on_cpu: bool | None = None) -> str:
    """`off` (MLX's quantized kernels), `call` or `load` for a model whose float copies take `float_bytes`."""
    from mlxtune.memory.budget import machine_budget
    from mlxtune.memory.estimate import quantized_path

    if on_cpu is None:
        on_cpu = mx.default_device() == mx.cpu
    if not on_cpu:
        return "off"  # Metal/CUDA: MLX's quantized kernels are the fast path there
    requested = requested_path()
    if requested is not None:
        return requested
    return quantized_path(float_bytes, budget if budget is not None else machine_budget()[0])


def quantized_head(model):
    """The quantized module that makes the logits: `lm_head`, or the embedding of a model without one (tied)."""
    modules = dict(model.named_modules())
    head = modules.get("lm_head", None if "lm_head" in modules else modules.get("model.embed_tokens"))
    return head if _is_quantized(head) else None


def use_path(model, path: str) -> int:
    """Make every quantized layer of `model` compute by `path`; returns how many layers it changed.

    With `call` the head keeps a float copy too: every loss chunk would dequantize it, and the chunks' copies are
    alive together (a 152k-vocabulary head, 545 MB in float32, 7.3 copies at the peak of an 8-chunk step)."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}")
    modules = quantized_modules(model)
    head = quantized_head(model)
    for module in modules:
        base = next(b for b in SUBCLASSES if isinstance(module, b))
        wanted = base if path == "off" else SUBCLASSES[base]
        copy = _float_copy(module)
        if type(module) is wanted and (copy is not None) == (path == "load") and (
                copy is None or copy.dtype == _float_dtype(module)):
            continue  # already computing this way (loading did it; training chose the same): nothing to redo
        # (a copy made before training upcast the model to float32 is made again, in float32)
        module.__class__ = wanted
        # Outside the module's parameter tree on purpose (not saved, trained, counted or fused).
        copy = path == "load" or (path == "call" and module is head)
        module.__dict__["_float_weight"] = _dequantize(module) if copy else None
    mx.eval([copy for m in modules if (copy := m.__dict__.get("_float_weight")) is not None])
    return len(modules)


def match_dtype(model) -> None:
    """After the model's floats were cast (`set_dtype`, a float32 comparison), make its float copies again in the
    new dtype: a float16 copy under float32 scales would compute with weights rounded to float16 (the fuse check
    on SmolLM2 saw 0.13 in log-probability from it)."""
    stale = [m for m in quantized_modules(model)
             if (copy := _float_copy(m)) is not None and copy.dtype != _float_dtype(m)]
    for module in stale:
        module.__dict__["_float_weight"] = _dequantize(module)
    mx.eval([m.__dict__["_float_weight"] for m in stale])


def accelerate_quantized(model, budget: int | None = None) -> str | None:
    """On the CPU backend, make a quantized base compute through dequantized weights, the path chosen from the
    memory `budget` (bytes; None: this machine's). Returns a line saying what was done, or None."""
    if not quantized_modules(model) or mx.default_device() != mx.cpu:
        return None  # Metal/CUDA: nothing changes
    float_bytes = float_weight_bytes(model)
    path = choose_path(float_bytes, budget, on_cpu=True)
    use_path(model, path)
    return describe(path, float_bytes, forced=requested_path() is not None)


def describe(path: str, float_bytes: int, forced: bool = False) -> str:
    from mlxtune.memory.budget import fmt_gb

    why = f"{ENV}={path}" if forced else None
    if path == "load":
        return (f"quantized base: computing through float weights dequantized once ({fmt_gb(float_bytes)}"
                + (f"; {why})" if why else ")"))
    if path == "call":
        return ("quantized base: dequantizing each layer as it computes ("
                + (why or f"float copies, {fmt_gb(float_bytes)}, would not fit a quarter of the memory budget") + ")")
    return f"quantized base: MLX's quantized kernels ({ENV}=off; slow on the CPU backend)"


def policy(budget: int) -> str:
    """What `mlxtune doctor` says about quantized bases on this machine (with `budget`, the training budget)."""
    from mlxtune.memory.budget import fmt_gb
    from mlxtune.memory.limits import DEQUANTIZED_COPY_SHARE

    if mx.default_device() != mx.cpu:
        return "MLX's quantized kernels (not the CPU backend: nothing to change)"
    try:
        requested = requested_path()
    except UsageError as error:
        return str(error)
    if requested == "off":
        return f"MLX's quantized kernels ({ENV}=off; ~35× slower than dequantizing on the CPU backend)"
    if requested is not None:
        return f"dequantized {'once at load' if requested == 'load' else 'per call'} ({ENV}={requested})"
    return (f"dequantized: once at load when the float weights fit {fmt_gb(DEQUANTIZED_COPY_SHARE * budget)} "
            f"(a quarter of the budget), else per call ({ENV}=off|call|load overrides)")
