"""One optimizer step: the learning-rate schedule's values, accumulation equal to one large batch, clipping."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm import load

from conftest import MODEL, WWDC25
from mlxtune import LoraSettings
from mlxtune.data import load_datasets
from mlxtune.data.batching import make_batch
from mlxtune.train.adapters import attach_adapters
from mlxtune.train.loss import Loss
from mlxtune.train.step import TrainStep, build_optimizer, default_warmup, learning_rate_schedule

PEAK = 1e-3


def _lr(schedule: str, step: int, warmup: int | None = 4, total: int = 14) -> float:
    settings = LoraSettings(learning_rate=PEAK, schedule=schedule, warmup_steps=warmup)
    return learning_rate_schedule(settings, total)(mx.array(step)).item()


@pytest.mark.parametrize("schedule, step, expected", [
    # warmup: linear from peak/warmup, the first step already learns
    ("cosine", 0, PEAK / 4), ("cosine", 1, PEAK / 2), ("cosine", 3, PEAK), ("cosine", 4, PEAK),
    # cosine over the 10 steps after warmup: half way is half the peak, the end is zero
    ("cosine", 9, PEAK * 0.5), ("cosine", 6, PEAK * 0.5 * (1 + math.cos(math.pi * 0.2))), ("cosine", 14, 0.0),
    ("linear", 0, PEAK / 4), ("linear", 6, PEAK * 0.8), ("linear", 9, PEAK * 0.5), ("linear", 14, 0.0),
    ("constant", 0, PEAK / 4), ("constant", 9, PEAK), ("constant", 14, PEAK),
])
def test_schedule_values(schedule, step, expected):
    assert _lr(schedule, step) == pytest.approx(expected, rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("warmup, step, expected", [
    (1, 0, PEAK), (1, 1, PEAK),  # one warmup step is already the peak (not half of it)
    (0, 0, PEAK), (0, 7, PEAK * 0.5),  # no warmup: cosine over all 14 steps, from the first
])
def test_schedule_with_no_or_one_warmup_step(warmup, step, expected):
    assert _lr("cosine", step, warmup=warmup) == pytest.approx(expected, rel=1e-5)


def test_default_warmup_is_five_percent_of_the_steps():
    assert default_warmup(LoraSettings(), 100) == 5 and default_warmup(LoraSettings(warmup_steps=0), 100) == 0
    assert default_warmup(LoraSettings(), 19) == 0 and default_warmup(LoraSettings(), 20) == 1  # short runs: none
    assert _lr("constant", 0, warmup=None, total=100) == pytest.approx(PEAK / 5, rel=1e-5)


@pytest.fixture(scope="module")
def model_and_examples():
    model, tokenizer = load(str(MODEL))
    attach_adapters(model, LoraSettings(rank=4))
    mx.random.seed(0)
    # non-zero lora_b, so every adapter weight gets a gradient
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    examples = load_datasets(WWDC25, tokenizer, max_seq_length=160).train[:4]
    return model, examples


def _flat(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def test_accumulating_two_micro_batches_equals_one_large_batch(model_and_examples):
    model, examples = model_and_examples
    step = TrainStep(model, optim.SGD(learning_rate=0.0), 0.0, Loss(model))
    loss_two, count_two, grads_two = step.accumulate([make_batch(examples[:2]), make_batch(examples[2:])])
    loss_one, count_one, grads_one = step.accumulate([make_batch(examples)])
    assert count_two.item() == count_one.item() > 0
    assert loss_two.item() == pytest.approx(loss_one.item(), rel=1e-5)
    one, two = _flat(grads_one), _flat(grads_two)
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-6 * np.abs(one[name]).max(), err_msg=name)


@pytest.mark.parametrize("clip", [0.0, 1e-3], ids=["off", "clipped"])
def test_update_applies_the_mean_gradient_clipped_to_the_norm(model_and_examples, clip):
    model, examples = model_and_examples
    before = _flat(model.trainable_parameters())
    # SGD with learning rate 1: the change of the weights is exactly the (clipped) gradient that was applied
    step = TrainStep(model, optim.SGD(learning_rate=1.0), clip, Loss(model))
    _, count, grads = step.accumulate([make_batch(examples)])
    mean = {k: v / count.item() for k, v in _flat(grads).items()}
    mean_norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in mean.values()))
    reported = step.update(grads, count).item()
    after = _flat(model.trainable_parameters())
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in before.items()]))  # as it was, for the other tests
    applied = {k: before[k] - after[k] for k in before}
    applied_norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in applied.values()))
    assert reported == pytest.approx(mean_norm, rel=1e-4)  # the norm before clipping
    assert mean_norm > 1e-3  # so the clipped case really clips
    if clip:
        assert applied_norm == pytest.approx(clip, rel=1e-3)
        scale = clip / mean_norm
    else:
        assert applied_norm == pytest.approx(mean_norm, rel=1e-4)
        scale = 1.0
    for name in mean:  # same direction as the mean gradient
        np.testing.assert_allclose(applied[name], mean[name] * scale, rtol=1e-3, atol=1e-7, err_msg=name)



def test_the_optimizer_is_adamw_with_bias_correction():
    """PyTorch's AdamW: with bias correction the first update of every weight is lr·g/(|g|+eps) ≈ lr·sign(g); MLX's
    default (none) would move it √(1−β2)/(1−β1) ≈ 0.32 of that, so a learning rate would not mean what it means."""
    settings = LoraSettings(learning_rate=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0)
    optimizer = build_optimizer(settings, 10)
    weights = {"w": mx.array([1.0, -2.0, 3.0])}
    gradient = {"w": mx.array([0.5, -4.0, 1e-3])}
    updated = optimizer.apply_gradients(gradient, weights)
    np.testing.assert_allclose(np.array(updated["w"]), [1.0 - 1e-2, -2.0 + 1e-2, 3.0 - 1e-2 * 1e-3 / (1e-3 + 1e-8)],
                               rtol=1e-6)


def test_a_rank_without_batches_adds_nothing(model_and_examples):
    """A data-parallel rank with no share of a short batch contributes zero loss, zero tokens and zero gradients
    shaped like the adapters (the all-reduce sums them with the other ranks')."""
    model, _ = model_and_examples
    step = TrainStep(model, optim.SGD(learning_rate=0.0), 0.0, Loss(model))
    loss_sum, count, grads = step.accumulate([None, None])
    assert loss_sum.item() == 0.0 and count.item() == 0.0
    expected = _flat(model.trainable_parameters())
    actual = _flat(grads)
    assert actual.keys() == expected.keys() and actual
    assert all(actual[k].shape == expected[k].shape and not actual[k].any() for k in actual)
