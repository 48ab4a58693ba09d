"""The loss, computed only where it counts.

The selective path takes the final hidden states, gathers the supervised positions and applies the output head
and cross-entropy to those rows only, chunk by chunk (recomputed in the backward pass once the kept softmax would
pass a memory budget), so the `[batch, seq, vocab]` logits are never materialised (for a 150k vocabulary they
dominate memory). The head is found per model and checked
against the model's own forward pass; where they disagree (logit soft-capping, scaling…) the full computation is
used instead.
"""

from __future__ import annotations


import mlx.core as mx
import mlx.nn as nn

from mlxtune.data.batching import Batch
# The chunks' sizes and the streams, defined with the memory estimate that counts them.
from mlxtune.memory.limits import FUSED_CHUNK_ROWS, KEPT_SOFTMAX_BYTES, chunk_rows, cpu_loss_streams

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
            _STREAMS.extend(mx.new_stream(mx.cpu) for _ in range(cpu_loss_streams()))
        else:
            _STREAMS.append(mx.default_stream(mx.default_device()))
    return _STREAMS


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


def head_token_nll_with_gradient(head):
    """−log p(target) per row straight from hidden rows, for a head without trainable parameters, with its
    gradient computed in the forward pass (the fused linear cross-entropy of Liger-Kernel and others).

    d nll / d rows = (softmax − one_hot) @ W does not depend on what comes after the log-probs, so each chunk turns
    its softmax into that `[rows, hidden]` gradient at once and the backward pass only scales it by the incoming
    cotangent. Nothing vocabulary-sized outlives its chunk: the stock composition keeps every chunk's logits and
    softmax (`[positions, vocab]`, twice) alive until the backward. Same arithmetic, moved; forward-only callers
    (evaluation, the preference reference pass) skip it, since it always does the gradient's matmul."""

    def logits_of(rows):
        return head(rows).astype(mx.float32)

    @mx.custom_function
    def nll(rows, targets):
        # The plain body, not a custom function's: a custom function's softmax output would stay alive as long as
        # its sibling does.
        nlls, probabilities = softmax_nll(logits_of(rows), targets)
        # mx.vjp through the head: the right matmul for a plain, quantized or tied (embedding) head; its forward
        # output is not used, so it is never computed.
        _, (row_gradient,) = mx.vjp(logits_of, [rows], [nll_logit_gradient(probabilities, targets)])
        return nlls, mx.stop_gradient(row_gradient)

    @nll.vjp
    def _nll_vjp(primals, cotangents, outputs):
        rows, targets = primals
        return (cotangents[0][:, None] * outputs[1]).astype(rows.dtype), mx.zeros_like(targets)

    return nll


def has_trainable_parameters(function) -> bool:
    """Whether the module behind a head (a module, or a bound method such as `embed_tokens.as_linear`) trains."""
    from mlx.utils import tree_flatten

    module = getattr(function, "__self__", function)
    return isinstance(module, nn.Module) and bool(tree_flatten(module.trainable_parameters()))


def over_chunks(rows: mx.array, chunk: int, compute) -> list[mx.array]:
    """`compute(start, rows[start:start + chunk])` for each chunk, round-robin over the loss streams (MLX's CPU
    elementwise kernels, the softmax's exp among them, are single-threaded: one stream per core runs chunks in
    parallel). A chunk starts once its stream's previous chunk has finished: without this order MLX may run every
    chunk's head before any softmax, and all their `[rows, vocab]` logits are alive at once."""
    streams = loss_streams()
    parts = []
    for number, start in enumerate(range(0, rows.shape[0], chunk)):
        part = rows[start:start + chunk]
        if number >= len(streams):
            part = mx.depends(part, parts[number - len(streams)])
        with mx.stream(streams[number % len(streams)]):
            parts.append(compute(start, part))
    return parts


