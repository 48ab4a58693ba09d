"""Memory for GRPO runs: the rollout and the update, each planned with the planner's primitives (mlxtune/memory.py).

A step's peak is the larger of its two phases (the rollout's arrays are gone, but for the tokens, when the update
starts):
- rollout: the KV cache of batch_size × G samples of (longest prompt + max_completion_tokens) tokens (each sample
  holds its own copy of its prompt's keys and values; `cache_positions`), the decode step's logits and sampling
  temporaries over the vocabulary for every row, and one prompt's prefill logits (at batch 1, every position
  through the head);
- update: one piece of the gradient — `UPDATE_ROWS` of a prompt's G completions after their shared prompt
  (objective.py runs the forward/backward piece by piece, one evaluated before the next; train/grpo/prefix.py) —
  the completions as an SFT/DPO micro-batch of that shape (activations, their positions through the fused head,
  padded as `padded_positions` pads them) plus what they keep of the prompt for the backward
  (`shared_prompt_bytes`: the prompt's pass itself only when the group is one piece; split, the group's prompt runs
  once, its forward and backward apart from the pieces: train/grpo/update.py); or, when larger, that prompt pass, or
  the frozen passes' forward over a prompt's group (up to `FROZEN_ROWS` completions). Models whose
  caches are not plain KVCaches (sliding windows, recurrent layers: `config_supports_shared_prompt`) run full
  prompt + completion rows, `UPDATE_ROWS` a piece (`full_rows_shape`), and are planned so.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mlxtune.data.batching import PAD_MULTIPLE, padded_positions
from mlxtune.memory.budget import fmt_gb, memory_budget
from mlxtune.memory.estimate import (BatchShape, Estimate, ModelFacts, RunShape, _adapted, activation_bytes,
                                     estimate, kv_cache_bytes)
from mlxtune.memory.planner import MemoryPlan, run_shape
from mlxtune.model_config import read_config
from mlxtune.train.grpo.prefix import config_supports_shared_prompt

# Completions per forward/backward of the update, after one pass of the prompt they share (train/grpo/update.py).
# mlx-lm-lora updates 2 rows at a time. 4: on SmolLM2 (float32, G 8, 32 tokens, one prompt pass per group) two
# pieces of 4 per group (against 3 + 3 + 2) made the gradient 15% faster and the whole step 10% (4 interleaved pairs
# on an idle machine, 2026-12-07: each piece has a fixed cost — a pass over the weights in each direction — of
# about 0.17 s there) for 63 MB more peak (0.853 against 0.790 GB; a piece of 8 peaked at 1.155 GB; docs/BENCHMARKS.md).
# A constant, not a setting: the loss and the gradient are the whole batch's for any value.
UPDATE_ROWS = 4
FROZEN_ROWS = 8  # completions per reference/πold forward (nothing kept for a backward; more, and its attention
# probabilities outgrow a gradient piece's kept activations on long completions: G 64 × 256 tokens on stories260K)
SAMPLING_ARRAYS = 4  # [rows, vocab] float32 per decode step: logits, their exps, tempered and padded copies (the
# two-level draw, train/grpo/rollout.py; with top-p: log-probs, sorted scores, noise)
KV_CACHE_STEP = 256  # mlx-lm's KVCache grows by this many positions (its `step`; tested equal): the prefill's caches


def cache_positions(prompt: int, completion: int) -> int:
    """Positions per sample in the rollout's batch cache at its peak. mlx-lm's BatchKVCache (`merge`d from the prompts'
    caches: the longest prompt's length exactly) grows when full by its `step`, which the rollout sets to the
    `completion − 1` positions decoding appends (the last token is sampled, not fed): one growth, concatenating the
    old buffer with the new one, both alive while it runs."""
    return prompt if completion <= 1 else 2 * prompt + completion - 1


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


def piece_rows(group_size: int, most: int) -> int:
    """The largest part when a prompt's G rows are split evenly into parts of at most `most` (objective.py's
    `even_split`: 8 by 4 → 4, 6 by 4 → 3)."""
    return -(-group_size // -(-group_size // max(1, most)))


def update_shape(settings) -> BatchShape:
    """The completions of one gradient piece (the largest: every row run to --max-completion-tokens): rows × the
    completion's input positions (all its tokens but the last; the first is predicted from the prompt's last
    position), their supervised positions padded as objective.py's `update_batch` pads them (`padded_positions`:
    zero weights, up to a multiple of 128 but never past the piece's cells: the padding goes through the head too)."""
    rows = piece_rows(settings.group_size, UPDATE_ROWS)
    width = max(settings.max_completion_tokens, 2)
    return BatchShape(rows, width - 1, padded_positions(rows * settings.max_completion_tokens, rows * width))


