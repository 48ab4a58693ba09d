"""Loss of a model on tokenized examples: the number the training loop, the fuse check and the user all compare."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from mlxtune.data.batching import Batch, evaluation_batches
from mlxtune.data.template import TokenizedExample


def batch_loss_sum(model, inputs: mx.array, targets: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Sum of the cross-entropy over supervised targets, and how many there are."""
    logits = model(inputs).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets) * mask
    return losses.sum(), mask.sum()


def as_arrays(batch: Batch) -> tuple[mx.array, mx.array, mx.array]:
    return mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask)


def validation_loss(
    model, examples: list[TokenizedExample], batch_size: int = 4, max_batches: int = -1
) -> float:
    """Mean loss per supervised token (nats); NaN when there is nothing to evaluate."""
    if not examples:
        return math.nan
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for batch in evaluation_batches(examples, batch_size, max_batches):
        loss_sum, n = batch_loss_sum(model, *as_arrays(batch))
        total, count = total + loss_sum, count + n
        mx.eval(total, count)
    if was_training:
        model.train()
    return (total / count).item() if count.item() else math.nan
