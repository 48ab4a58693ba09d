"""Quantized bases on the CPU backend compute through dequantized weights (mlxtune/cpu_quantized.py): the same
outputs and gradients as MLX's quantized kernels, the same parameters, fused and saved models unchanged, the path
chosen by the memory budget (memory.quantized_path) or MLXTUNE_DEQUANTIZE."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from conftest import WIKISQL, run_cli
from mlxtune.cpu_quantized import (DequantizedEmbedding, DequantizedLinear, ENV, accelerate_quantized, choose_path,
                                   float_weight_bytes, policy, use_path)
from mlxtune.errors import UsageError
from mlxtune.memory.estimate import quantized_path

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU backend's path")


def quantized_linear(bits=4, group_size=32, bias=True, out_dims=96, in_dims=128, seed=0,
                     mode="affine") -> nn.QuantizedLinear:
    mx.random.seed(seed)
    return nn.QuantizedLinear.from_linear(nn.Linear(in_dims, out_dims, bias=bias), group_size, bits, mode=mode)


def close(a, b, scale=1.0):
    """Equal within float32 rounding of sums over ~100 terms of magnitude `scale`."""
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5 * scale)


def outputs_and_gradients(module, x):
    """The module's output, and the gradients of a loss through it w.r.t. its trainable parameters and the input."""

    def loss(params, x):
        module.update(params)
        return (module(x) ** 2).sum()

    value, (grads, x_grad) = mx.value_and_grad(loss, argnums=(0, 1))(module.trainable_parameters(), x)
    return module(x), value, dict(tree_flatten(grads)), x_grad


@pytest.mark.parametrize("path", ["call", "load"])
@pytest.mark.parametrize("bits,group_size,bias,mode", [(4, 32, True, "affine"), (4, 64, False, "affine"),
                                                       (8, 32, True, "affine"), (3, 32, False, "affine"),
                                                       (4, 32, True, "mxfp4")])
def test_linear_equals_the_quantized_kernel(path, bits, group_size, bias, mode):
    layer = quantized_linear(bits, group_size, bias, mode=mode)
    assert float_weight_bytes(layer) == 96 * 128 * 4
    x = mx.random.normal((2, 5, 128))
    expected = layer(x)
    assert use_path(layer, path) == 1
    assert type(layer) is DequantizedLinear and isinstance(layer, nn.QuantizedLinear)
    close(layer(x), expected)
    use_path(layer, "off")
    assert type(layer) is nn.QuantizedLinear


@pytest.mark.parametrize("path", ["call", "load"])
@pytest.mark.parametrize("adapter", [LoRALinear, DoRALinear])
def test_adapter_gradients_equal_the_quantized_kernel(path, adapter):
    # mlx-lm's DoRA layer dequantizes its base weight itself (it needs it for the norm): the swap must leave it alone.
    base = quantized_linear()
    layer = adapter.from_base(base, r=4, scale=2.0)
    layer.freeze()
    layer.unfreeze(keys=["lora_a", "lora_b"] + (["m"] if adapter is DoRALinear else []), strict=False)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1  # nonzero, so every gradient term counts
    x = mx.random.normal((3, 7, 128))
    kernel = outputs_and_gradients(layer, x)
    use_path(layer, path)
    ours = outputs_and_gradients(layer, x)
    close(ours[0], kernel[0])
    close(ours[1], kernel[1], scale=float(kernel[1]))
    assert ours[2].keys() == kernel[2].keys() and ours[2]
    for name in kernel[2]:
        close(ours[2][name], kernel[2][name], scale=float(mx.abs(kernel[2][name]).max()))
    close(ours[3], kernel[3], scale=float(mx.abs(kernel[3]).max()))


