"""The update's forward pass with each prompt run once: a group's samples share their prompt, as in the rollout.

Causal attention makes the prompt's hidden states, keys and values independent of what follows it, so a group's
prompt goes through the blocks once (batch 1) and its completions as one batch attending to the prompt's keys and
values (broadcast to every row), their positions continuing after the prompt. The first completion token's log-prob
comes from the prompt's last position. Under a gradient the completions' gradients all flow into the one prompt
pass: the same function of the weights as G full prompt + completion rows, with the prompt's arithmetic and
activations counted once instead of G times. The two halves are apart (`prompt_pass`, `after_prompt`) so that the
gradient can run a group's completions in pieces after one prompt pass (train/grpo/update.py).

Both passes are mlx-lm's own forward (`model.model(inputs, cache=…)`, so its attention, rope offset and mask), through
mlx-lm's per-layer cache protocol — `offset`, `update_and_fetch`, `make_mask` — as train/loss.py's SegmentMaskCache
does: `PromptCache` keeps the prompt's keys and values as the pass computes them (differentiable arrays, no
preallocated buffer: mlx-lm's KVCache writes into zeros by slice assignment), `SharedPromptCache` hands the
completion pass those keys and values ahead of its own. tests/test_mlx_lm_private.py checks that mlx-lm's attention
still calls the cache this way. Models whose caches are not plain `KVCache`s (sliding windows, recurrent layers)
keep the full-row update (`supports_shared_prompt`).
"""

from __future__ import annotations

import mlx.core as mx


class PromptCache:
    """Per layer: the prompt's keys and values as its pass makes them (offset 0, the ordinary causal pass)."""

    offset = 0

    def __init__(self):
        self.keys = self.values = None

    def make_mask(self, length: int, return_array: bool = False, window_size: int | None = None):
        from mlx_lm.models.base import create_causal_mask

        if return_array or window_size is not None:
            return create_causal_mask(length, 0, window_size=window_size)
        return "causal" if length > 1 else None

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values


class SharedPromptCache:
    """Per layer: a prompt's keys and values ahead of every completion row's own; positions start after the prompt."""

    def __init__(self, keys: mx.array, values: mx.array):
        self.prompt_keys, self.prompt_values = keys, values
        self.offset = keys.shape[2]  # mlx-lm's attention rotates queries and keys from here

    def make_mask(self, length: int, return_array: bool = False, window_size: int | None = None):
        from mlx_lm.models.base import create_causal_mask

        if return_array or window_size is not None:
            return create_causal_mask(length, self.offset, window_size=window_size)
        # MLX's "causal" aligns the last query with the last key: row i sees the prompt and completion tokens ≤ i
        return "causal" if length > 1 else None

    def update_and_fetch(self, keys, values):
        rows = keys.shape[0]

        def ahead(prompt, own):
            return mx.concatenate([mx.broadcast_to(prompt, (rows, *prompt.shape[1:])), own], axis=2)

        return ahead(self.prompt_keys, keys), ahead(self.prompt_values, values)


def supports_shared_prompt(model) -> bool:
    """True when every layer's mlx-lm cache is a plain KVCache (full causal attention, keys and values only)."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    try:
        return all(type(cache) is KVCache for cache in make_prompt_cache(model))
    except Exception:  # a model mlx-lm can't make a cache for
        return False


def config_supports_shared_prompt(config: dict) -> bool:
    """`supports_shared_prompt` for a model folder's config, without its weights (the planner's question): mlx-lm's
    class for the config, built with parameters that are never evaluated (so never allocated), asked for its caches."""
    from mlx_lm.utils import _get_classes  # private: tests/test_mlx_lm_private.py guards it (synthetic.py uses it)

    try:
        model_class, args_class = _get_classes(config)
        return supports_shared_prompt(model_class(args_class.from_dict(config)))
    except Exception:  # a config mlx-lm can't build a model for: plan the full rows (the larger)
        return False


def prompt_pass(forward, layers: int, prompt: mx.array) -> tuple[list, mx.array]:
    """The prompt's ([1, P]) pass: per layer its (keys, values), and the state of its last position ([1, 1, width]:
    what predicts the first completion token). `forward(inputs, cache)`: hidden states or logits, [batch, length,
    width]."""
    caches = [PromptCache() for _ in range(layers)]
    states = forward(prompt, caches)
    return [(cache.keys, cache.values) for cache in caches], states[:, -1:]


def after_prompt(forward, prompt_kv: list, last: mx.array, completions: mx.array) -> mx.array:
    """[rows · T, width] states that predict each completion token, from the prompt's pass (`prompt_pass`) and the
    completions' inputs ([rows, T − 1]: each completion but its last token) run after it. Row r's t-th state
    predicts completion token t: the prompt's last position's for t = 0, the completion's position t − 1 after."""
    rows = completions.shape[0]
    completion_states = forward(completions, [SharedPromptCache(keys, values) for keys, values in prompt_kv])
    states = mx.concatenate([mx.broadcast_to(last, (rows, 1, last.shape[-1])), completion_states], axis=1)
    return states.reshape(-1, states.shape[-1])


def shared_prompt_states(forward, layers: int, prompt: mx.array, completions: mx.array) -> mx.array:
    """`after_prompt` of the prompt's own pass: the prompt ([1, P]) once, then the completions ([rows, T − 1])."""
    return after_prompt(forward, *prompt_pass(forward, layers, prompt), completions)
