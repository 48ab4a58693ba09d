"""SwiGLU at full speed on MLX's CPU backend: the same function written with `exp`, which MLX compiles well there.

Every block of the Llama family (Llama, Qwen2/3, Mistral, SmolLM, …) computes `silu(gate) * up` through mlx-lm's
`swiglu` (mlx_lm/models/activations.py). On the CPU backend MLX's sigmoid is a scalar function of about 20 ns an
element, forward and backward; on SmolLM2-135M that was ~2.5 s of a 14 s GRPO step, all of it on one core while the
other waited. Written as `gate · up / (1 + exp(−gate))` the whole product is one fused kernel around `exp`, which
MLX's kernel compiler turns into ≈4.5 ns an element once it may use the CPU's FMA instructions
(backend.py, `enable_fast_jit`). Its gradient is written out the same way, from the two inputs (a custom VJP): ≈4×
faster than the sigmoid's, and it keeps less for the backward pass than the composition did.

The same function: silu(g) = g · σ(g) = g / (1 + e^−g), within float32 rounding of mlx-lm's, and so is its
gradient (tests/test_cpu_activations.py). The limits hold: e^−g overflows to ∞ for g ≪ 0 and the product goes to
−0, as g · σ(g) does.

How it is swapped in: mlx-lm's model modules bind `swiglu` when they are imported (`from .activations import
swiglu`), so both the activations module's name (for modules imported later) and the name in each module a loaded
model's blocks come from are replaced — module globals, not a private API, but a layout an mlx-lm upgrade could change
(tests/test_mlx_lm_private.py checks it). Only on the CPU backend: Metal and CUDA have fast sigmoid kernels, and
keep mlx-lm's function exactly. `MLXTUNE_FAST_SWIGLU=off` keeps it everywhere.
"""

from __future__ import annotations

import sys
from functools import partial

import mlx.core as mx

from mlxtune.backend import switched_off

ENV = "MLXTUNE_FAST_SWIGLU"


@partial(mx.compile, shapeless=True)
def _swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return gate * x / (1 + mx.exp(-gate))


@partial(mx.compile, shapeless=True)
def _swiglu_vjp(gate: mx.array, x: mx.array, cotangent: mx.array) -> tuple[mx.array, mx.array]:
    sigmoid = 1 / (1 + mx.exp(-gate))
    silu = gate * sigmoid
    # d silu / d gate = σ + g·σ·(1 − σ)
    return cotangent * x * (sigmoid + silu * (1 - sigmoid)), cotangent * silu


@mx.custom_function
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) · x, as gate · x / (1 + exp(−gate))."""
    return _swiglu(gate, x)


@swiglu.vjp
def _swiglu_backward(primals, cotangent, output):
    # From the inputs alone (the backward pass keeps gate and x, which it keeps anyway), not from what the forward
    # computed: the composition's own gradient kept more [tokens, hidden] temporaries per block.
    return _swiglu_vjp(*primals, cotangent)


def _mlx_lm_swiglu():
    from mlx_lm.models import activations

    return getattr(activations, "_mlxtune_original_swiglu", activations.swiglu)


def fast_swiglu_wanted() -> bool:
    """On the CPU backend, unless MLXTUNE_FAST_SWIGLU turns it off."""
    return mx.default_device() == mx.cpu and not switched_off(ENV)


def use_fast_swiglu(model=None) -> bool:
    """On the CPU backend, mlx-lm's `swiglu` becomes `swiglu` above: for model modules imported from now on and for
    those `model`'s layers come from. True when it is in use."""
    if not fast_swiglu_wanted():
        return False
    from mlx_lm.models import activations

    original = _mlx_lm_swiglu()
    activations._mlxtune_original_swiglu = original
    activations.swiglu = swiglu
    modules = {type(layer).__module__ for _, layer in model.named_modules()} if model is not None else set()
    modules |= {name for name in sys.modules if name.startswith("mlx_lm.models.")}
    for name in modules:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "swiglu", None) is original:
            module.swiglu = swiglu
    return True


def uses_fast_swiglu(model) -> bool:
    """True when some layer of `model` computes through the swapped `swiglu` (its module's name is ours)."""
    return any(getattr(sys.modules.get(type(layer).__module__), "swiglu", None) is swiglu
               for _, layer in model.named_modules())