@pytest.mark.parametrize("path", ["call", "load"])
def test_embedding_lookup_and_tied_head_equal_the_quantized_kernel(path):
    mx.random.seed(1)
    embedding = nn.QuantizedEmbedding.from_embedding(nn.Embedding(200, 64), 32, 4)
    ids = mx.array([[0, 5, 199, 5]])
    h = mx.random.normal((1, 4, 64))
    head_grad = mx.grad(lambda h: (embedding.as_linear(h) ** 2).sum())
    expected = embedding(ids), embedding.as_linear(h), head_grad(h)
    use_path(embedding, path)
    assert type(embedding) is DequantizedEmbedding
    np.testing.assert_array_equal(np.array(embedding(ids)), np.array(expected[0]))
    close(embedding.as_linear(h), expected[1])
    close(head_grad(h), expected[2], scale=float(mx.abs(expected[2]).max()))


def test_only_the_class_changes_parameters_stay_and_no_float_copy_is_a_parameter():
    model = nn.Sequential(quantized_linear(), quantized_linear(in_dims=96, out_dims=128, bias=False))
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    use_path(model, "load")
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()  # nothing added: the float copy is never saved, trained or counted
    for name, value in after.items():
        np.testing.assert_array_equal(np.array(value), before[name])
    assert model.layers[0].__dict__["_float_weight"].shape == (96, 128)
    assert float_weight_bytes(model) == (96 * 128 + 128 * 96) * 4


def test_fused_and_dequantized_models_come_out_as_from_the_kernel_path():
    from mlx_lm.utils import dequantize_model

    layers = [LoRALinear.from_base(quantized_linear(seed=s), r=4) for s in (0, 0)]
    for layer in layers:
        layer.lora_b = mx.ones(layer.lora_b.shape) * 0.01
    use_path(layers[1], "call")
    fused = [layer.fuse(dequantize=False) for layer in layers]  # re-quantized W + BA, as `fuse -q 4` does
    assert type(fused[0]) is type(fused[1]) is nn.QuantizedLinear
    for name, value in tree_flatten(fused[0].parameters()):
        np.testing.assert_array_equal(np.array(value), np.array(dict(tree_flatten(fused[1].parameters()))[name]))
    model = nn.Sequential(quantized_linear())
    use_path(model, "load")
    dequantize_model(model)  # the fuse of a QLoRA base's unadapted layers
    assert type(model.layers[0]) is nn.Linear


def test_per_call_path_holds_a_few_float_weights_at_a_time_not_all():
    # Sixteen 1024×1024 layers, 4 MB each as float32. Autodiff through a plain dequantize keeps every one from the
    # forward to the backward pass (18 weights' worth at the peak, measured); MLX's scheduler, left alone,
    # dequantizes them all up front (12). The custom VJP and the ordering hold it at ~4 however deep the model.
    mx.random.seed(2)
    model = nn.Sequential(*[nn.QuantizedLinear.from_linear(nn.Linear(1024, 1024, bias=False), 64, 4)
                            for _ in range(16)])
    mx.eval(model.parameters())
    use_path(model, "call")
    x = mx.random.normal((4, 1024))
    mx.eval(x)
    grad = mx.grad(lambda x: model(x).sum())
    mx.eval(grad(x))  # warm: MLX's buffer cache, not this pass, holds the first allocations
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(grad(x))
    assert mx.get_peak_memory() - base < 8 * 1024 * 1024 * 4


def test_the_path_follows_the_budget_the_override_and_the_backend(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert quantized_path(100, 400) == "load" and quantized_path(101, 400) == "call"
    assert choose_path(100, 400, on_cpu=True) == "load"
    assert choose_path(101, 400, on_cpu=True) == "call"
    assert choose_path(100, 400, on_cpu=False) == "off"  # Metal/CUDA keep MLX's kernels
    monkeypatch.setenv(ENV, "off")
    assert choose_path(100, 400, on_cpu=True) == "off"
    assert "35×" in policy(400)
    monkeypatch.setenv(ENV, "call")
    assert choose_path(100, 400, on_cpu=True) == "call"
    assert choose_path(100, 400, on_cpu=False) == "off"
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(UsageError, match="off, call, load"):
        choose_path(100, 400, on_cpu=True)


def test_accelerate_reports_what_it_did():
    model = nn.Sequential(quantized_linear())
    assert "dequantized once" in accelerate_quantized(model, budget=10**9)
    assert model.layers[0].__dict__["_float_weight"] is not None
    assert "each layer" in accelerate_quantized(model, budget=1000)
    assert model.layers[0].__dict__["_float_weight"] is None
    assert accelerate_quantized(nn.Sequential(nn.Linear(4, 4))) is None  # nothing quantized: nothing to say


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory):
    from mlxtune.synthetic import SHAPES, build_random_model

    shape = dict(SHAPES["smollm-135m"], hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)
    return build_random_model(shape, tmp_path_factory.mktemp("q4") / "model", layers=2, bits=4, group_size=32)


