"""Memory for GRPO runs: the rollout and the update, each planned with the planner's primitives (mlxtune/memory.py).

A step's peak is the larger of its two phases (the rollout's arrays are gone, but for the tokens, when the update
starts):
- rollout: the KV cache of batch_size × G samples of (longest prompt + max_completion_tokens) tokens (each sample
  holds its own copy of its prompt's keys and values), the decode step's logits and sampling temporaries over the
  vocabulary for every row, and one prompt's prefill logits (at batch 1, every position through the head);
- update: one chunk of the update — `UPDATE_ROWS` of the batch_size × G rows (objective.py runs the update's
  forward/backward chunk by chunk, one evaluated before the next) — of prompt + completion, the completion's
  positions (padded as `make_batch` pads them, `padded_positions`: the padding goes through the head too) through
  the selective head: the same estimate as an SFT/DPO micro-batch of that shape (activations, fused head's chunks).
"""

from __future__ import annotations

from dataclasses import replace

from mlxtune.data.batching import PAD_MULTIPLE, padded_positions
from mlxtune.memory.budget import fmt_gb, memory_budget
from mlxtune.memory.estimate import BatchShape, Estimate, ModelFacts, estimate, kv_cache_bytes
from mlxtune.memory.planner import MemoryPlan, run_shape

# Rows per forward/backward of the update (and per reference/πold pass; objective.py's `update_chunks`). mlx-lm-lora
# updates 2 rows at a time; 4 keeps the update's activations a fraction of a G × prompts batch's (the step's peak is
# then the rollout's or the weights') at little cost in update speed. A constant, not a setting: the loss and the
# gradient are the whole batch's for any value.
UPDATE_ROWS = 4
SAMPLING_ARRAYS = 4  # [rows, vocab] float32 per decode step: logits, log-probs, tempered scores, Gumbel noise
KV_CACHE_STEP = 256  # mlx-lm's KVCache and BatchKVCache grow by this many positions (their `step`; tested equal)


