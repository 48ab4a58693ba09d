"""GRPO as the training engine's third objective (after SFT and DPO/ORPO): rollouts, rewards, the clipped update.

One engine step is one rollout batch — `batch_size × grad_accumulation` prompts, G samples each — followed by μ
optimizer updates on it (`updates_per_batch`; the GRPO paper's μ, TRL's `num_iterations`). The step's prompts and
its sampling keys are a pure function of (seed, step), so a resumed run draws and samples exactly what the
uninterrupted one would. Updates 1 … μ−1 are applied here; the engine applies the μ-th (its NaN guard, data-parallel
sums and update are the same as for every objective).

Per micro-batch: `generate_group` (no gradient, the model in eval mode) → the rewards (`rewards.score`, weights
summed) → `group_advantages` → the samples as prompt + completion rows (`rollout_examples`) → their per-token
log-probs recomputed in training mode through the selective head (`SequenceLogProbs`, as DPO) → `grpo_loss`.
With μ > 1, πold is those log-probs before the first update; with μ = 1 the ratio is 1. With β > 0 the reference is
the same weights with the adapters switched off (`adapters_off`, as DPO's).

The loss the engine sees is a sum with a count, so accumulation and data-parallel sums give the batch's mean:
`sequence` and `constant` aggregations count completions, `token` counts completion tokens.

The update shares each prompt as the rollout does (train/grpo/prefix.py): a group's prompt runs through the blocks
once and its completions as one batch attending to the prompt's keys and values — the same log-probs and gradient
as G full prompt + completion rows, with the prompt's arithmetic and activations counted once per pass instead of G
times (models whose caches are not plain KVCaches keep the full rows: `supports_shared_prompt`). The frozen passes
(reference, πold) take a prompt's group in one forward (up to `FROZEN_ROWS` completions: nothing is kept for a
backward pass); the gradient takes it `UPDATE_ROWS` completions at a time (`update_chunks`), one piece evaluated
before the next after one pass of their prompt (`GrpoStep.accumulate_groups`, train/grpo/update.py: the pieces'
gradients with respect to the prompt's keys and values summed, then one backward through the prompt), so the update
holds one piece's activations, not G × prompts rows'. The first update's prompt pass is the rollout's prefill
(`keeps_prompt_passes`: the same weights, no dropout): the rollout keeps it, the update does not run it again. The sum
with a count makes the pieces exact: a piece returns its completions' (or tokens') loss sum and their count, so the
step's Σ sums / Σ counts is the whole batch's loss — DAPO's denominator is every masked token of the batch, not a
piece's — and its gradient the whole batch's (tests/train/test_grpo_chunks.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from mlxtune.data.batching import make_batch, padded_positions
from mlxtune.data.prompts import PromptRecord
from mlxtune.train.engine import Objective
from mlxtune.train.parallel import DataParallel
from mlxtune.train.grpo.losses import GRPOLossConfig, group_advantages, grpo_loss
from mlxtune.memory.grpo import FROZEN_ROWS, UPDATE_ROWS
from mlxtune.train.grpo.rewards import Reward, as_completions, score
from mlxtune.train.grpo.prefix import after_prompt, shared_prompt_states, supports_shared_prompt
from mlxtune.train.grpo.rollout import Rollout, generate_group, rollout_examples, sample_keys
from mlxtune.train.preference.objective import SequenceLogProbs, adapters_off

# Per step, summed over micro-batches and windows; `summarise` turns them into means and rates.
ROLLOUT_STATS = ("completions", "groups", "zero_std_groups", "completion_tokens", "rollout_seconds",
                 "update_seconds", "update_tokens", "reward_sum", "reward_squares")
LOSS_STATS = ("kl", "clip_low", "clip_high", "loss_tokens")  # token sums over every update


@dataclass
class PromptBatch:
    """A micro-batch of prompts: the records, their token ids, and the index that keys their sampling."""

    records: list[PromptRecord]
    ids: list[list[int]]
    key_index: int  # the run-wide index of its first prompt (step · prompts per step + offset): keys its sampling
    step: int
    tokens: int = 0  # prompt + completion tokens of one update pass, set once the rollout is made
    rollout: Rollout | None = None
    texts: list[str] = field(default_factory=list)
    scores: object = None
    advantages: np.ndarray | None = None


@dataclass
class UpdateBatch:
    """Rows of one prompt's update: the forward pass's arrays and what maps its log-probs to [rows, T].

    `arrays`: (prompt [1, P], completion inputs [rows, T − 1], positions, targets) when the rows share their prompt's
    pass, (inputs, positions, targets, weights, rows) as full prompt + completion rows (`make_batch`'s); positions
    index the pass's flat [rows · length] states, padded to few shapes (`padded_positions`). A prompt's group (up to
    FROZEN_ROWS rows) is one batch, for its frozen passes; `pieces` are the gradient's batches of its rows (itself
    when small enough)."""

    arrays: tuple
    gather: mx.array  # [rows, T] index into the flat log-probs (pad: the appended 0)
    advantages: mx.array
    mask: mx.array
    old: mx.array | None = None
    reference: mx.array | None = None
    pieces: list = field(default_factory=list)
    prompt_pass: tuple | None = None  # the rollout's pass of the prompt (`Rollout.prompt_passes`), until used


class GrpoLoss:
    """The clipped GRPO loss of one micro-batch as (loss sum, count, statistics), for `nn.value_and_grad`."""

    def __init__(self, model, config: GRPOLossConfig, selective: bool = True, old_policy: bool = False):
        self.config = config
        self.old_policy = old_policy  # μ > 1: the ratio is taken against the sampling policy's log-probs
        self.logps = SequenceLogProbs(model, selective)
        self.shared_prompt = supports_shared_prompt(model)  # the layout `update_chunks` makes for this model
        self._frozen: dict[bool, object] = {}  # reference (True) / πold (False): their compiled forward passes

    def forward(self, model):
        """`forward(inputs, cache)`: what the head's rows are taken from (train/grpo/prefix.py's passes)."""
        return lambda inputs, cache: self.logps.states(model, inputs, cache)

    def token_log_probs(self, model, arrays, gather, differentiable: bool) -> mx.array:
        if len(arrays) == 4:  # a prompt and its completions (UpdateBatch): the prompt's pass shared
            prompt, completions, positions, targets = arrays
            states = shared_prompt_states(self.forward(model), len(model.layers), prompt, completions)
            nll = self.logps.states_nll(states, positions, targets, differentiable)
        else:  # full prompt + completion rows
            inputs, positions, targets = arrays[:3]
            nll = self.logps.position_nll(model, inputs, positions, targets, differentiable)
        return gathered(nll, gather)

    def frozen_log_probs(self, model, batch: UpdateBatch, reference: bool) -> mx.array:
        """Log-probs without gradient: the policy as it is (πold), or with its adapters off (the reference).
        Both compiled, as the gradient is (uncompiled, this forward took as long as the compiled forward and
        backward on the CPU backend: docs/BENCHMARKS.md, "Where mlxtune's step goes")."""
        compiled = self._frozen.get(reference)
        if compiled is None:
            compiled = self._frozen[reference] = self._compile_frozen(model, reference)
        if not reference:
            return mx.stop_gradient(compiled(*batch.arrays, batch.gather))
        was_training = model.training
        with adapters_off(model):
            model.eval()
            try:
                out = compiled(*batch.arrays, batch.gather)
            finally:
                if was_training:
                    model.train()
        return mx.stop_gradient(out)

    def _compile_frozen(self, model, reference: bool):
        """One compiled forward per kind, each always called in the same state — the reference with the adapters
        off and in eval mode, πold as the policy in training mode — since a trace bakes in the Python-side switches
        (which layers are in the model, `model.training`, so dropout). The parameters are inputs, read when it is
        called (so the adapters_off swap and every update are seen); πold's dropout draws from `mx.random.state`
        as the uncompiled pass did (an input and an output, as in the compiled gradient)."""
        from functools import partial

        state = [model.state] if reference else [model.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=[] if reference else [mx.random.state])
        def log_probs(*arrays):
            return self.token_log_probs(model, arrays[:-1], arrays[-1], False)

        return log_probs

    def loss_arrays(self, model, batch: UpdateBatch) -> tuple:
        # An unused πold or reference: a placeholder keeps the compiled function's arity fixed (two distinct arrays:
        # one array passed as two inputs of a compiled function breaks its input map).
        old = batch.old if batch.old is not None else mx.zeros((1,))
        reference = batch.reference if batch.reference is not None else mx.zeros((1,))
        return (*batch.arrays, batch.gather, batch.advantages, batch.mask, old, reference)

    def __call__(self, model, *arrays):
        forward, (gather, advantages, mask, old, reference) = arrays[:-5], arrays[-5:]
        return self.loss_of(self.token_log_probs(model, forward, gather, True), advantages, mask, old, reference)

    def after_prompt_loss(self, model, prompt_kv: list, last: mx.array, completions, positions, targets, gather,
                          advantages, mask, old, reference):
        """`__call__` of a shared-prompt piece given its prompt's pass (`prefix.prompt_pass`'s keys, values and last
        state) instead of the prompt: the gradient can be taken with respect to that pass too (train/grpo/update.py)."""
        states = after_prompt(self.forward(model), prompt_kv, last, completions)
        log_probs = gathered(self.logps.states_nll(states, positions, targets, True), gather)
        return self.loss_of(log_probs, advantages, mask, old, reference)

    def loss_of(self, log_probs, advantages, mask, old, reference):
        """(loss sum, count, statistics) of [rows, T] log-probs."""
        loss, stats = grpo_loss(log_probs, advantages, mask, self.config,
                                old_log_probs=old if self.old_policy else None,
                                reference_log_probs=reference if self.config.beta else None)
        tokens = mask.astype(mx.float32).sum()
        # The "token" count is computed apart from `tokens`: returning that same array as the count failed inside
        # the compiled step on MLX 0.32.4 (IndexError: _Map_base::at); test_grpo_run.py runs the dapo preset.
        count = (mask.astype(mx.float32).sum(axis=1).sum() if self.config.aggregation == "token"
                 else mx.array(float(mask.shape[0])))
        sums = mx.stack([stats["kl"] * tokens, stats["clip_low"] * tokens, stats["clip_high"] * tokens, tokens])
        return loss * count, count, mx.stop_gradient(sums)


def gathered(nll: mx.array, gather: mx.array) -> mx.array:
    """[rows, T] log-probs from a pass's flat −log-probs: `gather` indexes them, its padding the appended 0."""
    return mx.concatenate([-nll, mx.zeros((1,), nll.dtype)])[gather]