def test_compiled_qlora_steps_on_each_path_train_the_same_adapters(q4_model):
    from mlx_lm.utils import load_model

    from mlxtune.settings import LoraSettings
    from mlxtune.train.adapters import attach_adapters, trainable_weights
    from mlxtune.train.loss import Loss
    from mlxtune.train.step import TrainStep, build_optimizer

    mx.random.seed(3)
    tokens = mx.random.randint(0, 512, (2, 33))
    positions = mx.arange(2 * 32)
    arrays = (tokens[:, :-1], positions, tokens[:, 1:].reshape(-1), mx.ones((64,)))
    trained, losses, steps = {}, {}, []  # every TrainStep kept alive: MLX caches compiled graphs by function id
    for path in ("off", "call", "load"):
        model, _ = load_model(q4_model)
        settings = LoraSettings(rank=4, learning_rate=1e-3)
        mx.random.seed(0)
        attach_adapters(model, settings)
        use_path(model, path)
        steps.append(TrainStep(model, build_optimizer(settings, 10), 1.0, Loss(model)))
        for step in range(3):
            loss, count, grads = steps[-1].gradients(*arrays)
            mx.eval(steps[-1].update(grads, count), steps[-1].state)
            losses.setdefault(path, []).append(loss.item())
        trained[path] = trainable_weights(model)
    for path in ("call", "load"):
        np.testing.assert_allclose(losses[path], losses["off"], rtol=1e-5)
        assert trained[path].keys() == trained["off"].keys()
        for name, value in trained["off"].items():
            # Adam's first steps move each weight by ~lr·g/|g|: where g is tiny, float32 rounding of the gradient
            # shows at ~1e-4 of the largest weight. A wrong gradient would differ by the weights' own size.
            np.testing.assert_allclose(np.array(trained[path][name]), np.array(value), rtol=0,
                                       atol=1e-3 * float(mx.abs(value).max()))


def test_lora_cli_on_a_4bit_base_says_how_it_computes(q4_model, tmp_path):
    result = run_cli("lora", "--model", q4_model, "--data", WIKISQL, "--out", tmp_path / "run", "--iters", 1,
                     "--batch-size", 2, "--max-seq-length", 64, "--eval-every", 100, "--val-batches", 1)
    assert result.returncode == 0, result.stderr
    assert "quantized base: computing through float weights dequantized once" in result.stdout
    assert (tmp_path / "run" / "adapters.safetensors").is_file()


def test_a_bad_override_is_refused_before_any_run_directory_exists(q4_model, tmp_path, monkeypatch):
    from mlxtune import LoraSettings, finetune
    from mlxtune.ui import make_console

    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(UsageError, match=f"{ENV}=fast.*off, call, load"):
        finetune(LoraSettings(model=str(q4_model), data=str(WIKISQL), out=str(tmp_path / "run")),
                 console=make_console(quiet=True))
    assert not (tmp_path / "run").exists()


def test_doctor_says_how_quantized_layers_compute():
    result = run_cli("doctor", "--json", "--no-measure")
    assert result.returncode == 0, result.stderr
    assert "once at load" in json.loads(result.stdout)["quantized_layers"]
    result = run_cli("doctor")  # the table too
    assert "quantized layers" in result.stdout