def make_selective_loss_sum(head, vocab_size: int, differentiable: bool = False):
    """Σ weight · cross-entropy over the supervised rows, the head applied to those rows only, chunk by chunk.

    `differentiable` (the training step): with a frozen head (LoRA, DoRA, full finetuning of the blocks) the head's
    gradient is made chunk by chunk in the forward pass (`head_token_nll_with_gradient`) and nothing
    vocabulary-sized is kept for the backward; a trainable head keeps each chunk's softmax up to a budget and past
    it recomputes the chunk in the backward pass (`nn.utils.checkpoint`, so the head's own parameters get their
    gradient too). Forward only (evaluation): the chunks' losses, nothing more."""
    max_rows = chunk_rows(vocab_size)
    fused = head_token_nll_with_gradient(head) if differentiable and not has_trainable_parameters(head) else None
    module = getattr(head, "__self__", head)

    def loss_of_rows(rows, targets, weights):
        return cross_entropy_sum(head(rows).astype(mx.float32), targets, weights)[0]

    def forward_loss_of_rows(rows, targets, weights):
        # Evaluation: the plain body. cross_entropy_sum's softmax output would stay alive as long as its sibling (the
        # chunk's sum, kept until the total) does, every chunk's [rows, vocab] at once; here it is never computed.
        return (softmax_nll(head(rows).astype(mx.float32), targets)[0] * weights).sum()

    def recomputed_loss_of_rows(rows, targets, weights):
        # mlx's nn.utils.checkpoint passes the module's trainable parameters as arguments of the recomputed
        # function: mx.checkpoint of a closure would drop a trainable head's gradient. The integer targets and the
        # weights are constants of the chunk, not things to differentiate.
        return nn.utils.checkpoint(module, lambda rows: loss_of_rows(rows, targets, weights))(rows)

    def selective_loss_sum(model, inputs, positions, targets, weights, segments=None):
        hidden = model.model(inputs, cache=packing_cache(model, segments))
        rows = hidden.reshape(-1, hidden.shape[-1])[positions]
        count = positions.shape[0]
        # At least one chunk per stream, so every core has work.
        per_stream = max(1, -(-count // len(loss_streams())))
        if fused is not None:
            chunk = min(FUSED_CHUNK_ROWS, per_stream)
            parts = over_chunks(rows, chunk, lambda start, part: (
                fused(part, targets[start:start + chunk])[0] * weights[start:start + chunk]).sum())
        else:
            chunk = min(max_rows, per_stream)
            # Keeping every chunk's softmax for the backward pass saves recomputing head and softmax; past a
            # budget the chunks are recomputed instead, so memory stays bounded whatever the batch.
            keep = count * vocab_size * 4 <= KEPT_SOFTMAX_BYTES
            body = (forward_loss_of_rows if not differentiable else loss_of_rows if keep
                    else recomputed_loss_of_rows)
            parts = over_chunks(rows, chunk, lambda start, part: body(part, targets[start:start + chunk],
                                                                     weights[start:start + chunk]))
        total = mx.array(0.0)
        for part in parts:
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
        head = output_head(model) if self.selective else None
        # Built when the trainable parameters are settled (adapters attached): whether the head trains decides
        # how the training loss makes its gradient.
        self.function = make_selective_loss_sum(head, vocab_size) if self.selective else full_loss_sum
        self.training_function = (make_selective_loss_sum(head, vocab_size, differentiable=True)
                                  if self.selective else full_loss_sum)

    def arrays(self, batch: Batch) -> tuple[mx.array, ...]:
        if self.selective:
            arrays = (mx.array(batch.inputs), mx.array(batch.positions), mx.array(batch.position_targets),
                      mx.array(batch.position_weights))
        else:
            arrays = (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask))
        return arrays if batch.segments is None else (*arrays, mx.array(batch.segments))

    def __call__(self, model, *arrays):
        """The loss sum and supervised count, for a forward pass (evaluation)."""
        return self.function(model, *arrays)

    def for_gradient(self, model, *arrays):
        """The same numbers, for a step that takes their gradient (what `nn.value_and_grad` differentiates)."""
        return self.training_function(model, *arrays)