def update_batch(prompt: list[int], tokens: np.ndarray, mask: np.ndarray, advantages: np.ndarray,
                 shared: bool = True) -> UpdateBatch:
    """One prompt's rows — completion tokens [rows, T] and their mask (each row's completion from column 0) — as
    the update's arrays: the prompt once and the completions after it (`shared`), or full prompt + completion rows.
    The rows' log-probs come back as [rows, T] through `gather`, like the rollout's mask."""
    rows, width = tokens.shape
    if shared:
        columns = max(width, 2)  # at least one completion input position (the rest come from the prompt's last)
        padded = np.zeros((rows, columns), np.int32)
        padded[:, :width] = tokens
        cells = np.zeros((rows, columns), bool)
        cells[:, :width] = mask
        supervised = np.flatnonzero(cells)  # row by row, column by column: the mask's own order
        count = padded_positions(len(supervised), rows * columns)
        positions, targets = np.zeros(count, np.int32), np.zeros(count, np.int32)
        positions[:len(supervised)], targets[:len(supervised)] = supervised, padded.reshape(-1)[supervised]
        arrays = (mx.array(np.asarray(prompt, np.int32)[None]), mx.array(padded[:, :-1]), mx.array(positions),
                  mx.array(targets))
    else:
        lengths = mask.sum(axis=1)
        examples = rollout_examples([prompt], Rollout(mx.array(tokens), mx.array(mask), None, [0] * rows, None, 0.0,
                                                      int(lengths.sum())))
        batch = make_batch(examples)
        arrays = (mx.array(batch.inputs), mx.array(batch.positions), mx.array(batch.position_targets),
                  mx.array(batch.position_weights), mx.array(np.zeros(1, np.int32)))
        count = batch.positions.shape[0]
    gather = np.full(mask.shape, count, np.int32)  # the appended 0 after the padding
    gather[mask] = np.arange(int(mask.sum()))  # a row's supervised targets, in order, are its masked tokens
    return UpdateBatch(arrays, mx.array(gather), mx.array(np.asarray(advantages, np.float32)), mx.array(mask))


