"""The loss, computed only where it counts.

The selective path takes the final hidden states, gathers the supervised positions and applies the output head
and cross-entropy to those rows only, chunk by chunk (recomputed in the backward pass once the kept softmax would
pass a memory budget), so the `[batch, seq, vocab]` logits are never materialised (for a 150k vocabulary they
dominate memory). The head is found per model and checked
against the model's own forward pass; where they disagree (logit soft-capping, scaling…) the full computation is
used instead.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from mlxtune.data.batching import Batch

# Chunks bound the peak memory of the head + cross-entropy, whose rows are vocabulary-sized, while staying large
# enough that each chunk is one big matmul rather than many small ones (a 32k vocabulary: 1024 rows = 128 MiB).
CHUNK_ROWS = 1024  # supervised positions per head+cross-entropy chunk, at most
# Keeping the softmax saves one exp pass in the backward (MLX's CPU exp is scalar and single-threaded); 512 MiB
# is the most memory we let that cost (about 900 rows of a 150k vocabulary); beyond it the softmax is recomputed.
KEPT_SOFTMAX_BYTES = 512 * 2**20  # float32 softmax kept for the backward pass, at most (else recomputed)
CHUNK_LOGITS_BYTES = 64 * 2**20  # and at most this much float32 logits per chunk (a 150k vocabulary: ~110 rows)


class SegmentMaskCache:
    """A pass-through per-layer "cache" whose only job is to hand mlx-lm's attention our packing mask.

    mlx-lm models build their mask with `create_attention_mask(h, cache)`, which asks `cache.make_mask(...)`;
    with offset 0 and keys/values passed straight through, the forward pass is the ordinary training pass.
    """

    offset = 0

    def __init__(self, segments: mx.array):
        length = segments.shape[1]
        same_example = segments[:, :, None] == segments[:, None, :]
        causal = mx.tril(mx.ones((length, length), dtype=mx.bool_))
        self.mask = (same_example & causal)[:, None]  # [rows, 1, length, length]

    def make_mask(self, length: int, return_array: bool = False, window_size: int | None = None):
        if window_size is not None and window_size < length:
            position = mx.arange(length)
            in_window = (position[:, None] - position[None, :]) < window_size
            return self.mask & in_window
        return self.mask

    def update_and_fetch(self, keys, values):
        return keys, values


def packing_cache(model, segments: mx.array | None):
    if segments is None:
        return None
    shared = SegmentMaskCache(segments)
    return [shared] * len(model.layers)


def full_loss_sum(model, inputs: mx.array, targets: mx.array, mask: mx.array,
                  segments: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Sum of the cross-entropy over supervised targets (full logits), and how many there are."""
    logits = model(inputs, cache=packing_cache(model, segments)).astype(mx.float32)
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


_STREAMS: list = []


