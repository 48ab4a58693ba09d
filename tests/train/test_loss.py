"""The selective loss equals the full masked cross-entropy, in value and in gradients."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm import load

from conftest import MODEL, WWDC25
from mlxtune import LoraSettings
from mlxtune.data import load_datasets
from mlxtune.data.batching import make_batch
from mlxtune.train.adapters import attach_adapters
from mlxtune.train.loss import Loss, full_loss_sum, output_head, supports_selective_loss


def _model_and_batch():
    model, tokenizer = load(str(MODEL))
    attach_adapters(model, LoraSettings(rank=4))
    # non-zero lora_b, so every adapter weight gets a gradient
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    datasets = load_datasets(WWDC25, tokenizer, max_seq_length=300)
    return model, make_batch(datasets.train[:3])  # prompt-masked examples of different lengths


def test_stories260k_head_is_separable():
    model, _ = load(str(MODEL))
    assert supports_selective_loss(model)


def _head_module(model):
    head = output_head(model)
    return getattr(head, "__self__", head)


@pytest.mark.parametrize(("head_trains", "kept_softmax_bytes", "for_gradient"), [
    (False, 512 * 2**20, True), (True, 512 * 2**20, True), (True, 0, True), (False, 512 * 2**20, False)],
    ids=["frozen-head-fused", "trainable-head-softmax-kept", "trainable-head-recomputed", "forward-function"])
def test_selective_loss_and_gradients_equal_the_full_masked_cross_entropy(head_trains, kept_softmax_bytes,
                                                                         for_gradient, monkeypatch):
    """Every way the selective loss makes its gradient: a frozen head's fused chunks (LoRA's training path), a
    trainable head's kept softmax and, past the budget, its recomputed chunks (the head's own parameters must get
    their gradient there too), and the forward function differentiated as it is."""
    import mlxtune.train.loss as loss_module

    monkeypatch.setattr(loss_module, "KEPT_SOFTMAX_BYTES", kept_softmax_bytes)
    model, batch = _model_and_batch()
    if head_trains:
        _head_module(model).unfreeze()
    selective = Loss(model, selective=True)
    assert selective.selective
    assert 0 < batch.supervised_tokens < batch.inputs.size  # masking really removes positions
    grad_full = nn.value_and_grad(model, full_loss_sum)
    grad_selective = nn.value_and_grad(model, selective.for_gradient if for_gradient else selective)
    (full_sum, full_count), full_grads = grad_full(model, mx.array(batch.inputs), mx.array(batch.targets),
                                                   mx.array(batch.mask))
    (sel_sum, sel_count), sel_grads = grad_selective(model, *selective.arrays(batch))
    assert sel_count.item() == full_count.item() == batch.supervised_tokens
    assert abs(sel_sum.item() - full_sum.item()) <= 1e-4 * abs(full_sum.item())
    full_flat, sel_flat = dict(tree_flatten(full_grads)), dict(tree_flatten(sel_grads))
    assert full_flat.keys() == sel_flat.keys()
    assert head_trains == any("embed_tokens" in name or "lm_head" in name for name in full_flat)
    for name, expected in full_flat.items():
        expected, actual = np.array(expected), np.array(sel_flat[name])
        assert np.abs(actual - expected).max() <= 1e-4 * max(np.abs(expected).max(), 1e-6), name


def test_full_loss_fallback_when_asked():
    model, batch = _model_and_batch()
    full = Loss(model, selective=False)
    assert not full.selective
    loss_sum, count = full(model, *full.arrays(batch))
    # the masked cross-entropy, computed here in float64 numpy from the model's logits
    logits = np.array(model(mx.array(batch.inputs)).astype(mx.float32), dtype=np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, batch.targets[..., None].astype(np.int64), -1)[..., 0]
    assert count.item() == batch.mask.sum() == batch.supervised_tokens
    assert loss_sum.item() == pytest.approx(-(picked * batch.mask).sum(), rel=1e-5)


class _Embedding(nn.Module):
    """A model body whose hidden states are its tokens' embeddings: the loss is all there is to measure."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)

    def __call__(self, inputs, cache=None):
        return self.embed(inputs)


class _Model(nn.Module):
    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.model = _Embedding(vocab, width)
        self.head = nn.Linear(width, vocab, bias=False)


def test_evaluation_keeps_no_chunk_softmax():
    """Forward only (validation), the selective loss holds a few chunk-sized arrays per stream, as the memory
    estimate counts them (`memory/estimate.py`, EVAL_CHUNKS_ARRAYS), however many chunks: through
    `cross_entropy_sum` every chunk's softmax stayed alive beside its sum until the total, a [rows, vocab] softmax
    on a long validation batch that the estimate never counted (issue 24)."""
    from mlxtune.memory.estimate import EVAL_CHUNKS_ARRAYS
    from mlxtune.memory.limits import chunk_rows
    from mlxtune.train.loss import loss_streams, make_selective_loss_sum

    vocab, width = 2048, 8
    chunk, streams = chunk_rows(vocab), len(loss_streams())
    rows = 12 * streams * chunk  # twelve chunks per stream: kept softmaxes would be twelve arrays and more
    model = _Model(vocab, width)
    mx.eval(model.parameters())
    loss = make_selective_loss_sum(model.head, vocab)
    inputs = mx.random.randint(0, vocab, (1, rows))
    positions, targets, weights = mx.arange(rows), mx.random.randint(0, vocab, (rows,)), mx.ones((rows,))
    mx.eval(inputs, positions, targets, weights)
    mx.eval(loss(model, inputs, positions, targets, weights))
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(loss(model, inputs, positions, targets, weights))
    arrays_per_stream = (mx.get_peak_memory() - base) / (streams * chunk * vocab * 4)
    assert arrays_per_stream <= EVAL_CHUNKS_ARRAYS + 1.5, arrays_per_stream  # measured 5.0–5.5
