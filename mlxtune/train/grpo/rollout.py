"""Group rollouts: each prompt is prefilled once, its KV cache copied to its G samples, and every sample of every
prompt decodes as one batch.

The prefill (the expensive part for long prompts) runs once per prompt. Given the selective head (hidden state →
logits, so that only each prompt's last position goes through it), short prompts go together: up to
`PREFILL_BATCH_TOKENS` (prompts × the longest) as one left-padded batch in mlx-lm's `BatchKVCache` (its mask hides
the padding, its per-row offsets start each prompt's positions at 0, as its own batch generation does), each
prompt's cache then taken out of it (`extract`). One pass for several prompts reads the weights once instead of once
a prompt (SmolLM2 on the CPU, 2 prompts of 55 tokens: 0.26 s against 0.30–0.33); the bound keeps the batch's
attention scores small, and longer prompts, models whose caches are not plain KVCaches and calls without the head
prefill each prompt alone in mlx-lm's own cache (`make_prompt_cache`), as the memory planner counts them.
The caches are then merged into one batch cache with mlx-lm's public `merge` classmethod (KVCache → BatchKVCache,
left-padding prompts of different lengths), listing each prompt's cache G times. The
merged cache holds G copies of the prompt's keys and values (decoding appends per sample), so the saving is the
prefill compute, not the prompt's cache memory; it grows once, by what decoding appends (`batch_cache`).

Decoding a small model on a CPU is bound by reading the weights once per token, not by the batch: a step's sampling
runs its rows on the loss streams (one per core: MLX's elementwise kernels are single-threaded) and the next step is
queued before the stop check waits, so Python builds one graph while MLX computes the other.

Sampling: temperature and top-p (mlx-lm's `apply_top_p`), by the Gumbel-max trick with one explicit
`mx.random` key per sample, split at every step. A sample's tokens therefore depend only on its own key, not on
the batch it decodes in — which makes a rollout resumable (the keys are returned) and lets the test compare a
group against each sample generated alone. Temperature 0 is greedy. Without top-p the draw takes two levels
(`_two_level_draw`): a block of `SAMPLE_BLOCK` vocabulary entries by its probability mass, then a token of that
block — the same distribution, P(block) · P(token | block) = P(token), from V / 256 + 256 Gumbel numbers a row
instead of V (448 instead of 49,152 for SmolLM2). On the CPU backend the full-vocabulary noise and MLX's uncompiled `exp`
were ≈15 ms of each ≈125 ms decoding step; the two-level draw, its one `exp` pass compiled, ≈2 ms.

Returned log-probs are those of the sampled tokens under the model's untempered distribution (log softmax of the
logits), the πold of the clipped objective when the update runs on the same weights; the engine recomputes them in
training mode for the update. A sample stops after its first end-of-turn/eos token (included in its mask: the
model learns to stop) or at `max_tokens`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache
from mlx_lm.sample_utils import apply_top_p

from mlxtune.data.template import TokenizedExample
from mlxtune.train.grpo.prefix import supports_shared_prompt
from mlxtune.train.loss import loss_streams


@dataclass
class Rollout:
    """G samples per prompt, prompt by prompt (rows p·G … p·G + G − 1 belong to prompt p)."""

    tokens: mx.array  # [rows, T] int32, completion tokens (0 after a sample stopped)
    mask: mx.array  # [rows, T] bool, True for the completion's tokens (its eos included)
    log_probs: mx.array  # [rows, T] float32, log π(token) at temperature 1 (0 where masked)
    prompt_index: list[int]  # the prompt of each row
    next_keys: mx.array  # [rows, 2] each sample's key after its last step (for resuming)
    seconds: float  # wall time, prefill included
    generated_tokens: int  # masked tokens, summed over rows
    # per prompt its pass as the update's shared prompt takes it (train/grpo/prefix.py's `prompt_pass`: per layer its
    # keys and values, and its last position's hidden state), when asked for (`generate_group`'s `head`)
    prompt_passes: list | None = None

    @property
    def lengths(self) -> list[int]:
        return self.mask.sum(axis=1).tolist()

    def completion(self, row: int) -> list[int]:
        """The tokens of one sample, up to and including its eos."""
        return self.tokens[row, : self.lengths[row]].tolist()


def sample_keys(key: mx.array, prompts: int, group_size: int) -> mx.array:
    """One key per sample, [prompts · group_size, 2], from one key (e.g. the run's key for this step)."""
    return mx.random.split(key, prompts * group_size)


_split_each = mx.vmap(lambda k: mx.random.split(k, 2))

SAMPLE_BLOCK = 256  # vocabulary entries per block of the two-level draw (`_two_level_draw`)


@partial(mx.compile, shapeless=True)
def _shifted_exp(scores: mx.array) -> tuple[mx.array, mx.array]:
    """Each row's maximum and exp(scores − maximum): one pass, compiled (MLX's uncompiled CPU `exp` is ≈3× slower)."""
    top = scores.max(axis=-1, keepdims=True)
    return top, mx.exp(scores - top)


def _log_normaliser(logits: mx.array) -> mx.array:
    """log Σ exp(logits) per row, [rows]."""
    top, exps = _shifted_exp(logits)
    return top[:, 0] + mx.log(exps.sum(axis=-1))


def _two_level_draw(scores: mx.array, step_keys: mx.array) -> tuple[mx.array, mx.array]:
    """A token per row from softmax(scores) (the tempered logits), by the Gumbel-max trick in two levels: a block of
    SAMPLE_BLOCK entries with probability its mass (Σ exp over the block), then an entry of that block with probability
    its share of the block's mass — P(block) · P(entry | block) is the entry's softmax probability. Returns the tokens
    and log Σ exp(scores) per row. The vocabulary is padded with −∞ (mass 0) to whole blocks."""
    rows, vocab = scores.shape
    blocks = -(-vocab // SAMPLE_BLOCK)
    if blocks * SAMPLE_BLOCK != vocab:
        scores = mx.pad(scores, [(0, 0), (0, blocks * SAMPLE_BLOCK - vocab)], constant_values=-float("inf"))
    top, exps = _shifted_exp(scores)
    mass = exps.reshape(rows, blocks, SAMPLE_BLOCK).sum(axis=-1)  # [rows, blocks], Σ exp(scores − top) per block
    noise = mx.vmap(lambda k: mx.random.gumbel((blocks + SAMPLE_BLOCK,), key=k))(step_keys)
    block = mx.argmax(mx.log(mass) + noise[:, :blocks], axis=-1)  # a block of no mass has log 0 = −∞: never chosen
    entries = mx.take_along_axis(scores.reshape(rows, blocks, SAMPLE_BLOCK), block[:, None, None], axis=1)[:, 0]
    entry = mx.argmax(entries + noise[:, blocks:], axis=-1)
    return block * SAMPLE_BLOCK + entry, top[:, 0] + mx.log(mass.sum(axis=-1))


def _sample(logits: mx.array, keys: mx.array, temperature: float, top_p: float):
    """(tokens, their untempered log-probs, next keys) for a [rows, V] batch of logits, one key per row."""
    logits = logits.astype(mx.float32)
    split = _split_each(keys)
    keys, step_keys = split[:, 0], split[:, 1]
    if temperature == 0:
        tokens, normaliser = mx.argmax(logits, axis=-1), _log_normaliser(logits)
    elif top_p < 1.0:
        normaliser = _log_normaliser(logits)
        scores = (logits - normaliser[:, None]) / temperature
        scores = apply_top_p(scores - mx.logsumexp(scores, axis=-1, keepdims=True), top_p)
        noise = mx.vmap(lambda k: mx.random.gumbel((scores.shape[-1],), key=k))(step_keys)
        tokens = mx.argmax(scores + noise, axis=-1)
    elif temperature == 1.0:  # the draw's own normaliser is the untempered one: one vocabulary pass
        tokens, normaliser = _two_level_draw(logits, step_keys)
    else:
        tokens, normaliser = _two_level_draw(logits / temperature, step_keys)[0], _log_normaliser(logits)
    chosen = mx.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - normaliser
    return tokens.astype(mx.int32), chosen, keys


def _sample_rows(logits: mx.array, keys: mx.array, temperature: float, top_p: float):
    """`_sample` with the rows split over the loss streams (one per CPU core): MLX's CPU elementwise kernels — the
    exp, log and random bits over the vocabulary that sampling is made of — are single-threaded. Each row's result is
    the same bits as in one batch (a row's arithmetic does not depend on the others)."""
    streams = loss_streams()
    bounds = np.linspace(0, logits.shape[0], len(streams) + 1).astype(int)
    parts = []
    for stream, start, end in zip(streams, bounds[:-1], bounds[1:]):
        if end > start:
            with mx.stream(stream):
                parts.append(_sample(logits[start:end], keys[start:end], temperature, top_p))
    if len(parts) == 1:
        return parts[0]
    return tuple(mx.concatenate([part[i] for part in parts]) for i in range(3))


def _prefill(model, prompt: list[int], head=None):
    """The prompt's cache and the logits of its last position (one forward pass at batch 1). With `head`
    (train/loss.py's `output_head`: hidden states → logits, the selective head) the blocks run as `model.model` and
    only the last position goes through the head; its hidden state is returned too (else None)."""
    cache = make_prompt_cache(model)
    inputs = mx.array(prompt, dtype=mx.int32)[None]
    if head is None:
        last, logits = None, model(inputs, cache=cache)[:, -1, :]
    else:
        last = model.model(inputs, cache=cache)[:, -1:]
        logits = head(last)[:, -1, :]
    mx.eval(logits, [c.state for c in cache], *([] if last is None else [last]))
    return cache, logits, last


PREFILL_BATCH_TOKENS = 512  # prompts × longest prompt per batched prefill (`_prefill_all`)


def _prefill_all(model, prompts: list[list[int]], head=None) -> list:
    """`_prefill` of every prompt, short ones together: with the head, and a model whose caches are plain KVCaches,
    consecutive prompts go in batches of at most PREFILL_BATCH_TOKENS (count × longest), each left-padded to its
    longest in a BatchKVCache per layer (as mlx-lm's batch generation does), each prompt's KVCache then taken out
    without its padding (`extract`)."""
    if head is None or len(prompts) == 1 or not supports_shared_prompt(model):
        return [_prefill(model, prompt, head) for prompt in prompts]
    batches, current = [], []
    for prompt in prompts:
        if current and (len(current) + 1) * max(len(prompt), *map(len, current)) > PREFILL_BATCH_TOKENS:
            batches.append(current)
            current = []
        current.append(prompt)
    batches.append(current)
    return [each for batch in batches for each in _prefill_batch(model, batch, head)]


def _prefill_batch(model, prompts: list[list[int]], head) -> list:
    if len(prompts) == 1:
        return [_prefill(model, prompts[0], head)]
    longest = max(len(prompt) for prompt in prompts)
    padding = [longest - len(prompt) for prompt in prompts]
    inputs = mx.array([[0] * pad + list(prompt) for prompt, pad in zip(prompts, padding)], dtype=mx.int32)
    batch = [BatchKVCache(padding) for _ in make_prompt_cache(model)]
    last = model.model(inputs, cache=batch)[:, -1:]
    logits = head(last)[:, -1, :]
    caches = [[layer.extract(row) for layer in batch] for row in range(len(prompts))]
    mx.eval(logits, last, [c.state for cache in caches for c in cache])
    return [(cache, logits[row:row + 1], last[row:row + 1]) for row, cache in enumerate(caches)]


def prompt_pass_of(cache: list, last: mx.array) -> tuple[list, mx.array]:
    """A prefill's cache and last hidden state as train/grpo/prefix.py's `prompt_pass` returns a prompt's pass: per
    layer (keys, values) of the prompt's positions — what the pass hands its cache, copied out of mlx-lm's
    preallocated buffer — and the last position's state. Only plain KVCaches (the models that share the prompt)."""
    kv = [(mx.contiguous(c.keys[..., :c.offset, :]), mx.contiguous(c.values[..., :c.offset, :])) for c in cache]
    mx.eval(kv)
    return kv, last


def batch_cache(prompt_caches: list, group_size: int, max_tokens: int) -> list:
    """The decoding batch's cache: every prompt's cache listed G times, merged (mlx-lm's `merge`: each sample gets
    its own copy to append to)."""
    cache = [type(layers[0]).merge([prompt[layer] for prompt in prompt_caches for _ in range(group_size)])
             for layer, layers in enumerate(zip(*prompt_caches))]
    for layer in cache:
        if isinstance(layer, BatchKVCache):
            # Grow once, by what decoding appends (max_tokens − 1 tokens are fed back), not by mlx-lm's default 256
            # positions: the merged cache is full at the longest prompt, and G × prompts rows of 256 positions
            # were most of the rollout's memory (SmolLM2, 16 rows: 0.30 GB against 0.12 GB). Same keys and values.
            layer.step = max(1, max_tokens - 1)
    return cache


def generate_group(model, prompts: list[list[int]], keys: mx.array, *, max_tokens: int, eos_token_ids,
                   temperature: float = 1.0, top_p: float = 1.0, head=None,
                   keep_prompt_passes: bool = False) -> Rollout:
    """len(keys) // len(prompts) samples of each prompt (token ids), decoded as one batch. `head`: the model's
    selective head (train/loss.py's `output_head`, where `supports_selective_loss`): the prefill sends only each
    prompt's last position through it, and batches short prompts. With it and `keep_prompt_passes` (a model whose
    caches are plain KVCaches) the rollout also returns each prompt's pass (`prompt_passes`): the update's shared
    prompt pass at the same weights, so that the update need not run it again."""
    if keep_prompt_passes and head is None:
        raise ValueError("keep_prompt_passes needs the selective head (head=)")
    group_size = keys.shape[0] // len(prompts)
    if group_size * len(prompts) != keys.shape[0] or group_size < 1:
        raise ValueError(f"{keys.shape[0]} keys for {len(prompts)} prompts: give group_size keys per prompt")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    start = time.perf_counter()
    prefills = _prefill_all(model, prompts, head)
    rows = len(prompts) * group_size
    passes = [prompt_pass_of(prompt_cache, last) for prompt_cache, _, last in prefills] if keep_prompt_passes else None
    cache = batch_cache([prompt_cache for prompt_cache, _, _ in prefills], group_size, max_tokens)
    logits = mx.concatenate([mx.repeat(last, group_size, axis=0) for _, last, _ in prefills], axis=0)
    del prefills  # the prompts' own caches: merged into the batch's (copied)
    eos = mx.array(sorted(set(eos_token_ids)), dtype=mx.int32)

    tokens, log_probs, masks = [], [], []
    running = mx.ones((rows,), dtype=mx.bool_)
    for step in range(max_tokens):
        token, log_prob, advanced = _sample_rows(logits, keys, temperature, top_p)
        keys = mx.where(running[:, None], advanced, keys)  # a stopped sample's key stays where it stopped
        tokens.append(mx.where(running, token, 0))
        log_probs.append(mx.where(running, log_prob, 0.0))
        masks.append(running)
        running = running & ~(token[:, None] == eos[None]).any(axis=1)
        last = step == max_tokens - 1
        if not last:  # the next step's forward is built and queued before this step's stop check waits: the graph
            # building overlaps the computing (a step that every sample has stopped before is computed, not used)
            logits = model(token[:, None], cache=cache)[:, -1, :]
        mx.async_eval(tokens[-1], log_probs[-1], running, keys, *([] if last else [logits]))
        if last or not running.any().item():
            break
    mask = mx.stack(masks, axis=1)
    rollout = Rollout(mx.stack(tokens, axis=1), mask, mx.stack(log_probs, axis=1),
                      [p for p in range(len(prompts)) for _ in range(group_size)], keys, 0.0, int(mask.sum().item()),
                      passes)
    rollout.seconds = time.perf_counter() - start
    return rollout


def rollout_examples(prompts: list[list[int]], rollout: Rollout, sources: list[str] | None = None
                     ) -> list[TokenizedExample]:
    """Each sample as prompt + completion with its completion tokens supervised: the update's batch, in the form
    every other objective's batching (data/batching.py) and selective log-probs take. A row's supervised targets,
    in order, are its completion's masked tokens."""
    examples = []
    for row, (prompt, length) in enumerate(zip((prompts[p] for p in rollout.prompt_index), rollout.lengths)):
        ids = np.asarray(list(prompt) + rollout.completion(row), dtype=np.int32)
        supervised = np.zeros(len(ids), dtype=bool)
        supervised[len(prompt):] = True
        examples.append(TokenizedExample(ids, supervised, sources[row] if sources else f"sample {row}"))
    return examples