def even_split(rows: np.ndarray, most: int) -> list[np.ndarray]:
    """`rows` in as few parts of at most `most` as it takes, as even as they come (8 by 4: 4 + 4; 6 by 4: 3 + 3)."""
    count = -(-rows.size // max(1, most))
    return np.array_split(rows, count) if count > 1 else [rows]


def update_chunks(prompt_ids: list[list[int]], rollout: Rollout, advantages: np.ndarray,
                  rows_per_chunk: int = UPDATE_ROWS, shared: bool = True,
                  rows_per_group: int = FROZEN_ROWS) -> list[UpdateBatch]:
    """The rollout's rows as batches of one prompt's rows (its G samples, split when more than `rows_per_group`:
    the frozen passes run on them), each with its `pieces` for the gradient: up to `rows_per_chunk` rows, as even as
    they come (see the module docstring: their loss sums and counts add up to the whole batch's). A group of several
    pieces carries its prompt's pass from the rollout, when the rollout kept them (`GrpoObjective.rollout`)."""
    tokens, mask = np.array(rollout.tokens, np.int32), np.array(rollout.mask, bool)
    advantages = np.asarray(advantages, np.float32)
    owners = np.asarray(rollout.prompt_index)

    def batch(prompt, rows):
        return update_batch(prompt, tokens[rows], mask[rows], advantages[rows], shared)

    groups = []
    for number, prompt in enumerate(prompt_ids):
        for rows in even_split(np.flatnonzero(owners == number), rows_per_group):
            if rows.size:
                group = batch(prompt, rows)
                parts = even_split(rows, rows_per_chunk)
                group.pieces = [group] if len(parts) == 1 else [batch(prompt, part) for part in parts]
                if shared and rollout.prompt_passes is not None and len(parts) > 1:
                    group.prompt_pass = rollout.prompt_passes[number]
                groups.append(group)
    return groups


def gradient_batches(groups: list[UpdateBatch]) -> list[UpdateBatch]:
    """The pieces the gradient runs on, in order."""
    return [piece for group in groups for piece in group.pieces]


class GrpoObjective(Objective):
    """GRPO for the engine. `trainer`: the compiled gradients + update shared with DPO (`PreferenceStep`)."""

    command = "grpo"
    watch = "reward"
    higher_is_better = True
    shown = "reward"

    def __init__(self, model, tokenizer, trainer, loss: GrpoLoss, settings, rewards: list[Reward],
                 train: list[tuple[PromptRecord, list[int]]], valid: list[tuple[PromptRecord, list[int]]],
                 eos_token_ids, on_samples=None, save_settings=None, parallel: DataParallel | None = None):
        self.model, self.tokenizer, self.trainer, self.loss = model, tokenizer, trainer, loss
        # Data-parallel: each rank rolls out and scores its share of the step's prompts (the same samples as one
        # rank would draw for them: keys follow the prompt's place in the step); the engine sums the gradients.
        self.parallel = parallel or DataParallel()
        self.settings, self.rewards, self.train, self.valid = settings, rewards, train, valid
        self.eos_token_ids = eos_token_ids
        self.on_samples = on_samples  # (step, list of sample dicts): where --sample-every's samples go
        self._save_settings = save_settings  # (settings, run_dir): how the run saves them (grpo.yaml + config.yaml)

    # --- the step's prompts -------------------------------------------------------------------------------------

    def prompts_per_step(self) -> int:
        """The whole world's: --batch-size per rank and micro-batch × accumulation × ranks."""
        return self.settings.batch_size * self.settings.grad_accumulation * self.parallel.size

    def prompt_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.settings.seed, epoch]).permutation(len(self.train))

    def batches(self, step: int) -> list:
        """This rank's micro-batches of the step: micro-batch k of the world holds --batch-size prompts per rank,
        rank r taking the r-th --batch-size of them (one rank: all of it)."""
        per_step, size, world = self.prompts_per_step(), self.settings.batch_size, self.parallel.size
        start = step * per_step
        picked = []
        for index in range(start, start + per_step):
            epoch, within = divmod(index, len(self.train))
            picked.append(int(self.prompt_order(epoch)[within]))
        mine = [k + self.parallel.rank * size for k in range(0, per_step, size * world)]
        return [PromptBatch([self.train[i][0] for i in picked[k:k + size]],
                            [self.train[i][1] for i in picked[k:k + size]], start + k, step)
                for k in mine]

    def keys(self, batch: PromptBatch) -> mx.array:
        """G sampling keys per prompt, from the prompt's place in the run (seed, step, position in the step): the
        same samples however the memory guard splits the step into micro-batches, and again on resume."""
        seed = self.settings.seed * 1_000_003 + batch.key_index
        return mx.concatenate([sample_keys(mx.random.key(seed + j), 1, self.settings.group_size)
                               for j in range(len(batch.ids))])

    # --- rollouts and rewards -----------------------------------------------------------------------------------

    def generate(self, ids: list[list[int]], keys: mx.array, temperature: float, top_p: float,
                 prompt_passes: bool = False) -> Rollout:
        """`prompt_passes`: keep each prompt's pass for the update (`keeps_prompt_passes`). A run's rollouts give the
        prefill the selective head (only each prompt's last position through it; short prompts batched); a scorer
        without a loss (eval's) prefills each prompt through the model's own forward."""
        selective = self.loss is not None and self.loss.logps.selective
        was_training = self.model.training
        self.model.eval()
        try:
            return generate_group(self.model, ids, keys, max_tokens=self.settings.max_completion_tokens,
                                  eos_token_ids=self.eos_token_ids, temperature=temperature, top_p=top_p,
                                  head=self.loss.logps.head if selective else None,
                                  keep_prompt_passes=prompt_passes)
        finally:
            if was_training:
                self.model.train()

    def score(self, records: list[PromptRecord], rollout: Rollout):
        texts = [self.tokenizer.decode([t for t in rollout.completion(row) if t not in self.eos_token_ids])
                 for row in range(len(rollout.prompt_index))]
        owners = [records[p] for p in rollout.prompt_index]
        prompts = [r.prompt for r in owners]
        return texts, score(self.rewards, prompts, as_completions(texts, prompts), [r.fields for r in owners],
                            [r.source for r in owners])

    def keeps_prompt_passes(self) -> bool:
        """Whether the rollout's prefill stands in for the update's prompt pass (train/grpo/update.py): the same
        function at the same weights — the blocks as the selective head's pass runs them, no dropout (the rollout runs
        in eval mode, the update in training mode), and a group of several gradient pieces (one piece runs its prompt
        inside its own gradient). The first update only: later ones (μ > 1) see other weights."""
        s = self.settings
        return (self.loss.shared_prompt and self.loss.logps.selective and not s.dropout
                and s.group_size > UPDATE_ROWS)

    def rollout(self, batch: PromptBatch) -> tuple[list[UpdateBatch], np.ndarray]:
        """The micro-batch's samples, rewards and update rows (in chunks), and its rollout statistics."""
        s = self.settings
        batch.rollout = rollout = self.generate(batch.ids, self.keys(batch), s.temperature, s.top_p,
                                                self.keeps_prompt_passes())
        batch.texts, batch.scores = self.score(batch.records, rollout)
        total = batch.scores.total
        grouped = total.reshape(-1, s.group_size)
        batch.advantages = np.array(group_advantages(mx.array(total), s.group_size, self.loss.config.scale_rewards))
        updates = update_chunks(batch.ids, rollout, batch.advantages, shared=self.loss.shared_prompt)
        batch.tokens = int(sum(len(p) for p in batch.ids) * s.group_size + rollout.generated_tokens)
        stats = [len(total), grouped.shape[0], float((grouped.std(axis=1) == 0).sum()), rollout.generated_tokens,
                 rollout.seconds, 0.0, 0.0, float(total.sum()), float((total ** 2).sum())]
        for row in batch.scores.values:
            applied = row[~np.isnan(row)]
            stats += [float(applied.sum()), float((applied ** 2).sum()), float(applied.size)]
        return updates, np.array(stats, np.float64)

    def samples(self, batch: PromptBatch) -> list[dict]:
        out = []
        for row, text in enumerate(batch.texts):
            record = batch.records[batch.rollout.prompt_index[row]]
            rewards = {name: (None if np.isnan(v[row]) else float(v[row]))
                       for name, v in zip(batch.scores.names, batch.scores.values)}
            out.append({"step": batch.step + 1, "source": record.source, "prompt": record.prompt,
                        "completion": text, "rewards": rewards, "total": float(batch.scores.total[row]),
                        "advantage": float(batch.advantages[row])})
        return out

    # --- the engine's calls -------------------------------------------------------------------------------------

    def gradients(self, micro: list):
        s = self.settings
        made = [self.rollout(batch) for batch in micro]
        updates, stats = [u for chunks, _ in made for u in chunks], sum(st for _, st in made)
        if self.on_samples is not None and s.sample_every and (micro[0].step + 1) % s.sample_every == 0:
            self.on_samples(micro[0].step + 1, [x for b in micro for x in self.samples(b)])
        tic = time.perf_counter()
        self.frozen(updates)
        loss_stats = np.zeros(len(LOSS_STATS))
        for number in range(s.updates_per_batch):
            loss_sum, count, step_stats, grads = self.trainer.accumulate_groups(updates)
            loss_stats += np.array(step_stats)
            if number == s.updates_per_batch - 1:
                break  # the last update is the engine's (it sums the ranks' gradients itself)
            # an earlier update: the world's gradient sum here, as the engine's for the last (one rank: unchanged)
            world_loss, world_count, _, world_grads = self.parallel.reduce_step(loss_sum, count, 0, grads)
            if not np.isfinite((world_loss / world_count).item()):
                break  # a NaN: the engine's guard stops the run (on every rank: it sees the same sums)
            self.trainer.update(world_grads, world_count)
            mx.eval(self.trainer.state)
        stats[ROLLOUT_STATS.index("update_seconds")] = time.perf_counter() - tic
        stats[ROLLOUT_STATS.index("update_tokens")] = sum(b.tokens for b in micro) * s.updates_per_batch
        return loss_sum, count, mx.array(np.concatenate([stats, loss_stats]).astype(np.float32)), grads

    def frozen(self, groups: list[UpdateBatch]) -> None:
        """The log-probs the updates compare with, a prompt's group at a time (one forward, no activations kept),
        each evaluated on its own and handed to the group's pieces: the reference's (β > 0) and πold's (μ > 1: the
        sampling policy in training mode, before the first update)."""
        for group in groups:
            for name, wanted in (("reference", self.loss.config.beta), ("old", self.loss.old_policy)):
                if not wanted:
                    continue
                values = self.loss.frozen_log_probs(self.model, group, reference=name == "reference")
                mx.eval(values)
                start = 0
                for piece in group.pieces:
                    rows = piece.mask.shape[0]
                    setattr(piece, name, values[start:start + rows] if piece is not group else values)
                    start += rows

    def has_validation(self) -> bool:
        return bool(self.valid)

    def validation_prompts(self) -> list[tuple[PromptRecord, list[int]]]:
        s = self.settings  # --val-batches of the world's batch (--batch-size per rank), as dpo's
        n = len(self.valid) if s.val_batches < 0 else s.val_batches * s.batch_size * self.parallel.size
        return self.valid[:n]

    def validate(self) -> dict:
        """Mean reward of one completion per held-out prompt, sampled with fixed keys (`best/` follows it)."""
        return world_mean_reward(self, self.validation_prompts(), self.parallel)

    def summarise(self, loss_sum: float, count: float, stats) -> dict:
        return summarise(loss_sum, count, np.asarray(stats, np.float64), [r.spec for r in self.rewards])

    def progress_note(self, m: dict) -> str:
        return (f"reward {m['reward']:.3f} ± {m['reward_std']:.2f} · kl {m['kl']:.3g} · clip {m['clip_fraction']:.2f}"
                f" · len {m['completion_length']:.0f} · rollout {m['rollout_tokens_per_second']:.0f} tok/s")

    def shrink(self, guard, peak: int | None, step: int) -> dict:
        # Fewer prompts per micro-batch, more micro-batches: the prompts (and samples) of a step are unchanged.
        return guard.shrink(self.settings, None, 0, peak, step, fixed_batches=True)

    def save_settings(self, run_dir) -> None:
        self._save_settings(self.settings, run_dir)

    def nan_hint(self) -> str:
        return "lower --learning-rate (or --epsilon-high / --updates-per-batch)"

    def try_first(self, step: int) -> None:
        """Fail fast: the longest rows an update can see (the longest prompts' group, every sample run to
        --max-completion-tokens) through one gradient pass, untimed and discarded."""
        s = self.settings
        longest = sorted(self.train, key=lambda item: -len(item[1]))[: s.batch_size]
        ids = [item[1] for item in longest]
        rows = len(ids) * s.group_size
        tokens = mx.ones((rows, s.max_completion_tokens), mx.int32)
        rollout = Rollout(tokens, mx.ones(tokens.shape, mx.bool_), mx.zeros(tokens.shape),
                          [p for p in range(len(ids)) for _ in range(s.group_size)], mx.zeros((rows, 2)), 0.0,
                          rows * s.max_completion_tokens)
        updates = update_chunks(ids, rollout, np.zeros(rows, np.float32), shared=self.loss.shared_prompt)
        self.frozen(updates)
        self.trainer.accumulate_groups(updates)  # the optimizer's state exists: the engine made it