def cache_positions(prompt: int, completion: int) -> int:
    """Positions per sample in the rollout's batch cache at its peak. mlx-lm's BatchKVCache (`merge`d from the prompts'
    caches: the longest prompt's length exactly) grows by KV_CACHE_STEP positions when full, concatenating the old
    buffer with a new one: at the last growth both are alive. `completion − 1` positions are appended (the last
    token is sampled, not fed)."""
    growths = -(-(completion - 1) // KV_CACHE_STEP)
    return prompt if growths <= 0 else 2 * prompt + KV_CACHE_STEP * (2 * growths - 1)


def rollout_bytes(facts: ModelFacts, prompts: int, group_size: int, prompt: int, completion: int,
                  on_cpu: bool) -> dict[str, int]:
    """The rollout's own arrays: the batch KV cache of prompts × G samples (`cache_positions`) and each prompt's
    prefill cache, the decode step's vocabulary-sized arrays, one prompt's prefill logits."""
    width = 4 if on_cpu else 2  # the cache's dtype: the model's (float32 on the CPU backend)
    rows = prompts * group_size
    prefill = prompts * KV_CACHE_STEP * -(-prompt // KV_CACHE_STEP)  # KVCache: whole steps too
    return {"kv cache": kv_cache_bytes(facts, rows, cache_positions(prompt, completion), width)
            + kv_cache_bytes(facts, 1, prefill, width),
            "decode logits": SAMPLING_ARRAYS * rows * facts.vocab * 4,
            "prefill logits": prompt * facts.vocab * 4}


def update_shape(settings, longest_prompt: int) -> BatchShape:
    """The shape of one chunk of the update (the largest: all its rows run to --max-completion-tokens). Its
    supervised positions are padded as `make_batch` pads them (`padded_positions`: zero weights, up to a multiple of
    128 but never past the chunk's cells): the padding goes through the head too, so 2 rows × 16 completion tokens
    after a 20-token prompt put 128 positions, not 32, through it."""
    rows = min(settings.batch_size * settings.group_size, UPDATE_ROWS)
    length = PAD_MULTIPLE * -(-(longest_prompt + settings.max_completion_tokens - 1) // PAD_MULTIPLE)
    positions = padded_positions(rows * settings.max_completion_tokens, rows * length)
    return BatchShape(rows, length, positions)


def grpo_phases(facts: ModelFacts, settings, longest_prompt: int, *, cpu: bool | None = None,
                budget: int | None = None) -> dict[str, Estimate]:
    """The step's two phases, each with the weights and the trainable state: the rollout (all the micro-batch's
    samples decoding as one batch) and the update (its largest chunk of `UPDATE_ROWS` rows)."""
    run = replace(run_shape(settings, cpu, facts=facts, budget=budget), fused_head=settings.method != "full")
    update = estimate(facts, run, [update_shape(settings, longest_prompt)])
    fixed = {k: v for k, v in update.parts.items()
             if k in ("weights", "trainable + optimizer", "allowance") or k.startswith("dequantized")}
    rows, context = settings.batch_size * settings.group_size, longest_prompt + settings.max_completion_tokens
    rollout = dict(fixed, **rollout_bytes(facts, settings.batch_size, settings.group_size, longest_prompt,
                                          settings.max_completion_tokens, run.on_cpu))
    return {"rollout": Estimate(sum(rollout.values()), rollout, BatchShape(rows, context, 0)), "update": update}


def estimate_grpo(facts: ModelFacts, settings, longest_prompt: int, *, cpu: bool | None = None,
                  budget: int | None = None) -> Estimate:
    """A step's peak: the larger of its two phases (`grpo_phases`)."""
    phases = grpo_phases(facts, settings, longest_prompt, cpu=cpu, budget=budget)
    return phases["rollout"] if phases["rollout"].total > phases["update"].total else phases["update"]


def plan_grpo(facts: ModelFacts, settings, longest_prompt: int, budget: int, budget_source: str,
              *, cpu: bool | None = None) -> MemoryPlan:
    """Estimate a GRPO run; when it doesn't fit, suggest --grad-checkpoint, then fewer prompts per micro-batch with
    more accumulation (the same prompts and samples per step)."""
    def of(trial):
        return estimate_grpo(facts, trial, longest_prompt, cpu=cpu, budget=budget)

    current = of(settings)
    plan = MemoryPlan(current.total <= budget, current, budget, budget_source)
    if plan.fits:
        return plan
    trial = replace(settings, grad_checkpoint=True)
    found = of(trial)
    plan.suggested = {} if settings.grad_checkpoint else {"grad_checkpoint": True}
    if not settings.grad_checkpoint:
        plan.reasons.append(f"--grad-checkpoint: activations recomputed in the backward pass ({fmt_gb(found.total)})")
    split = False
    while found.total > budget and trial.batch_size > 1:
        trial = replace(trial, batch_size=trial.batch_size // 2, grad_accumulation=trial.grad_accumulation * 2)
        found, split = of(trial), True
    if split:
        plan.suggested.update(batch_size=trial.batch_size, grad_accumulation=trial.grad_accumulation)
        plan.reasons.append(f"--batch-size {trial.batch_size} --grad-accumulation {trial.grad_accumulation}: the "
                            f"same prompts per step, fewer per rollout ({fmt_gb(found.total)})")
    plan.suggested_estimate, plan.suggested_fits = found, found.total <= budget
    return plan


def plan_for_prompts(settings, model_path, longest_prompt: int) -> MemoryPlan:
    """The plan of a GRPO run of `settings` on `model_path` whose longest prompt is `longest_prompt` tokens, against
    the budget of `settings.memory` (the run's check and `mlxtune plan --objective grpo` alike)."""
    budget, source = memory_budget(settings.memory)
    return plan_grpo(ModelFacts.from_dir(model_path), settings, longest_prompt, budget, source)