def full_rows_shape(settings, prompt: int) -> BatchShape:
    """A gradient piece of full prompt + completion rows (models without the shared prompt): `make_batch`'s rows,
    padded to a multiple of PAD_MULTIPLE, every completion at --max-completion-tokens and supervised."""
    rows = piece_rows(settings.group_size, UPDATE_ROWS)
    length = PAD_MULTIPLE * -(-(prompt + settings.max_completion_tokens - 1) // PAD_MULTIPLE)
    return BatchShape(rows, length, padded_positions(rows * settings.max_completion_tokens, rows * length))


def shared_prompt_bytes(facts: ModelFacts, run: RunShape, rows: int, prompt: int, completion: int,
                        own_pass: bool = True) -> int:
    """What a gradient piece keeps for the backward pass beyond its completions' own activations: in each block the
    prompt's keys and values broadcast into every completion row's and (CPU backend) the completions' attention
    probabilities over the prompt's positions; and the prompt's pass (batch 1) when the piece runs it (`own_pass`:
    a group of one piece), else its keys and values three times (the pass's outputs, the piece's gradient with
    respect to them and the group's running sum: train/grpo/update.py)."""
    per_block = rows * prompt_kv_bytes(facts, run, prompt, layers=1)
    if run.on_cpu:
        per_block += rows * facts.heads * completion * prompt * 4
    blocks = 1 if run.grad_checkpoint else len(_adapted(facts, run))
    prompt_pass = (activation_bytes(facts, run, BatchShape(1, prompt, 0))["activations"] if own_pass
                   else 3 * prompt_kv_bytes(facts, run, prompt))
    return prompt_pass + blocks * per_block


def prompt_kv_bytes(facts: ModelFacts, run: RunShape, prompt: int, layers: int | None = None) -> int:
    """The keys and values of one prompt's pass (batch 1) in `layers` layers (default: every layer)."""
    layers = facts.layers if layers is None else layers
    return layers * 2 * facts.kv_heads * facts.head_dim * prompt * (4 if run.on_cpu else 2)


def update_passes(facts: ModelFacts, run: RunShape, settings, longest_prompt: int,
                  shared: bool = True) -> dict[str, Estimate]:
    """The update's kinds of pass: a gradient piece (its completions, plus what it keeps of its prompt's pass; or
    full prompt + completion rows when not `shared`), a frozen forward over a prompt's group (the reference, πold;
    its prompt counted per row: a bound) and, when a group takes more than one piece, the prompt's own forward and
    backward (train/grpo/update.py)."""
    rows = piece_rows(settings.group_size, FROZEN_ROWS)
    if not shared:
        piece = full_rows_shape(settings, longest_prompt)
        group = BatchShape(rows, piece.length, padded_positions(rows * settings.max_completion_tokens,
                                                                rows * piece.length))
        return {"gradient": estimate(facts, run, [piece]), "frozen": estimate(facts, run, [], [group])}
    piece = update_shape(settings)
    one_piece = piece.rows >= settings.group_size  # the group's prompt pass inside its one piece
    gradient = estimate(facts, run, [piece])
    gradient.parts["shared prompt"] = shared_prompt_bytes(facts, run, piece.rows, longest_prompt, piece.length,
                                                          own_pass=one_piece)
    gradient.total += gradient.parts["shared prompt"]
    frozen = estimate(facts, run, [], [BatchShape(rows, longest_prompt + piece.length, padded_positions(
        rows * settings.max_completion_tokens, rows * (piece.length + 1)))])
    passes = {"gradient": gradient, "frozen": frozen}
    if not one_piece:  # the prompt's backward from the pieces' summed key/value gradients (train/grpo/update.py)
        prompt = estimate(facts, run, [BatchShape(1, longest_prompt, 0)])
        prompt.parts["prompt keys and values"] = 2 * prompt_kv_bytes(facts, run, longest_prompt)
        prompt.total += prompt.parts["prompt keys and values"]
        passes["prompt"] = prompt
        # the rollout's prompt passes, kept through the update for its first use (GrpoObjective.keeps_prompt_passes:
        # each prompt's keys and values, one group's counted in the piece's too — a bound)
        held = settings.batch_size * prompt_kv_bytes(facts, run, longest_prompt)
        for phase in passes.values():
            phase.parts["rollout's prompt passes"] = held
            phase.total += held
    return passes


def grpo_phases(facts: ModelFacts, settings, longest_prompt: int, *, cpu: bool | None = None,
                budget: int | None = None, shared: bool = True) -> dict[str, Estimate]:
    """The step's two phases, each with the weights and the trainable state: the rollout (all the micro-batch's
    samples decoding as one batch) and the update (its largest gradient piece of `UPDATE_ROWS` completions after
    their prompt — full prompt + completion rows when not `shared` —, or the frozen passes' forward when larger)."""
    run = replace(run_shape(settings, cpu, facts=facts, budget=budget), fused_head=settings.method != "full")
    update = max(update_passes(facts, run, settings, longest_prompt, shared).values(), key=lambda phase: phase.total)
    fixed = {k: v for k, v in update.parts.items()
             if k in ("weights", "trainable + optimizer", "allowance") or k.startswith("dequantized")}
    rows, context = settings.batch_size * settings.group_size, longest_prompt + settings.max_completion_tokens
    rollout = dict(fixed, **rollout_bytes(facts, settings.batch_size, settings.group_size, longest_prompt,
                                          settings.max_completion_tokens, run.on_cpu))
    return {"rollout": Estimate(sum(rollout.values()), rollout, BatchShape(rows, context, 0)), "update": update}


def estimate_grpo(facts: ModelFacts, settings, longest_prompt: int, *, cpu: bool | None = None,
                  budget: int | None = None, shared: bool = True) -> Estimate:
    """A step's peak: the larger of its two phases (`grpo_phases`)."""
    phases = grpo_phases(facts, settings, longest_prompt, cpu=cpu, budget=budget, shared=shared)
    return phases["rollout"] if phases["rollout"].total > phases["update"].total else phases["update"]


def plan_grpo(facts: ModelFacts, settings, longest_prompt: int, budget: int, budget_source: str,
              *, cpu: bool | None = None, shared: bool = True) -> MemoryPlan:
    """Estimate a GRPO run; when it doesn't fit, suggest --grad-checkpoint, then fewer prompts per micro-batch with
    more accumulation (the same prompts and samples per step)."""
    def of(trial):
        return estimate_grpo(facts, trial, longest_prompt, cpu=cpu, budget=budget, shared=shared)

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
    return plan_grpo(ModelFacts.from_dir(model_path), settings, longest_prompt, budget, source,
                     shared=shares_prompt(model_path))


def shares_prompt(model_path) -> bool:
    """Whether the run's update shares each prompt (objective.py's layout for this model), from its folder."""
    return config_supports_shared_prompt(read_config(Path(model_path)))
