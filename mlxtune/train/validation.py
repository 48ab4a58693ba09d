"""Loss of a model on tokenized examples: the number the training loop, the fuse check and the user all compare."""

from __future__ import annotations

import math

import mlx.core as mx

from mlxtune.data.batching import evaluation_batches
from mlxtune.faults import fault_point
from mlxtune.data.template import TokenizedExample
from mlxtune.train.loss import Loss


def validation_loss(
    model, examples: list[TokenizedExample], batch_size: int = 4, max_batches: int = -1, loss: Loss | None = None,
    parallel=None,
) -> float:
    """Mean loss per supervised token (nats); NaN when there is nothing to evaluate. With a `parallel`
    (train.parallel.DataParallel) each rank computes its share of the batches and the sums are added up."""
    if not examples:
        return math.nan
    loss = loss or Loss(model)
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for index, batch in enumerate(evaluation_batches(examples, batch_size, max_batches)):
        if parallel is not None and not parallel.mine(index):
            continue
        loss_sum, n = loss(model, *loss.arrays(batch))
        total, count = total + loss_sum, count + n
        mx.eval(total, count)
        fault_point("eval.batch")
    if parallel is not None:
        total, count = parallel.sum(total, count)
    if was_training:
        model.train()
    return (total / count).item() if count.item() else math.nan
