"""Memory for preference runs: the planner's estimate (`memory/estimate.py`) for batches of pairs, and settings that
fit.

A step over B pairs is one batch of 2B rows (chosen rows, then rejected rows) whose answer positions go through
the head; with a frozen head the head's gradient is made chunk by chunk in the forward pass (objective.py), so
nothing vocabulary-sized waits for the backward pass. The reference pass and validation are forward passes only.
"""

from __future__ import annotations

from dataclasses import replace

from mlxtune.data.batching import BatchPlan, plan_epoch
from mlxtune.memory.budget import fmt_gb
from mlxtune.memory.estimate import BatchShape, ModelFacts, estimate
from mlxtune.memory.planner import MemoryPlan, run_shape
from mlxtune.train.preference.objective import evaluation_pair_batches, make_pair_batch


def _shape(batch) -> BatchShape:
    rows, length = batch.inputs.shape
    return BatchShape(rows, length, len(batch.positions))


def pair_batch_shapes(pairs, batch_size: int, seed: int) -> list[BatchShape]:
    """The distinct shapes of an epoch's training batches, as the step sees them (padding included)."""
    shapes = {_shape(make_pair_batch([pairs[i] for row in rows for i in row]))
              for rows in plan_epoch(pairs, BatchPlan(batch_size=batch_size), seed, 0)}
    return sorted(shapes, key=lambda s: (s.rows * s.length, s.supervised))


def estimate_preference(facts: ModelFacts, settings, train, valid, *, cpu: bool | None = None,
                        budget: int | None = None):
    run = replace(run_shape(settings, cpu, facts=facts, budget=budget), fused_head=settings.method != "full")
    evals = {_shape(b) for b in evaluation_pair_batches(valid, settings.batch_size, settings.val_batches)}
    return estimate(facts, run, pair_batch_shapes(train, settings.batch_size, settings.seed),
                    sorted(evals, key=lambda s: (s.rows * s.length, s.supervised)))


def plan_preference(facts: ModelFacts, settings, train, valid, budget: int, budget_source: str,
                    *, cpu: bool | None = None) -> MemoryPlan:
    """Estimate a preference run; when it doesn't fit, suggest checkpointing, then fewer pairs per micro-batch with
    more accumulation (the same pairs per optimizer step)."""
    current = estimate_preference(facts, settings, train, valid, cpu=cpu, budget=budget)
    result = MemoryPlan(current.total <= budget, current, budget, budget_source)
    if result.fits:
        return result
    trial, suggested, reasons = replace(settings), {}, []
    best = current
    if not trial.grad_checkpoint:
        trial.grad_checkpoint = suggested["grad_checkpoint"] = True
        best = estimate_preference(facts, trial, train, valid, cpu=cpu, budget=budget)
        reasons.append(f"--grad-checkpoint: recompute activations in the backward pass, same results, slower "
                       f"({fmt_gb(best.total)})")
    while best.total > budget and trial.batch_size > 1:
        trial.batch_size //= 2
        trial.grad_accumulation *= 2
        suggested.update(batch_size=trial.batch_size, grad_accumulation=trial.grad_accumulation)
        best = estimate_preference(facts, trial, train, valid, cpu=cpu, budget=budget)
    if "batch_size" in suggested:
        reasons.append(f"--batch-size {trial.batch_size} --grad-accumulation {trial.grad_accumulation}: the same "
                       f"pairs per step in smaller micro-batches ({fmt_gb(best.total)})")
    result.suggested, result.reasons = suggested, reasons
    result.suggested_estimate, result.suggested_fits = best, best.total <= budget
    return result
