"""The blocks' SwiGLU on the CPU backend (mlxtune/cpu_activations.py): mlx-lm's function, written with exp."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import MODEL
from mlxtune.cpu_activations import swiglu, uses_fast_swiglu


def mlx_lm_swiglu(gate, x):
    return nn.silu(gate) * x  # mlx_lm/models/activations.py's body


def test_the_exp_form_is_mlx_lms_swiglu_and_its_gradient():
    gate = mx.concatenate([mx.random.normal((4096,), key=mx.random.key(0)) * 4,
                           mx.array([0.0, 1e-4, -1e-4, 30.0, -30.0, 100.0, -100.0, 200.0, -200.0])])
    x = mx.random.normal(gate.shape, key=mx.random.key(1)) * 3
    cotangent = mx.random.normal(gate.shape, key=mx.random.key(2))
    ours, theirs = swiglu(gate, x), mlx_lm_swiglu(gate, x)
    assert np.isfinite(np.array(ours)).all()
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=2e-6, atol=1e-6)
    ours_grad = mx.vjp(swiglu, [gate, x], [cotangent])[1]
    theirs_grad = mx.vjp(mlx_lm_swiglu, [gate, x], [cotangent])[1]
    for a, b in zip(ours_grad, theirs_grad):
        assert np.isfinite(np.array(a)).all()
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=2e-5, atol=2e-6)
    # compiled, as the training step runs it
    compiled = mx.compile(lambda g, u, c: mx.vjp(swiglu, [g, u], [c])[1])
    for a, b in zip(compiled(gate, x, cotangent), theirs_grad):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=2e-5, atol=2e-6)


LOADED = f"""
import json
from mlxtune.models import load_model
from mlxtune.cpu_activations import uses_fast_swiglu
from pathlib import Path
model, _, _ = load_model(Path({str(MODEL)!r}))
print(json.dumps({{"fast": uses_fast_swiglu(model)}}))
"""


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU backend only")
def test_a_model_loaded_on_the_cpu_computes_its_swiglu_through_the_exp_form_unless_turned_off():
    """Every command loads through models.load_model: its blocks' module must name ours (mlx-lm binds `swiglu` in
    each model module at import; the swap replaces that name). MLXTUNE_FAST_SWIGLU=off keeps mlx-lm's."""
    results = {}
    for setting in (None, "off"):
        env = {k: v for k, v in os.environ.items() if k != "MLXTUNE_FAST_SWIGLU"}
        if setting:
            env["MLXTUNE_FAST_SWIGLU"] = setting
        done = subprocess.run([sys.executable, "-c", LOADED], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        results[setting] = json.loads(done.stdout.strip().splitlines()[-1])["fast"]
    assert results == {None: True, "off": False}


def test_the_swap_changes_a_models_output_by_rounding_only():
    from mlx_lm.models import activations
    from mlx_lm.utils import load

    from mlxtune.cpu_activations import use_fast_swiglu

    model, _ = load(str(MODEL))
    tokens = mx.array([[1, 5, 9, 200, 3, 77, 12]])
    original = getattr(activations, "_mlxtune_original_swiglu", activations.swiglu)
    module = sys.modules[type(model.layers[0].mlp).__module__]
    saved = module.swiglu
    try:
        module.swiglu = original
        before = model(tokens)
        assert use_fast_swiglu(model) == (mx.default_device() == mx.cpu)
        assert uses_fast_swiglu(model) == (mx.default_device() == mx.cpu)
        after = model(tokens)
    finally:
        module.swiglu = saved
    np.testing.assert_allclose(np.array(after), np.array(before), rtol=1e-4, atol=1e-4)
