"""Preference objectives (DPO, ORPO) on the engine's selective log-probs.

A batch of B pairs is one forward pass over 2B rows (chosen rows, then rejected rows). Only the answer positions
go through the output head, chunk by chunk, exactly like the supervised loss (train/loss.py): the
`[rows, seq, vocab]` logits never exist. Each row's answer log-probability is the sum over its positions.

DPO's reference log-probs come from the same weights with the adapters bypassed (each LoRA/DoRA layer replaced by
the base layer it wraps, for one forward pass without gradients) — no second copy of the model — or are
precomputed once per pair and cached in the run directory (`--precompute-reference`, required for `full`).

Formulas (per pair; πc, πr: summed answer log-probs under the policy, ρc, ρr: under the reference; β: beta):
- DPO (Rafailov et al. 2023, sigmoid loss with conservative label smoothing ε):
  z = β((πc − πr) − (ρc − ρr)),  loss = −(1 − ε)·log σ(z) − ε·log σ(−z);  rewards β(πc − ρc), β(πr − ρr).
- ORPO (Hong et al. 2024), on per-token mean log-probs ℓc, ℓr:
  log-odds = (ℓc − ℓr) − (log(1 − e^ℓc) − log(1 − e^ℓr)),  loss = −ℓc − β·log σ(log-odds);  rewards β·ℓc, β·ℓr.
Preference accuracy: the share of pairs whose chosen reward beats the rejected one (a tie counts one half, so an
untrained DPO policy, equal to its reference, scores 0.5).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxtune.data.batching import evaluation_subset, make_batch
from mlxtune.data.preference import PreferenceExample
from mlxtune.memory.limits import FUSED_CHUNK_ROWS, chunk_rows
from mlxtune.settings import PREFERENCE_OBJECTIVES
from mlxtune.train.loss import (has_trainable_parameters, head_token_nll_with_gradient, loss_streams,
                                nll_logit_gradient, output_head, over_chunks, packing_cache, softmax_nll,
                                supports_selective_loss)

OBJECTIVES = PREFERENCE_OBJECTIVES  # the names live with the settings, which check them
STAT_NAMES = ("chosen_reward", "rejected_reward", "accuracy", "chosen_nll")


# ---------------------------------------------------------------------------------------------------------------
# The losses, on per-pair log-probs (what the tests check against the published formulas)

def log1m_exp(x: mx.array) -> mx.array:
    """log(1 − eˣ) for x < 0, accurate near 0 and for very negative x."""
    x = mx.minimum(x, -1e-7)
    return mx.where(x > -math.log(2.0), mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float,
             label_smoothing: float = 0.0):
    """Per-pair DPO losses and the chosen/rejected rewards."""
    z = beta * ((policy_chosen - policy_rejected) - (reference_chosen - reference_rejected))
    losses = -(1.0 - label_smoothing) * nn.log_sigmoid(z) - label_smoothing * nn.log_sigmoid(-z)
    return losses, beta * (policy_chosen - reference_chosen), beta * (policy_rejected - reference_rejected)


def orpo_loss(chosen_mean_logp, rejected_mean_logp, beta: float):
    """Per-pair ORPO losses (chosen NLL + β × odds-ratio loss) and the chosen/rejected rewards."""
    log_odds = (chosen_mean_logp - rejected_mean_logp) - (log1m_exp(chosen_mean_logp)
                                                          - log1m_exp(rejected_mean_logp))
    losses = -chosen_mean_logp - beta * nn.log_sigmoid(log_odds)
    return losses, beta * chosen_mean_logp, beta * rejected_mean_logp


TIE = 1e-4  # rewards closer than this are a tie: float noise between a precomputed and a live reference is ~1e-6


def preference_accuracy(chosen_rewards, rejected_rewards) -> mx.array:
    """Per pair: 1 when the chosen reward is higher, ½ on a tie, 0 otherwise."""
    difference = chosen_rewards - rejected_rewards
    return (difference > TIE).astype(mx.float32) + 0.5 * (mx.abs(difference) <= TIE)


# ---------------------------------------------------------------------------------------------------------------
# Per-row answer log-probs through the selective head

@mx.custom_function
def token_nll(logits, targets):
    """−log p(target) per row, and the softmax it keeps for its own backward pass (one `exp` pass, as loss.py)."""
    return softmax_nll(logits, targets)


@token_nll.vjp
def _token_nll_vjp(primals, cotangents, outputs):
    logits, targets = primals
    grad = nll_logit_gradient(outputs[1], targets) * cotangents[0][:, None]
    return grad.astype(logits.dtype), mx.zeros_like(targets)


def forward_nll(logits, targets):
    """−log p(target) per row, for a forward pass only (nothing kept for a backward pass): `softmax_nll`'s loss,
    its softmax output never evaluated (MLX computes only what is asked for). Its log-sum-exp is written out rather
    than `mx.logsumexp`: inside a compiled pass (the GRPO frozen passes) the exp is one of MLX's compiled kernels,
    ≈4× faster on the CPU backend with backend.py's compiler flags than the built-in's scalar exp."""
    return softmax_nll(logits, targets)[0]


class SequenceLogProbs:
    """Summed answer log-probs and answer lengths per row: selective head when the model allows, else full logits."""

    def __init__(self, model, selective: bool = True):
        self.selective = selective and supports_selective_loss(model)
        self.head = output_head(model) if self.selective else None
        self.fused_nll = head_token_nll_with_gradient(self.head) if self.selective else None
        vocab_size = getattr(getattr(model, "args", None), "vocab_size", None) or 32768
        self.max_rows = chunk_rows(vocab_size)

    def position_nll(self, model, inputs, positions, targets, differentiable: bool = False):
        return self.states_nll(self.states(model, inputs), positions, targets, differentiable)

    def states(self, model, inputs, cache=None) -> mx.array:
        """[batch, length, width] what the head's rows are taken from: the last hidden states (selective head), or
        the float32 logits (full logits). `cache`: mlx-lm's per-layer cache list (None: the plain causal pass)."""
        if not self.selective:
            return model(inputs, cache=cache).astype(mx.float32)
        return model.model(inputs, cache=cache if cache is not None else packing_cache(model, None))

    def states_nll(self, states, positions, targets, differentiable: bool = False):
        """−log p(target) at `positions` (flat indices into the states' [batch · length] rows)."""
        rows = states.reshape(-1, states.shape[-1])[positions]
        if not self.selective:
            return token_nll(rows, targets)[0]
        count = positions.shape[0]
        # Under a gradient with a frozen head (LoRA and friends) the fused path keeps nothing vocabulary-sized for
        # the backward pass; a trainable head (full finetuning, an adapted head) needs the plain composition.
        fused = differentiable and not has_trainable_parameters(self.head)
        chunk = min(FUSED_CHUNK_ROWS if fused else self.max_rows, max(1, -(-count // len(loss_streams()))))

        def compute(start, rows_part):
            targets_part = targets[start:start + chunk]
            if fused:
                return self.fused_nll(rows_part, targets_part)[0]
            if differentiable:  # a trainable head: the composition, which keeps the softmax for backward
                return token_nll(self.head(rows_part).astype(mx.float32), targets_part)[0]
            return forward_nll(self.head(rows_part).astype(mx.float32), targets_part)  # nothing kept, no softmax

        parts = over_chunks(rows, chunk, compute)
        return mx.concatenate(parts) if len(parts) > 1 else parts[0]

    def __call__(self, model, inputs, positions, targets, weights, position_rows, differentiable: bool = False):
        """(log-prob sum, supervised count) per row of `inputs`; `differentiable` when a gradient will be taken."""
        nll = self.position_nll(model, inputs, positions, targets, differentiable)
        membership = (position_rows[None, :] == mx.arange(inputs.shape[0])[:, None]).astype(mx.float32)
        membership = membership * weights[None, :]
        return -(membership @ nll), membership.sum(axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Batches of pairs

@dataclass
class PairBatch:
    inputs: np.ndarray  # [2B, length]: chosen rows then rejected rows
    positions: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    position_rows: np.ndarray  # which row each position belongs to
    pairs: int
    tokens: int
    reference: np.ndarray | None  # [2, B] precomputed reference log-probs (chosen, rejected)

    def arrays(self) -> tuple[mx.array, ...]:
        return (mx.array(self.inputs), mx.array(self.positions), mx.array(self.targets), mx.array(self.weights),
                mx.array(self.position_rows))


def make_pair_batch(pairs: list[PreferenceExample], references: dict[str, tuple[float, float]] | None = None
                    ) -> PairBatch:
    batch = make_batch([p.chosen for p in pairs] + [p.rejected for p in pairs])
    length = batch.inputs.shape[1]
    reference = None
    if references is not None:
        reference = np.array([references[p.fingerprint] for p in pairs], dtype=np.float32).T
    return PairBatch(batch.inputs, batch.positions, batch.position_targets, batch.position_weights,
                     (batch.positions // length).astype(np.int32), len(pairs), batch.tokens, reference)


# ---------------------------------------------------------------------------------------------------------------
# The adapters switched off: the reference model for free

def _adapter_types() -> tuple[type, ...]:
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    return (LoRALinear, LoRASwitchLinear, LoRAEmbedding, DoRALinear, DoRAEmbedding)


def _wrapped_base(module):
    # mlx-lm's adapter layers keep the layer they wrap as `.linear` (or `.embedding`); not a documented API,
    # so tests/train/test_preference.py checks that the bypassed model gives the base model's logits exactly.
    return getattr(module, "linear", None) or getattr(module, "embedding", None)


def adapter_layers(model) -> list[tuple[nn.Module, str, nn.Module]]:
    """(block, name within the block, adapter layer) for every outermost adapter layer of the model's blocks."""
    kinds = _adapter_types()
    found = []
    for block in model.layers:
        taken: list[str] = []
        for name, module in sorted(block.named_modules(), key=lambda item: item[0].count(".")):
            if isinstance(module, kinds) and not any(name.startswith(t + ".") for t in taken):
                found.append((block, name, module))
                taken.append(name)
    return found


@contextmanager
def adapters_off(model):
    """Inside: the model computes with its base weights only (each adapter layer swapped for what it wraps)."""
    from mlx.utils import tree_unflatten

    layers = adapter_layers(model)
    by_block: dict[int, list] = {}
    for block, name, module in layers:
        by_block.setdefault(id(block), [block, [], []])
        by_block[id(block)][1].append((name, _wrapped_base(module)))
        by_block[id(block)][2].append((name, module))
    for block, bypass, _ in by_block.values():
        block.update_modules(tree_unflatten(bypass))
    try:
        yield model
    finally:
        for block, _, restore in by_block.values():
            block.update_modules(tree_unflatten(restore))


# ---------------------------------------------------------------------------------------------------------------
# The objective the loop calls

class PreferenceObjective:
    """Loss sum over pairs, the pair count and summed statistics (for reports), for DPO or ORPO."""

    def __init__(self, model, objective: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0,
                 selective: bool = True):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}")
        self.objective = objective
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.logps = SequenceLogProbs(model, selective)

    @property
    def needs_reference(self) -> bool:
        return self.objective == "dpo"

    def reference(self, model, batch: PairBatch) -> tuple[mx.array, mx.array]:
        """Reference log-probs of a batch: precomputed ones, or the adapters switched off for one forward pass."""
        if batch.reference is not None:
            return mx.array(batch.reference[0]), mx.array(batch.reference[1])
        if not self.needs_reference:
            zeros = mx.zeros((batch.pairs,))
            return zeros, zeros
        with adapters_off(model):
            was_training = model.training
            model.eval()
            sums, _ = self.logps(model, *batch.arrays())
            if was_training:
                model.train()
        sums = mx.stop_gradient(sums)
        return sums[: batch.pairs], sums[batch.pairs:]

    def __call__(self, model, inputs, positions, targets, weights, position_rows, reference_chosen,
                 reference_rejected, differentiable: bool = True):
        """Loss sum, pair count and statistics; `differentiable=False` for a forward pass only (evaluation)."""
        sums, counts = self.logps(model, inputs, positions, targets, weights, position_rows, differentiable)
        pairs = reference_chosen.shape[0]
        chosen, rejected = sums[:pairs], sums[pairs:]
        chosen_count, rejected_count = counts[:pairs], counts[pairs:]
        chosen_nll = -chosen / mx.maximum(chosen_count, 1.0)
        if self.objective == "dpo":
            losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, reference_chosen,
                                                                reference_rejected, self.beta, self.label_smoothing)
        else:
            losses, chosen_rewards, rejected_rewards = orpo_loss(chosen / mx.maximum(chosen_count, 1.0),
                                                                 rejected / mx.maximum(rejected_count, 1.0),
                                                                 self.beta)
        stats = mx.stack([chosen_rewards.sum(), rejected_rewards.sum(),
                          preference_accuracy(chosen_rewards, rejected_rewards).sum(), chosen_nll.sum()])
        return losses.sum(), mx.array(float(pairs)), mx.stop_gradient(stats)

    def loss_arrays(self, model, batch: PairBatch) -> tuple[mx.array, ...]:
        return (*batch.arrays(), *self.reference(model, batch))


def summarise(loss_sum: float, pairs: float, stats) -> dict:
    """Means per pair of the loss and the statistics; margin = chosen − rejected reward."""
    stats = [float(s) for s in stats]
    pairs = max(pairs, 1.0)
    out = {"loss": loss_sum / pairs}
    out.update({name: value / pairs for name, value in zip(STAT_NAMES, stats)})
    out["margin"] = out["chosen_reward"] - out["rejected_reward"]
    return out


def evaluate_pairs(model, objective: PreferenceObjective, pairs: list[PreferenceExample], batch_size: int = 4,
                   max_batches: int = -1, references: dict | None = None, parallel=None) -> dict:
    """Mean loss, rewards, margin and preference accuracy over (a fixed subset of) the pairs. With a `parallel`
    (train.parallel.DataParallel) each rank computes its share of the batches and the sums are added up."""
    if not pairs:
        return {}
    was_training = model.training
    model.eval()
    totals = np.zeros(2 + len(STAT_NAMES))  # loss sum, pairs, statistics (float64 across batches)
    for index, batch in enumerate(evaluation_pair_batches(pairs, batch_size, max_batches, references)):
        if parallel is not None and not parallel.mine(index):
            continue
        loss_sum, n, batch_stats = objective(model, *objective.loss_arrays(model, batch), differentiable=False)
        mx.eval(loss_sum, batch_stats)
        totals += np.array([loss_sum.item(), n.item(), *np.array(batch_stats)])
    if parallel is not None and parallel.distributed:
        values = np.array(mx.stack(parallel.sum(*[mx.array(v, dtype=mx.float32) for v in totals])), np.float64)
    else:
        values = totals
    if was_training:
        model.train()
    return summarise(float(values[0]), float(values[1]), values[2:])


def evaluation_pair_batches(pairs: list[PreferenceExample], batch_size: int, max_batches: int = -1,
                            references: dict | None = None):
    ordered = evaluation_subset(pairs, batch_size, max_batches)
    for start in range(0, len(ordered), batch_size):
        yield make_pair_batch(ordered[start:start + batch_size], references)


def answer_logps(model, pairs: list[PreferenceExample], batch_size: int = 8, logps: SequenceLogProbs | None = None
                 ) -> np.ndarray:
    """[len(pairs), 2] summed answer log-probs (chosen, rejected) under the model as it is, in order."""
    logps = logps or SequenceLogProbs(model)
    was_training = model.training
    model.eval()
    out = np.zeros((len(pairs), 2), np.float64)
    for start in range(0, len(pairs), batch_size):
        group = pairs[start:start + batch_size]
        batch = make_pair_batch(group)
        sums, _ = logps(model, *batch.arrays())
        sums = np.array(sums)
        out[start:start + len(group), 0] = sums[: len(group)]
        out[start:start + len(group), 1] = sums[len(group):]
    if was_training:
        model.train()
    return out


def likelihood_accuracy(logps: np.ndarray) -> np.ndarray:
    """Per pair: 1 when the model gives the chosen answer the higher log-prob, ½ on a tie, 0 otherwise."""
    return (logps[:, 0] > logps[:, 1]).astype(np.float64) + 0.5 * (logps[:, 0] == logps[:, 1])