VALIDATION_KEY = 2**31 - 1  # validation samples are keyed apart from every training sample (seed · 1_000_003 + i)


def mean_reward(objective: GrpoObjective, items: list[tuple[PromptRecord, list[int]]],
                batch_size: int | None = None, key_offsets: list[int] | None = None, completions: int = 1,
                advance=None) -> dict:
    """`completions` per prompt of `items` at the run's temperature and top-p, with fixed keys (the i-th prompt's
    keys are the same at every evaluation, and for base and tuned: the comparisons are paired), scored: the mean
    total reward, each reward's mean, per prompt the mean of its completions' totals and rewards, and its first
    completion's text and total (`texts`, `firsts`: eval's samples). Temperature 0 is greedy. `advance(n)`: called as
    each batch of n prompts is scored (a progress bar)."""
    s = objective.settings
    batch_size = batch_size or s.batch_size
    totals, per_reward, texts, firsts = [], {r.spec: [] for r in objective.rewards}, [], []
    for number, start in enumerate(range(0, len(items), batch_size)):
        chunk = items[start:start + batch_size]
        offset = key_offsets[number] if key_offsets is not None else start  # the chunk's place in the whole list
        keys = [mx.random.key(VALIDATION_KEY + offset + j) for j in range(len(chunk))]
        # one completion: the prompt's key itself (validation's since the first release); more: keys split from it
        keys = mx.stack(keys) if completions == 1 else mx.concatenate([sample_keys(k, 1, completions) for k in keys])
        rollout = objective.generate([item[1] for item in chunk], keys, s.temperature, s.top_p)
        chunk_texts, scores = objective.score([item[0] for item in chunk], rollout)
        texts.extend(chunk_texts[::completions])
        firsts.extend(scores.total[::completions].tolist())
        totals.extend(scores.total.reshape(len(chunk), completions).mean(axis=1).tolist())
        for name, row in zip(scores.names, scores.values):
            per_prompt = np.asarray(row, np.float64).reshape(len(chunk), completions)
            applied = (~np.isnan(per_prompt)).sum(axis=1)  # None (NaN) leaves a completion out of its prompt's mean
            sums = np.where(np.isnan(per_prompt), 0.0, per_prompt).sum(axis=1)
            per_reward[name].extend(np.where(applied > 0, sums / np.maximum(applied, 1), np.nan).tolist())
        if advance is not None:
            advance(len(chunk))
    # no validation loss: the reward is the measure; `values` per reward, per prompt (NaN: None), for eval's intervals
    out = {"reward": float(np.mean(totals)) if totals else float("nan"), "totals": totals, "values": per_reward,
           "texts": texts, "firsts": firsts}
    for name, values in per_reward.items():
        values = np.array(values)
        applied = values[~np.isnan(values)]
        out[f"reward_{name}"] = float(applied.mean()) if applied.size else None
    return out


