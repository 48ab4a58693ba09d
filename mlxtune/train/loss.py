"""The loss, computed only where it counts.

The selective path takes the final hidden states, gathers the supervised positions and applies the output head
and cross-entropy to those rows only, chunk by chunk under `mx.checkpoint`, so the `[batch, seq, vocab]` logits
are never materialised (for a 150k vocabulary they dominate memory). The head is found per model and checked
against the model's own forward pass; where they disagree (logit soft-capping, scaling…) the full computation is
used instead.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxtune.data.batching import Batch

CHUNK_ROWS = 1024  # supervised positions per head+cross-entropy chunk


def full_loss_sum(model, inputs: mx.array, targets: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Sum of the cross-entropy over supervised targets (full logits), and how many there are."""
    logits = model(inputs).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets) * mask
    return losses.sum(), mask.sum()


def output_head(model):
    """hidden → logits for mlx-lm models shaped `model.model` + (`lm_head` | tied embeddings); None otherwise."""
    inner = getattr(model, "model", None)
    if inner is None or not callable(inner):
        return None
    args = getattr(model, "args", None)
    tied = getattr(args, "tie_word_embeddings", False)
    if not tied and isinstance(getattr(model, "lm_head", None), nn.Module):
        return model.lm_head
    embed = getattr(inner, "embed_tokens", None)
    if embed is not None and hasattr(embed, "as_linear"):
        return embed.as_linear
    return None


def supports_selective_loss(model) -> bool:
    """True when head(model.model(x)) reproduces model(x): then the head can be applied to chosen rows only."""
    head = output_head(model)
    if head is None:
        return False
    probe = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=mx.int32)
    try:
        expected = model(probe).astype(mx.float32)
        actual = head(model.model(probe)).astype(mx.float32)
        scale = mx.abs(expected).max() + 1e-6
        return bool((mx.abs(expected - actual).max() / scale).item() < 1e-3)
    except Exception:  # an architecture whose inner model needs other arguments
        return False


def make_selective_loss_sum(head):
    def chunk_loss(hidden_rows, targets, weights):
        # Recompute the chunk's logits in the backward pass instead of keeping them. Only the hidden rows are
        # arguments: the integer targets and the weights are constants of the chunk, not things to differentiate.
        def loss_of_rows(rows):
            logits = head(rows).astype(mx.float32)
            return (nn.losses.cross_entropy(logits, targets) * weights).sum()

        return mx.checkpoint(loss_of_rows)(hidden_rows)

    def selective_loss_sum(model, inputs, positions, targets, weights):
        hidden = model.model(inputs)
        rows = hidden.reshape(-1, hidden.shape[-1])[positions]
        total = mx.array(0.0)
        for start in range(0, positions.shape[0], CHUNK_ROWS):
            end = start + CHUNK_ROWS
            total = total + chunk_loss(rows[start:end], targets[start:end], weights[start:end])
        return total, weights.sum()

    return selective_loss_sum


class Loss:
    """The loss a run uses and the arrays it takes from a batch."""

    def __init__(self, model, selective: bool = True):
        self.selective = selective and supports_selective_loss(model)
        self.function = make_selective_loss_sum(output_head(model)) if self.selective else full_loss_sum

    def arrays(self, batch: Batch) -> tuple[mx.array, ...]:
        if self.selective:
            return (mx.array(batch.inputs), mx.array(batch.positions), mx.array(batch.position_targets),
                    mx.array(batch.position_weights))
        return mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask)

    def __call__(self, model, *arrays):
        return self.function(model, *arrays)
