"""The clipped policy-gradient objective of GRPO and its published variants, one implementation with options.

Per token t of completion i (mask mᵢₜ ∈ {0, 1}, advantage Âᵢ shared by the completion's tokens):
    rᵢₜ  = exp(log πθ − log πold)                                    (the importance ratio)
    objᵢₜ = min(rᵢₜ·Âᵢ, clip(rᵢₜ, 1 − ε_low, 1 + ε_high)·Âᵢ)           (PPO's clipped surrogate)
    klᵢₜ = exp(log πref − log πθ) − (log πref − log πθ) − 1          (Schulman's k3 estimator, ≥ 0)
    ℓᵢₜ  = −(objᵢₜ − β·klᵢₜ)
and the loss aggregates ℓ over the masked tokens of the G·P completions of a batch:
    "sequence" (GRPO, Shao et al. 2024):      mean over completions of (Σₜ mᵢₜℓᵢₜ / Σₜ mᵢₜ)
    "token"    (DAPO, Yu et al. 2025):        Σᵢₜ mᵢₜℓᵢₜ / Σᵢₜ mᵢₜ
    "constant" (Dr. GRPO, Liu et al. 2025):   Σᵢₜ mᵢₜℓᵢₜ / (completions · max_completion_tokens)

Advantages are group-normalised rewards (`group_advantages`): Âᵢ = Rᵢ − mean(R_group), divided by
(std(R_group) + 1e-4) when `scale_rewards` (GRPO, DAPO; Dr. GRPO drops it). The std is the unbiased one
(ddof = 1), as TRL computes it, so runs compare with TRL's.

`old_log_probs=None` means one update per rollout batch: πold is πθ without gradient (ratio 1, gradient of the
surrogate Â·∇log πθ). `beta=0` drops the KL term and needs no reference log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

AGGREGATIONS = ("sequence", "token", "constant")
STD_EPSILON = 1e-4  # TRL's


@dataclass(frozen=True)
class GRPOLossConfig:
    """The options of the objective; `preset()` names the papers' settings."""

    aggregation: str = "sequence"  # "sequence" | "token" | "constant" (see the module docstring)
    epsilon_low: float = 0.2  # clip below: r ≥ 1 − epsilon_low
    epsilon_high: float = 0.2  # clip above: r ≤ 1 + epsilon_high (DAPO's clip-higher: 0.28)
    beta: float = 0.0  # weight of the KL to the reference; 0: no reference pass
    scale_rewards: bool = True  # divide advantages by the group's reward std
    max_completion_tokens: int | None = None  # the "constant" aggregation's length normaliser

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.aggregation == "constant" and not self.max_completion_tokens:
            raise ValueError("the 'constant' aggregation (Dr. GRPO) needs max_completion_tokens")
        if self.epsilon_low < 0 or self.epsilon_high < 0 or self.beta < 0:
            raise ValueError("epsilon_low, epsilon_high and beta must be ≥ 0")


PRESETS = {
    "grpo": dict(aggregation="sequence", scale_rewards=True),
    "dr_grpo": dict(aggregation="constant", scale_rewards=False),
    "dapo": dict(aggregation="token", epsilon_high=0.28, scale_rewards=True),
}


def preset(name: str, **overrides) -> GRPOLossConfig:
    """The papers' settings by name (`grpo`, `dr_grpo`, `dapo`), any option overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown loss type {name!r}; choose one of {', '.join(PRESETS)}")
    return GRPOLossConfig(**{**PRESETS[name], **overrides})


def group_advantages(rewards: mx.array, group_size: int, scale_rewards: bool = True) -> mx.array:
    """Per-completion advantages from rewards laid out group by group (the G samples of a prompt adjacent)."""
    grouped = rewards.astype(mx.float32).reshape(-1, group_size)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    if scale_rewards:
        centred = centred / (mx.sqrt(mx.var(grouped, axis=1, keepdims=True, ddof=1)) + STD_EPSILON)
    return centred.reshape(-1)


def selected_log_probs(logits: mx.array, tokens: mx.array) -> mx.array:
    """log softmax(logits)[token] per position: logits [..., V], tokens [...] → [...] (float32)."""
    logits = logits.astype(mx.float32)
    chosen = mx.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return chosen - mx.logsumexp(logits, axis=-1)


def grpo_loss(log_probs: mx.array, advantages: mx.array, mask: mx.array, config: GRPOLossConfig,
              old_log_probs: mx.array | None = None, reference_log_probs: mx.array | None = None
              ) -> tuple[mx.array, dict[str, mx.array]]:
    """The loss (a scalar to minimise) and its statistics, on [completions, tokens] log-probs and mask.

    Statistics: `kl` (masked token mean of k3), `clip_low`/`clip_high` (share of masked tokens whose ratio was
    clipped where the clip bites: below with Â < 0, above with Â > 0), `clip_fraction` (their sum).
    """
    mask = mask.astype(mx.float32)
    if old_log_probs is None:
        old_log_probs = mx.stop_gradient(log_probs)
    ratio = mx.exp(log_probs - old_log_probs)
    advantage = advantages.astype(mx.float32)[:, None]
    clipped = mx.clip(ratio, 1.0 - config.epsilon_low, 1.0 + config.epsilon_high)
    per_token = -mx.minimum(ratio * advantage, clipped * advantage)
    kl = mx.zeros_like(per_token)
    if config.beta:
        if reference_log_probs is None:
            raise ValueError("beta > 0 needs reference_log_probs")
        gap = reference_log_probs - log_probs
        kl = mx.exp(gap) - gap - 1.0
        per_token = per_token + config.beta * kl

    tokens = mx.maximum(mask.sum(), 1.0)
    if config.aggregation == "sequence":
        per_completion = (per_token * mask).sum(axis=1) / mx.maximum(mask.sum(axis=1), 1.0)
        loss = per_completion.mean()
    elif config.aggregation == "token":
        loss = (per_token * mask).sum() / tokens
    else:
        loss = (per_token * mask).sum() / (per_token.shape[0] * config.max_completion_tokens)

    low = ((ratio < 1.0 - config.epsilon_low) & (advantage < 0)).astype(mx.float32)
    high = ((ratio > 1.0 + config.epsilon_high) & (advantage > 0)).astype(mx.float32)
    stats = {"kl": (kl * mask).sum() / tokens,
             "clip_low": (low * mask).sum() / tokens,
             "clip_high": (high * mask).sum() / tokens}
    stats["clip_fraction"] = stats["clip_low"] + stats["clip_high"]
    return loss, {k: mx.stop_gradient(v) for k, v in stats.items()}