def world_mean_reward(objective: GrpoObjective, items: list, parallel: DataParallel) -> dict:
    """`mean_reward`'s means without the per-prompt lists; data-parallel, each rank samples its share of the
    batches (the same fixed keys as one rank) and the sums are added up."""
    size = objective.settings.batch_size
    starts = [start for number, start in enumerate(range(0, len(items), size)) if parallel.mine(number)]
    out = mean_reward(objective, [item for start in starts for item in items[start:start + size]], size,
                      key_offsets=starts)
    if not parallel.distributed:
        for per_prompt in ("totals", "values", "texts", "firsts"):  # eval's intervals and samples, not metrics
            out.pop(per_prompt)
        return out
    names = list(out["values"])
    sums = [float(np.sum(out["totals"])), float(len(out["totals"]))]
    for name in names:
        values = np.array(out["values"][name], np.float64)
        applied = values[~np.isnan(values)]
        sums += [float(applied.sum()), float(applied.size)]
    world = [float(v.item()) for v in parallel.sum(*[mx.array(v, dtype=mx.float32) for v in sums])]
    result = {"reward": world[0] / max(world[1], 1.0)}
    for number, name in enumerate(names):
        total, applied = world[2 + 2 * number], world[3 + 2 * number]
        result[f"reward_{name}"] = total / applied if applied else None
    return result


