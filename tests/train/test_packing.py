"""Packing: several examples per row give the same loss and gradients as the same examples unpadded apart."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm import load

from conftest import MODEL, WWDC25
from mlxtune import LoraSettings
from mlxtune.data import load_datasets
from mlxtune.data.batching import BatchPlan, make_batch, make_packed_batch, plan_epoch, training_batch
from mlxtune.train.adapters import attach_adapters
from mlxtune.train.loss import Loss, supports_packing


def _setup():
    model, tokenizer = load(str(MODEL))
    attach_adapters(model, LoraSettings(rank=4))
    mx.random.seed(0)  # the same adapter whatever ran before in this process (xdist workers differ)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    examples = load_datasets(WWDC25, tokenizer, max_seq_length=200).train[:4]
    return model, examples


def _value_and_grads(model, loss, batch):
    (total, count), grads = nn.value_and_grad(model, loss)(model, *loss.arrays(batch))
    return total.item(), count.item(), dict(tree_flatten(grads))


def test_packed_batch_equals_unpacked():
    model, examples = _setup()
    assert supports_packing(model)
    for selective in (True, False):
        loss = Loss(model, selective=selective)
        unpacked = _value_and_grads(model, loss, make_batch(examples))
        packed_batch = make_packed_batch([examples[:3], examples[3:]])
        assert packed_batch.inputs.shape[0] == 2 and packed_batch.segments.max() == 3
        packed = _value_and_grads(model, loss, packed_batch)
        assert packed[1] == unpacked[1]
        assert abs(packed[0] - unpacked[0]) <= 1e-4 * abs(unpacked[0])
        for name, expected in unpacked[2].items():
            expected, actual = np.array(expected), np.array(packed[2][name])
            assert np.abs(actual - expected).max() <= 1e-4 * max(np.abs(expected).max(), 1e-6), name


def test_without_the_mask_packing_would_leak_between_examples():
    model, examples = _setup()
    loss = Loss(model, selective=True)
    unpacked = _value_and_grads(model, loss, make_batch(examples))[0]
    leaking = make_packed_batch([examples])
    leaking.segments = np.where(leaking.segments > 0, 1, 0).astype(np.int32)  # one segment: examples see each other
    leaked = _value_and_grads(model, loss, leaking)[0]
    # Ten times the 1e-4 the masked packing must stay within (measured with this seed: 1.5e-2): the mask is what
    # keeps the examples apart, not luck.
    assert abs(leaked - unpacked) > 1e-3 * abs(unpacked)


def test_every_example_appears_once_per_epoch_in_every_mode():
    _, examples = _setup()
    tokenizer_examples = examples * 5  # 20 examples of varied length
    for plan in (BatchPlan(batch_size=3), BatchPlan(batch_tokens=600), BatchPlan(batch_tokens=600, pack=True,
                                                                                   row_length=300)):
        batches = plan_epoch(tokenizer_examples, plan, seed=1, epoch=0)
        seen = sorted(i for batch in batches for row in batch for i in row)
        assert seen == list(range(len(tokenizer_examples))), plan
        if plan.pack:
            for batch in batches:
                assert len(batch) <= 2
                assert all(sum(len(tokenizer_examples[i]) - 1 for i in row) <= 300 for row in batch)
        # deterministic: the same (seed, step) gives the same batch
        a, b = training_batch(tokenizer_examples, plan, 1, 3), training_batch(tokenizer_examples, plan, 1, 3)
        assert np.array_equal(a.inputs, b.inputs)


def test_position_list_is_padded_but_never_past_the_batch():
    """The supervised-position list rounds up to 128 (few compiled shapes) but stops at rows × length: a 2×32 batch
    scores 64 loss rows, not 128 (zero-weight rows cost the output head as much as real ones)."""
    from mlxtune.data.template import TokenizedExample

    def example(n):
        return TokenizedExample(np.arange(1, n + 1, dtype=np.int32), np.ones(n, bool), "test")

    small = make_batch([example(20), example(30)])  # 2 rows × 32, 48 supervised targets
    assert small.inputs.shape == (2, 32) and len(small.positions) == 64
    assert small.position_weights.sum() == 48
    large = make_batch([example(150), example(100)])  # 2 × 160 cells, 248 supervised: rounded up to 256
    assert large.inputs.shape == (2, 160) and len(large.positions) == 256