def loss_streams() -> list:
    """One stream per CPU core on the CPU backend; the default stream elsewhere (a GPU is parallel already)."""
    if not _STREAMS:
        if mx.default_device() == mx.cpu:
            cores = max(1, min(os.cpu_count() or 1, 8))
            _STREAMS.extend(mx.new_stream(mx.cpu) for _ in range(cores))
        else:
            _STREAMS.append(mx.default_stream(mx.default_device()))
    return _STREAMS


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: the logits, their softmax and its gradient live at once, per stream."""
    return max(32, min(CHUNK_ROWS, CHUNK_LOGITS_BYTES // (4 * max(vocab_size, 1))))


def softmax_nll(logits, targets):
    """−log p(target) per row and the softmax, from one `exp` pass (the shared body of the losses that keep the
    softmax as their gradient: cross_entropy_sum here, the preference objective's token losses)."""
    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    exps = mx.exp(logits - top)
    total = exps.sum(axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1).squeeze(-1)
    return (top + mx.log(total)).squeeze(-1) - picked, exps / total


def nll_logit_gradient(probabilities, targets):
    """d(−log p(target)) / d logits per row: the softmax minus the target's one-hot."""
    return probabilities - (mx.arange(probabilities.shape[-1])[None, :] == targets[:, None])


@mx.custom_function
def cross_entropy_sum(logits, targets, weights):
    """Σ weights · cross-entropy, and the softmax it keeps for its own backward pass.

    On MLX's CPU backend `exp` is single-threaded and dominates the loss; the stock cross-entropy runs it twice
    (logsumexp forward, softmax backward). Here it runs once: the softmax computed for the loss is the gradient.
    """
    nll, probabilities = softmax_nll(logits, targets)
    return (nll * weights).sum(), probabilities


@cross_entropy_sum.vjp
def _cross_entropy_sum_vjp(primals, cotangents, outputs):
    logits, targets, weights = primals
    grad = nll_logit_gradient(outputs[1], targets) * (cotangents[0] * weights)[:, None]
    return grad.astype(logits.dtype), mx.zeros_like(targets), mx.zeros_like(weights)


def make_selective_loss_sum(head, vocab_size: int):
    max_rows = chunk_rows(vocab_size)

    def loss_of_rows(rows, targets, weights):
        return cross_entropy_sum(head(rows).astype(mx.float32), targets, weights)[0]

    def chunk_loss(hidden_rows, targets, weights, recompute: bool):
        if not recompute:
            return loss_of_rows(hidden_rows, targets, weights)
        # Recompute the chunk's logits in the backward pass instead of keeping them. Only the hidden rows are
        # arguments: the integer targets and the weights are constants of the chunk, not things to differentiate.
        return mx.checkpoint(lambda rows: loss_of_rows(rows, targets, weights))(hidden_rows)

    def selective_loss_sum(model, inputs, positions, targets, weights, segments=None):
        hidden = model.model(inputs, cache=packing_cache(model, segments))
        rows = hidden.reshape(-1, hidden.shape[-1])[positions]
        count = positions.shape[0]
        streams = loss_streams()
        # At least one chunk per stream: MLX's CPU elementwise kernels (the softmax's exp) are single-threaded,
        # so spreading the chunks over one stream per core runs them in parallel.
        chunk = min(max_rows, max(1, -(-count // len(streams))))
        # Keeping every chunk's softmax for the backward pass saves recomputing head and softmax; past a budget
        # the chunks are recomputed instead, so memory stays bounded whatever the batch.
        recompute = count * vocab_size * 4 > KEPT_SOFTMAX_BYTES
        total = mx.array(0.0)
        for number, start in enumerate(range(0, count, chunk)):
            end = start + chunk
            with mx.stream(streams[number % len(streams)]):
                part = chunk_loss(rows[start:end], targets[start:end], weights[start:end], recompute)
            total = total + part
        return total, weights.sum()

    return selective_loss_sum


def supports_packing(model) -> bool:
    """True when an example packed behind another gets the logits it gets alone (the mask reached attention)."""
    first, second = [5, 9, 13, 17, 21], [3, 7, 11, 15, 19, 23]
    try:
        alone = model(mx.array([second])).astype(mx.float32)
        packed = model(mx.array([first + second]),
                       cache=packing_cache(model, mx.array([[1] * len(first) + [2] * len(second)])))
        packed = packed[:, len(first):].astype(mx.float32)
        scale = mx.abs(alone).max() + 1e-6
        return bool((mx.abs(packed - alone).max() / scale).item() < 1e-3)
    except Exception:  # an architecture whose forward doesn't take our cache objects
        return False


class Loss:
    """The loss a run uses and the arrays it takes from a batch."""

    def __init__(self, model, selective: bool = True):
        self.selective = selective and supports_selective_loss(model)
        vocab_size = getattr(getattr(model, "args", None), "vocab_size", None) or 32768
        self.function = make_selective_loss_sum(output_head(model), vocab_size) if self.selective else full_loss_sum

    def arrays(self, batch: Batch) -> tuple[mx.array, ...]:
        if self.selective:
            arrays = (mx.array(batch.inputs), mx.array(batch.positions), mx.array(batch.position_targets),
                      mx.array(batch.position_weights))
        else:
            arrays = (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask))
        return arrays if batch.segments is None else (*arrays, mx.array(batch.segments))

    def __call__(self, model, *arrays):
        return self.function(model, *arrays)