def summarise(loss_sum: float, count: float, stats: np.ndarray, names: list[str]) -> dict:
    """A report window's means and rates from the summed statistics."""
    base = dict(zip(ROLLOUT_STATS, stats[:len(ROLLOUT_STATS)]))
    per = stats[len(ROLLOUT_STATS):len(stats) - len(LOSS_STATS)].reshape(-1, 3)
    loss = dict(zip(LOSS_STATS, stats[len(stats) - len(LOSS_STATS):]))
    n = max(base["completions"], 1.0)
    mean = base["reward_sum"] / n
    out = {"loss": loss_sum / max(count, 1.0), "reward": mean,
           "reward_std": float(np.sqrt(max(base["reward_squares"] / n - mean ** 2, 0.0)))}
    for name, (total, squares, applied) in zip(names, per):
        m = total / applied if applied else float("nan")
        out[f"reward_{name}"] = m
        out[f"reward_{name}_std"] = float(np.sqrt(max(squares / applied - m ** 2, 0.0))) if applied else float("nan")
    tokens = max(loss["loss_tokens"], 1.0)
    out.update({"completions": int(base["completions"]), "zero_std_groups": base["zero_std_groups"] / max(base["groups"], 1.0),
                "completion_length": base["completion_tokens"] / n,
                "kl": loss["kl"] / tokens, "clip_fraction": (loss["clip_low"] + loss["clip_high"]) / tokens,
                "clip_low": loss["clip_low"] / tokens, "clip_high": loss["clip_high"] / tokens,
                "rollout_tokens_per_second": base["completion_tokens"] / max(base["rollout_seconds"], 1e-9),
                "update_tokens_per_second": base["update_tokens"] / max(base["update_seconds"], 1e-9)})
    return out