def test_inference_loads_compute_dequantized_and_generate_what_the_kernel_generates(q4_model):
    """chat, generate, serve and eval load through models.load_model (via runs.open_for_inference): the same hook
    as training makes their quantized layers compute through dequantized weights, with the kernel's tokens."""
    from mlxtune.inference import generate_text
    from mlxtune.runs import open_for_inference

    loaded = open_for_inference(q4_model)
    layers = [m for _, m in loaded.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(type(m) is DequantizedLinear for m in layers)
    prompt = mx.array([[1, 17, 42, 99, 7, 300, 12]])
    dequantized_logits = loaded.model(prompt)
    dequantized_text = generate_text(loaded, "one two three", max_tokens=24, use_template=False)
    use_path(loaded.model, "off")
    assert all(type(m) is nn.QuantizedLinear for m in layers)
    close(dequantized_logits, loaded.model(prompt), scale=10)
    assert generate_text(loaded, "one two three", max_tokens=24, use_template=False) == dequantized_text


def test_a_float_copy_made_before_an_upcast_is_made_again_in_the_new_dtype():
    linear = nn.Linear(64, 32)
    linear.set_dtype(mx.float16)
    layer = nn.QuantizedLinear.from_linear(linear, 32, 4)
    use_path(layer, "load")
    assert layer.__dict__["_float_weight"].dtype == mx.float16
    use_path(layer, "load")  # loading did it, training asks again: kept
    layer.set_dtype(mx.float32)  # training on the CPU backend upcasts (train/loop.py)
    use_path(layer, "load")
    assert layer.__dict__["_float_weight"].dtype == mx.float32


def test_match_dtype_makes_stale_float_copies_again_after_a_cast():
    """fuse casts a loaded model to float32 to compare: the float16 copy made at load would otherwise compute with
    weights rounded to float16 under float32 scales."""
    from mlxtune.cpu_quantized import match_dtype

    linear = nn.Linear(64, 32)
    linear.set_dtype(mx.float16)
    layer = nn.QuantizedLinear.from_linear(linear, 32, 4)
    use_path(layer, "load")
    layer.set_dtype(mx.float32)
    match_dtype(layer)
    assert layer.__dict__["_float_weight"].dtype == mx.float32
    x = mx.random.normal((4, 64))
    kernel = mx.quantized_matmul(x, layer["weight"], layer["scales"], layer["biases"], group_size=32, bits=4)
    close(layer(x), kernel + layer["bias"])


def test_inference_on_a_half_precision_base_computes_in_float32_where_it_fits(tmp_path):
    """`mlxtune eval` upcasts a float16 base on the CPU backend (models.compute_in_float32): MLX has no fast float16
    matmul there (the imported SmolLM2's eval ran ~7x longer in float16). The float copies follow, and the logits
    are the float32 quantized kernel's; a budget too small for float32 leaves the model as it is."""
    from mlxtune.models import compute_in_float32
    from mlxtune.runs import open_for_inference
    from mlxtune.synthetic import SHAPES, build_random_model

    shape = dict(SHAPES["smollm-135m"], hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256)
    path = build_random_model(shape, tmp_path / "model", layers=1, dtype="float16", bits=4, group_size=32)
    loaded = open_for_inference(path)
    assert not compute_in_float32(loaded.model, budget=1000)  # does not fit: stays float16
    assert loaded.model.model.norm.weight.dtype == mx.float16
    assert compute_in_float32(loaded.model)
    floats = [v for _, v in tree_flatten(loaded.model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    assert floats and all(v.dtype == mx.float32 for v in floats)
    layers = [m for _, m in loaded.model.named_modules() if type(m) is DequantizedLinear]
    assert layers and all(m.__dict__["_float_weight"].dtype == mx.float32 for m in layers)
    prompt = mx.array([[1, 17, 42, 99, 7]])
    logits = loaded.model(prompt)
    use_path(loaded.model, "off")  # MLX's own quantized kernel, in float32 now
    close(logits, loaded.model(prompt), scale=10)
    assert not compute_in_float32(loaded.model)  # already float32: nothing to do
