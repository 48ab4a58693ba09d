"""The shared-prompt update (train/grpo/prefix.py: each prompt's pass once, its completions after it) gives the
full prompt + completion rows' log-probs and gradient: on the story model and on random Llama- and Qwen2-shaped
models (Qwen2: attention biases), float32, with an adapter moved off zero and rollouts of uneven lengths."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import load

from conftest import MODEL
from mlxtune.settings import LoraSettings
from mlxtune.train.adapters import attach_adapters
from mlxtune.train.grpo.losses import preset
from mlxtune.train.grpo.objective import GrpoLoss, gradient_batches, update_chunks
from mlxtune.train.grpo.prefix import supports_shared_prompt
from mlxtune.train.grpo.rollout import Rollout

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True}
ARCHITECTURES = {"llama": {"model_type": "llama"},
                 "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "rope_theta": 1e6}}


@pytest.fixture(scope="module", params=["stories260K", "llama", "qwen2"])
def policy(request, tmp_path_factory):
    if request.param == "stories260K":
        path = MODEL
    else:
        from mlxtune.synthetic import build_random_model

        path = build_random_model({**TINY, **ARCHITECTURES[request.param]},
                                  tmp_path_factory.mktemp(request.param) / "model", seed=3)
    model, _ = load(str(path))
    attach_adapters(model, LoraSettings(rank=4, seed=0))
    rng = np.random.default_rng(1)  # the adapter off zero: its gradient and the base's differ
    model.update(tree_map(lambda w: mx.array(rng.normal(scale=0.05, size=w.shape).astype(np.float32)),
                          model.trainable_parameters()))
    model.eval()
    return request.param, model


def _rollout(rows_per_prompt: int, lengths: list[int], width: int, seed: int) -> Rollout:
    """Completions of uneven lengths (one of a single token, none to the full width) padded with 0, as a rollout."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 500, size=(len(lengths), width)).astype(np.int32)
    mask = np.arange(width)[None, :] < np.array(lengths)[:, None]
    tokens[~mask] = 0
    prompts = [p for p in range(len(lengths) // rows_per_prompt) for _ in range(rows_per_prompt)]
    return Rollout(mx.array(tokens), mx.array(mask), mx.zeros(tokens.shape), prompts, None, 0.0, int(mask.sum()))


PROMPTS = [[1, 45, 230, 17, 88, 301, 9], [1, 400, 12, 76], [1, 5]]  # 7, 4 and 2 tokens
LENGTHS = [9, 1, 4, 7, 9, 2, 3, 9, 6, 5, 9, 8]  # G 4 per prompt, width 9


def test_shared_prompt_log_probs_and_gradient_equal_full_rows(policy):
    name, model = policy
    assert supports_shared_prompt(model)
    loss = GrpoLoss(model, preset("grpo", beta=0.0, max_completion_tokens=9))
    rollout = _rollout(4, LENGTHS, 9, 0)
    mask = np.array(rollout.mask)
    out = {}
    for shared in (False, True):
        groups = update_chunks(PROMPTS, rollout, np.linspace(-1, 1, 12, dtype=np.float32), 3, shared)
        log_probs = np.concatenate([np.array(loss.token_log_probs(model, g.arrays, g.gather, False))
                                    for g in groups])
        gradient = nn.value_and_grad(model, lambda m, *arrays: loss(m, *arrays)[0])
        total = None
        for piece in gradient_batches(groups):  # 2 pieces of a prompt's 4 rows: each with its own prompt pass
            _, grads = gradient(model, *loss.loss_arrays(model, piece))
            total = grads if total is None else tree_map(mx.add, total, grads)
        out[shared] = log_probs, {k: np.array(v) for k, v in tree_flatten(total)}
        assert len(gradient_batches(groups)) == 6 and log_probs.shape == mask.shape
        assert np.all(log_probs[~mask] == 0) and np.all(log_probs[mask] < 0)
    (full, full_grads), (shared, shared_grads) = out[False], out[True]
    # within 1e-5, and float32 rounding (1e-6 relative) of the random tokens' large log-probs (down to −30)
    np.testing.assert_allclose(shared, full, atol=1e-5, rtol=1e-6, err_msg=name)
    assert max(np.abs(g).max() for g in full_grads.values()) > 1e-3
    for key, g in full_grads.items():
        np.testing.assert_allclose(shared_grads[key], g, atol=1e-5, rtol=1e-4, err_msg=f"{name} {key}")
