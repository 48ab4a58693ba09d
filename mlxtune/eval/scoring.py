"""Per-example loss (the training loss, one example at a time) and batched greedy generation with a KV cache."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from mlxtune.data.batching import make_batch
from mlxtune.data.template import TokenizedExample
from mlxtune.train.loss import Loss

GENERATION_BATCH = 16  # prompts decoded together


def example_losses(model, examples: list[TokenizedExample],
                   on_step: Callable[[int], None] | None = None) -> tuple[list[float], list[int]]:
    """(summed loss in nats, supervised tokens) per example, with the exact loss training and `validation_loss`
    use (selective head on supervised positions where the model allows it). One example per forward pass: the
    bootstrap needs each example's own sum, and no padding is computed."""
    loss = Loss(model)
    was_training = model.training
    model.eval()
    sums, counts = [], []
    for example in examples:
        total, count = loss(model, *loss.arrays(make_batch([example])))
        mx.eval(total, count)
        sums.append(float(total.item()))
        counts.append(int(count.item()))
        if on_step:
            on_step(1)
    if was_training:
        model.train()
    return sums, counts


def tokens_containing(tokenizer, text: str) -> list[int]:
    """Every vocabulary token whose text contains `text` (e.g. the newline tokens that end a one-line answer)."""
    vocab_size = len(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else tokenizer.vocab_size
    return [token for token in range(vocab_size) if text in tokenizer.decode([token])]


def greedy_batch(model, tokenizer, prompts: list[list[int]], max_tokens: int,
                 on_done: Callable[[int], None] | None = None, stop_tokens: list[int] = ()) -> list[str]:
    """Greedy continuations of many prompts at once: mlx-lm's BatchGenerator (left-padded prompts, one KV cache
    per sequence, finished sequences leave the batch). Stops at end-of-sequence tokens and at `stop_tokens`, which
    are kept in the text (the caller cuts there)."""
    from mlx_lm.generate import BatchGenerator

    if not prompts:
        return []
    stop = [[token] for token in sorted(set(tokenizer.eos_token_ids))]
    extra = set(stop_tokens) - set(tokenizer.eos_token_ids)
    stop += [[token] for token in sorted(extra)]
    generator = BatchGenerator(model, stop_tokens=stop, completion_batch_size=GENERATION_BATCH,
                               prefill_batch_size=min(GENERATION_BATCH, 8))
    try:
        uids = generator.insert(prompts, [max_tokens] * len(prompts))
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        while responses := generator.next_generated():
            for response in responses:
                if response.finish_reason != "stop" or response.token in extra:
                    tokens[response.uid].append(response.token)
                if response.finish_reason is not None and on_done:
                    on_done(1)
    finally:
        generator.close()
    return [tokenizer.decode(tokens[uid]) for uid in uids]
