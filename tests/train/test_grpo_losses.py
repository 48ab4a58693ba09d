"""The GRPO / Dr. GRPO / DAPO losses and their gradients against an independent numpy computation of the papers'
formulas (float64, gradients by central finite differences), on fixed log-probs, advantages and masks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxtune.train.grpo.losses import GRPOLossConfig, grpo_loss, group_advantages, preset, selected_log_probs

# 4 completions × 5 tokens. Ratios chosen to sit on both sides of both clip bounds, away from the kinks.
RATIOS = np.array([[1.00, 1.50, 0.60, 1.10, 0.90],     # Â > 0: 1.5 clipped (above), 0.6 not clipped (min picks r·Â)
                   [0.50, 1.40, 0.95, 1.05, 1.00],     # Â < 0: 0.5 clipped (below), 1.4 not clipped
                   [1.25, 0.75, 1.00, 1.30, 0.70],     # Â > 0 with ε_high 0.28: 1.30 clipped for both presets
                   [0.85, 1.15, 0.65, 1.35, 1.00]])    # Â < 0
MASK = np.array([[1, 1, 1, 1, 1],
                 [1, 1, 1, 0, 0],
                 [1, 1, 1, 1, 0],
                 [1, 1, 0, 0, 0]], dtype=np.float64)
REWARDS = np.array([1.0, 0.0, 0.75, 0.25])  # one group of 4 → advantages of both signs
LOG_PROBS = np.log(np.array([[0.30, 0.20, 0.10, 0.50, 0.40],
                             [0.05, 0.60, 0.25, 0.33, 0.70],
                             [0.45, 0.15, 0.80, 0.22, 0.35],
                             [0.12, 0.52, 0.64, 0.09, 0.28]]))
OLD = LOG_PROBS - np.log(RATIOS)
REFERENCE = LOG_PROBS + np.array([[0.3, -0.2, 0.1, 0.0, 0.5], [-0.4, 0.2, 0.3, 0.1, -0.1],
                                  [0.05, -0.3, 0.2, -0.15, 0.4], [0.25, 0.1, -0.2, 0.3, 0.0]])
MAX_TOKENS = 8


def numpy_advantages(rewards, group, scale):
    grouped = rewards.reshape(-1, group)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    if scale:
        centred = centred / (grouped.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    return centred.reshape(-1)


def numpy_loss(logp, old, ref, adv, mask, aggregation, eps_low, eps_high, beta):
    """The published objectives, written independently of the implementation."""
    ratio = np.exp(logp - old)
    a = adv[:, None]
    surrogate = np.minimum(ratio * a, np.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
    k3 = np.exp(ref - logp) - (ref - logp) - 1
    loss_t = -(surrogate - beta * k3)
    if aggregation == "sequence":  # GRPO: mean over completions of the per-completion token mean
        return np.mean((loss_t * mask).sum(1) / mask.sum(1))
    if aggregation == "token":  # DAPO: one mean over every token of the batch
        return (loss_t * mask).sum() / mask.sum()
    return (loss_t * mask).sum() / (len(logp) * MAX_TOKENS)  # Dr. GRPO: constant normaliser


def numpy_gradient(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (f(up) - f(down)) / (2 * h)
    return grad


CASES = [  # (preset, overrides): every aggregation, symmetric and asymmetric clip, KL on and off
    ("grpo", {}), ("grpo", {"beta": 0.04}), ("dr_grpo", {"max_completion_tokens": MAX_TOKENS}),
    ("dr_grpo", {"max_completion_tokens": MAX_TOKENS, "beta": 0.1}), ("dapo", {}), ("dapo", {"beta": 0.02}),
]


@pytest.mark.parametrize("name,overrides", CASES)
def test_value_and_gradient_match_the_published_formulas(name, overrides):
    config = preset(name, **overrides)
    adv = numpy_advantages(REWARDS, 4, config.scale_rewards)
    mx_adv = group_advantages(mx.array(REWARDS), 4, config.scale_rewards)
    np.testing.assert_allclose(np.array(mx_adv), adv, atol=1e-5)

    def expected(logp):
        return numpy_loss(logp, OLD, REFERENCE, adv, MASK, config.aggregation, config.epsilon_low,
                          config.epsilon_high, config.beta)

    def actual(logp):
        return grpo_loss(logp, mx_adv, mx.array(MASK), config, mx.array(OLD, dtype=mx.float32),
                         mx.array(REFERENCE, dtype=mx.float32) if config.beta else None)[0]

    logp = mx.array(LOG_PROBS, dtype=mx.float32)
    assert abs(actual(logp).item() - expected(LOG_PROBS)) < 1e-5
    gradient = np.array(mx.grad(actual)(logp))
    np.testing.assert_allclose(gradient, numpy_gradient(expected, LOG_PROBS), atol=1e-5)
    # the clip bites: the clipped tokens carry no surrogate gradient (only the KL's, when beta > 0)
    ref_gap = np.exp(REFERENCE - LOG_PROBS)
    kl_gradient = config.beta * (1 - ref_gap)
    if config.aggregation == "token":
        kl_gradient = kl_gradient / MASK.sum()
    clipped = [(0, 1), (1, 0), (2, 3)]  # above with Â > 0, below with Â < 0
    for row, column in clipped:
        if config.aggregation == "token":
            assert abs(gradient[row, column] - kl_gradient[row, column]) < 1e-6
    assert np.all(gradient[MASK == 0] == 0)


def test_clipping_changes_the_loss_and_the_statistics_count_it():
    config = preset("dapo")
    adv = group_advantages(mx.array(REWARDS), 4)
    loss, stats = grpo_loss(mx.array(LOG_PROBS, dtype=mx.float32), adv, mx.array(MASK), config,
                            mx.array(OLD, dtype=mx.float32))
    unclipped, _ = grpo_loss(mx.array(LOG_PROBS, dtype=mx.float32), adv, mx.array(MASK),
                             GRPOLossConfig(aggregation="token", epsilon_low=10.0, epsilon_high=10.0),
                             mx.array(OLD, dtype=mx.float32))
    assert abs(loss.item() - unclipped.item()) > 1e-3
    # masked tokens clipped where it bites: row 0 col 1 (1.5, Â>0), row 1 col 0 (0.5, Â<0), row 2 col 3 (1.30, Â>0)
    ratio, a = RATIOS, np.array(adv)[:, None]
    high = ((ratio > 1.28) & (a > 0) & (MASK > 0)).sum() / MASK.sum()
    low = ((ratio < 0.8) & (a < 0) & (MASK > 0)).sum() / MASK.sum()
    assert high > 0 and low > 0
    assert abs(stats["clip_high"].item() - high) < 1e-6 and abs(stats["clip_low"].item() - low) < 1e-6
    assert stats["kl"].item() == 0.0


def test_one_update_per_rollout_is_the_plain_policy_gradient():
    """old_log_probs=None: ratio 1, so ∇loss = −Σ Â·∇log π / normaliser (no clipping can bite)."""
    adv = group_advantages(mx.array(REWARDS), 4)
    gradient = mx.grad(lambda lp: grpo_loss(lp, adv, mx.array(MASK), preset("dapo"))[0])(
        mx.array(LOG_PROBS, dtype=mx.float32))
    np.testing.assert_allclose(np.array(gradient), -np.array(adv)[:, None] * MASK / MASK.sum(), atol=1e-6)


def test_advantages_without_std_scaling_and_flat_groups():
    rewards = mx.array([1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.0, 2.0])
    np.testing.assert_allclose(np.array(group_advantages(rewards, 4, scale_rewards=False)),
                               [0, 0, 0, 0, -1, 1, -1, 1])
    scaled = np.array(group_advantages(rewards, 4))
    assert np.all(scaled[:4] == 0)  # a group with no reward variance teaches nothing
    np.testing.assert_allclose(scaled[4:], np.array([-1, 1, -1, 1]) / (np.std([0, 2, 0, 2], ddof=1) + 1e-4),
                               rtol=1e-6)


def test_selected_log_probs_and_bad_options():
    logits = mx.array([[[1.0, 2.0, 3.0], [0.5, 0.5, 0.0]]])
    got = np.array(selected_log_probs(logits, mx.array([[2, 0]])))
    x = np.array(logits, dtype=np.float64)
    want = [x[0, 0, 2] - np.log(np.exp(x[0, 0]).sum()), x[0, 1, 0] - np.log(np.exp(x[0, 1]).sum())]
    np.testing.assert_allclose(got[0], want, atol=1e-6)
    with pytest.raises(ValueError, match="max_completion_tokens"):
        preset("dr_grpo")
    with pytest.raises(ValueError, match="unknown loss type"):
        preset("ppo")
    with pytest.raises(ValueError, match="reference_log_probs"):
        grpo_loss(mx.zeros((1, 2)), mx.ones((1,)), mx.ones((1, 2)), preset("grpo", beta=0.1))
