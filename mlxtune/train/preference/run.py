"""`mlxtune dpo` / `mlxtune orpo`: the preference objective (train/preference/objective.py) run by the engine.

The same engine as `mlxtune lora` (train/engine.py: checkpoints, exact resume with the data fingerprint, best/,
patience, the NaN guard, signals, the memory guard, metrics.jsonl, loss.png) with pairs instead of examples. The run
directory is an ordinary run: fuse, export, chat and generate take it as they take a LoRA run. `--from RUN_DIR`
starts from a supervised run: its adapter is merged into the base before the engine starts (fuse.merge_sft_run,
written once into the new run as `sft-merged/`), which is then both the model the new adapter trains on and DPO's
reference.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlxtune.cpu_quantized import requested_path
from mlxtune.data.batching import BatchPlan, batches_per_epoch, plan_epoch
from mlxtune.data.dataset import resolve_data_path
from mlxtune.data.preference import PreferenceSets, read_preference_splits, tokenize_preference_splits
from mlxtune.data.quality import context_warnings
from mlxtune.errors import UsageError
from mlxtune.model_config import context_length, model_name, read_config
from mlxtune.models import load_model
from mlxtune.runs import PREFERENCE_FILE, REFERENCE_FILE, RUN_FILE, TEMPLATE_FILE
from mlxtune.settings import PreferenceSettings
from mlxtune.storage import atomic_write_text, check_writable
from mlxtune.train.adapters import parameter_counts
from mlxtune.train.engine import Objective, TrainingRun, finish, grad_checkpoint, prepare_backend, train
from mlxtune.train.parallel import DataParallel, check_resume_ranks
from mlxtune.train.recovery import apply_resume_flags, data_fingerprint
from mlxtune.train.runsetup import (ObjectiveResult, check_from_run, load_split_settings, open_run_dir,
                                    plan_then_adapt, restore, save_split_settings, verdict_or_refusal)
from mlxtune.train.preference.objective import (
    STAT_NAMES,
    PreferenceObjective,
    SequenceLogProbs,
    adapters_off,
    answer_logps,
    evaluate_pairs,
    make_pair_batch,
    summarise,
)
from mlxtune.train.step import build_optimizer
from mlxtune.ui import TrainingReporter, make_console, step_progress, summary_table


def save_preference_settings(settings: PreferenceSettings, run_dir: Path) -> None:
    """config.yaml stays a plain LoRA config (fuse/export/chat read it); the objective goes to preference.yaml."""
    save_split_settings(settings, run_dir, PREFERENCE_FILE)


def load_preference_settings(run_dir: Path) -> PreferenceSettings:
    return load_split_settings(run_dir, PREFERENCE_FILE, PreferenceSettings)


def is_preference_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / PREFERENCE_FILE).is_file()


def resume_preference_settings(run_dir: str | Path, overrides: dict, objective: str | None = None) -> PreferenceSettings:
    """A preference run's settings with `overrides` (flags; None = not given) applied as `mlxtune lora --resume`
    applies them (recovery.apply_resume_flags); `objective`: the command resuming it, which must be the run's."""
    run_dir = Path(run_dir)
    if not is_preference_run(run_dir):
        raise UsageError(f"{run_dir} is not a preference run (no {PREFERENCE_FILE})",
                         "resume a LoRA run with mlxtune lora --resume")
    settings = load_preference_settings(run_dir)
    if objective is not None and objective != settings.objective:
        raise UsageError(f"{run_dir} is a {settings.objective} run", f"resume it with mlxtune {settings.objective} "
                         f"--resume {run_dir}")
    apply_resume_flags(settings, overrides, run_dir)
    settings.out = str(run_dir)
    return settings.validate()


@dataclass
class PreferenceResult(ObjectiveResult):
    objective: str = "dpo"  # dpo | orpo
    reference: str = "adapters off"  # adapters off | precomputed | none


class PreferenceStep:
    """Compiled gradients and update, like train/step.py's, for the preference objective."""

    def __init__(self, model, optimizer: optim.Optimizer, grad_clip: float, objective: PreferenceObjective):
        from functools import partial

        self.model, self.optimizer, self.objective = model, optimizer, objective
        self.state = [model.state, optimizer.state, mx.random.state]
        loss_and_grad = nn.value_and_grad(model, objective)

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def gradients(*arrays):
            (loss_sum, pairs, stats), grads = loss_and_grad(model, *arrays)
            return loss_sum, pairs, stats, grads

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def update(grads, pairs):
            grads = tree_map(lambda g: g / pairs, grads)  # the mean over the step's pairs
            grads, norm = optim.clip_grad_norm(grads, grad_clip if grad_clip > 0 else math.inf)
            optimizer.update(model, grads)
            return norm

        self.gradients, self.update = gradients, update

    def accumulate(self, batches):
        """Loss sum, pair count, statistics and summed gradients of one step. A None batch (a data-parallel rank
        with no share of a short batch) adds nothing; with none at all everything is zero."""
        total = None
        for batch in (b for b in batches if b is not None):
            # The reference pass runs outside the compiled gradient: it swaps the adapter layers out and back.
            # It is evaluated on its own, first: in one graph with the policy pass, its vocabulary-sized
            # temporaries would be alive at the same time as the policy's (a third more peak memory).
            arrays = self.objective.loss_arrays(self.model, batch)
            mx.eval(arrays[-2:])
            total = add_step(total, self.gradients(*arrays))
            # One micro-batch at a time (as train/step.py): together they would hold all their activations at
            # once, and gradient accumulation would save no memory.
            mx.eval(*total)
        return total if total is not None else self.nothing()

    def nothing(self) -> tuple:
        """The step's sums when it has no batch: zeros."""
        total = (mx.array(0.0), mx.array(0.0), mx.zeros(len(STAT_NAMES)),
                 tree_map(mx.zeros_like, self.model.trainable_parameters()))
        mx.eval(*total)
        return total


def add_step(total: tuple | None, out: tuple) -> tuple:
    """Running sums of (loss sum, count, statistics, gradients): `out` added to `total` (None: nothing yet)."""
    return out if total is None else tuple(
        tree_map(mx.add, a, b) if isinstance(a, dict) else a + b for a, b in zip(total, out))


def _pair_batch_at(pairs, plan: BatchPlan, seed: int, index: int, references, rank: int = 0, ranks: int = 1):
    """The `index`-th training batch of pairs, counting across epochs (a pure function of seed and index). With
    `ranks` > 1: this rank's share, every `ranks`-th pair from pair `rank` on (None when it has none)."""
    epoch = 0
    while True:
        batches = plan_epoch(pairs, plan, seed, epoch)
        if index < len(batches):
            share = [pairs[i] for row in batches[index] for i in row][rank::ranks]
            return make_pair_batch(share, references) if share else None
        index -= len(batches)
        epoch += 1


def precompute_references(model, objective: PreferenceObjective, sets: PreferenceSets, run_dir: Path,
                          batch_size: int, console, save: bool = True) -> dict[str, tuple[float, float]]:
    """Reference log-probs of every pair, from the weights before training; cached in the run by pair fingerprint
    (written only when `save`: data-parallel ranks other than 0 compute theirs and write nothing)."""
    path = run_dir / REFERENCE_FILE
    cached: dict[str, tuple[float, float]] = {}
    if path.is_file():
        with np.load(path) as stored:
            cached = {key: (float(v[0]), float(v[1])) for key, v in zip(stored["keys"], stored["values"])}
    pairs = [p for p in sets.train + sets.valid if p.fingerprint not in cached]
    if pairs:
        logps = SequenceLogProbs(model, objective.logps.selective)
        with adapters_off(model), step_progress(console, "reference log-probs") as progress:
            task = progress.add_task("reference", total=len(pairs))
            for start in range(0, len(pairs), batch_size):
                group = pairs[start:start + batch_size]
                values = answer_logps(model, group, batch_size, logps)
                cached.update({p.fingerprint: (float(v[0]), float(v[1])) for p, v in zip(group, values)})
                progress.update(task, advance=len(group))
    if pairs and save:
        keys = sorted(cached)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        tmp.unlink(missing_ok=True)  # numpy opens the name as it finds it: a planted link is removed, not followed
        np.savez(tmp, keys=np.array(keys), values=np.array([cached[k] for k in keys], np.float64))
        tmp.replace(path)
    return cached


def check_memory(settings: PreferenceSettings, model_path: Path, sets: PreferenceSets, *, force: bool, console):
    """The planner's verdict on this run; a refusal (with settings that fit) unless `force` or resuming."""
    from mlxtune.memory.budget import memory_budget
    from mlxtune.memory.estimate import ModelFacts
    from mlxtune.memory.planner import over_budget
    from mlxtune.memory.preference import plan_preference

    budget, source = memory_budget(settings.memory)
    plan = plan_preference(ModelFacts.from_dir(model_path), settings, sets.train, sets.valid, budget, source)
    return verdict_or_refusal(plan, force=force, console=console, hint=(
        "use a smaller or 4-bit model (`mlxtune pull MODEL --quantize 4`), a shorter --max-seq-length, raise "
        "--memory, or --force"))


class PairsObjective(Objective):
    """DPO or ORPO for the engine: fixed batches of pairs, the loss's mean over pairs, accuracy and margins."""

    def __init__(self, model, optimizer, settings: PreferenceSettings, sets: PreferenceSets,
                 objective: PreferenceObjective, references: dict | None, parallel: DataParallel):
        self.model, self.settings, self.sets, self.objective = model, settings, sets, objective
        self.references, self.parallel = references, parallel
        self.command = settings.objective
        self.watch = settings.stop_on
        self.higher_is_better = settings.stop_on == "accuracy"
        self.plan = world_pair_plan(settings, parallel)
        self.trainer = PreferenceStep(model, optimizer, settings.grad_clip, objective)

    def batches(self, step: int) -> list:
        accumulation, parallel = self.settings.grad_accumulation, self.parallel
        return [_pair_batch_at(self.sets.train, self.plan, self.settings.seed, step * accumulation + k,
                               self.references, parallel.rank, parallel.size) for k in range(accumulation)]

    def gradients(self, micro: list):
        return self.trainer.accumulate(micro)

    def has_validation(self) -> bool:
        return bool(self.sets.valid)

    def validate(self) -> dict:
        return evaluate_pairs(self.model, self.objective, self.sets.valid, self.settings.batch_size,
                              self.settings.val_batches, self.references, self.parallel)

    def summarise(self, loss_sum: float, count: float, stats) -> dict:
        return summarise(loss_sum, count, stats)

    def rates(self, count: float, seconds: float) -> dict:
        return {"pairs": int(count)}

    def shrink(self, guard, peak: int | None, step: int) -> dict:
        # Pairs come in fixed batches: half the pairs per micro-batch, twice the micro-batches per step.
        event = guard.shrink(self.settings, None, 0, peak, step, fixed_batches=True)
        self.plan = world_pair_plan(self.settings, self.parallel)
        return event

    def save_settings(self, run_dir: Path) -> None:
        save_preference_settings(self.settings, run_dir)

    def nan_hint(self) -> str:
        return "lower --learning-rate or --beta"


def world_pair_plan(settings: PreferenceSettings, parallel: DataParallel) -> BatchPlan:
    """Fixed batches of pairs for the whole world (--batch-size per rank × ranks); each rank takes its share."""
    return BatchPlan(batch_size=parallel.world_batch(settings.batch_size, None)[0])


def train_preference(settings: PreferenceSettings, *, resume: bool = False, force: bool = False,
                     console=None, start_from=None, parallel: DataParallel | None = None) -> PreferenceResult:
    """Train adapters with DPO or ORPO as `settings` say; with `resume`, continue `settings.out`. Settings the
    memory planner says won't fit are refused before training unless `force`. With `parallel`, this process is
    one rank of a data-parallel run (train/distributed.py starts those); rank 0 alone writes the run directory.

    `start_from(run_dir) -> model path`: with `settings.from_run`, what makes the starting model inside the claimed
    run directory before anything loads (the CLI passes fuse.merge_sft_run: merging is fuse's job, not train/'s)."""
    reporter = TrainingReporter(console or make_console())
    console = reporter.console
    parallel = parallel or DataParallel()
    writes = parallel.is_main
    settings = copy.deepcopy(settings).validate()
    requested_path()  # a bad MLXTUNE_DEQUANTIZE fails before anything is written
    if not settings.data:
        raise UsageError("no data given", "pass --data with preference pairs (prompt, chosen, rejected)")
    check_from_run(settings.from_run, resume, distributed=parallel.distributed, merges=start_from is not None)
    data_path = resolve_data_path(settings.data)
    # bad data fails before any model is loaded
    records = read_preference_splits(data_path, settings.seed, skip_invalid=settings.skip_invalid)
    if writes:
        check_writable(Path(settings.out or "runs"))
    # the other ranks are given rank 0's run directory (train/distributed.py): they neither create nor claim it
    run_dir, model_path = open_run_dir(settings, resume=resume, reporter=reporter, start_from=start_from,
                                       kind=settings.objective, writes=writes)
    for warning in context_warnings(settings.max_seq_length, context_length(read_config(model_path)), []):
        reporter.warning(warning.message)
    settings.data = str(data_path.resolve())

    reporter.start(settings.objective, model_path, run_dir)
    model, tokenizer, model_config = load_model(model_path)
    prepare_backend(settings, model, reporter)
    sets = tokenize_preference_splits(records, tokenizer, max_seq_length=settings.max_seq_length,
                                      chat_template=settings.chat_template)
    for note in sets.notes:
        reporter.note(note)
    # Planned once the pairs are tokenized (with the model's own tokenizer, so after loading the weights): the
    # step's activations and head, not the weights, are what grows with the settings.
    memory_plan, adapter_cfg = plan_then_adapt(settings, model, run_dir, lambda: check_memory(
        settings, model_path, sets, force=force or resume, console=console), reporter, writes=writes)
    objective = PreferenceObjective(model, settings.objective, settings.beta, settings.label_smoothing,
                                    settings.selective_loss)
    if settings.iters is not None:
        total_steps = settings.iters
    else:
        micro = math.ceil(settings.epochs * batches_per_epoch(sets.train, world_pair_plan(settings, parallel),
                                                              settings.seed))
        total_steps = max(1, math.ceil(micro / settings.grad_accumulation))
    optimizer = build_optimizer(settings, total_steps)

    start_step, resumed = 0, None
    data_files = data_fingerprint(data_path)
    if resume:
        check_resume_ranks(run_dir, parallel.size)
        start_step, resumed = restore(run_dir, total_steps, model, optimizer, data_files, settings, reporter,
                                      settings.objective)
    parallel.broadcast_weights(model)  # every rank starts from rank 0's weights
    if writes:
        save_preference_settings(settings, run_dir)
        _write_run_info(run_dir, sets, model_path, model_config, adapter_cfg, settings, parallel.size)

    references = None
    reference_mode = "none"
    if objective.needs_reference:
        reference_mode = "adapters off"
        if settings.precompute_reference or settings.method == "full":
            if settings.method == "full" and not settings.precompute_reference:
                reporter.note("full finetuning has no adapter to switch off: reference log-probs precomputed "
                              "before training")
            if resume and not (run_dir / REFERENCE_FILE).is_file():
                raise UsageError(f"{run_dir / REFERENCE_FILE} is missing: the reference can't be recomputed "
                                 "from trained weights", "start a new run")
            references = precompute_references(model, objective, sets, run_dir, settings.batch_size * 2, console,
                                               save=writes)
            reference_mode = "precomputed"

    trainable, total = parameter_counts(model)
    if settings.grad_checkpoint:
        grad_checkpoint(model)
    _print_header(console, settings, sets, trainable, total, total_steps, reference_mode, objective,
                  model_config.get("quantization"), memory_plan, parallel)
    run = TrainingRun(run_dir, model, optimizer, adapter_cfg, settings, total_steps,
              f"{model_name(model_path)} · {run_dir.name}", start_step, resume, resumed, data_files, parallel,
              memory_budget=memory_plan.budget)
    progress = train(run, PairsObjective(model, optimizer, settings, sets, objective, references, parallel),
                     reporter)
    result = PreferenceResult.of(run_dir, progress, total_steps, memory_plan, trainable, total, sets.notes,
                                 objective=settings.objective, reference=reference_mode)
    finish(run, result)
    _print_summary(console, result)
    return result


def _write_run_info(run_dir: Path, sets: PreferenceSets, model_path: Path, model_config: dict, adapter_cfg: dict,
                    settings: PreferenceSettings, ranks: int) -> None:
    info = {
        "base_model": str(model_path),
        "model_type": model_config.get("model_type"),
        "data_kind": sets.kind,
        "objective": settings.objective,
        "preference_shape": sets.shape,
        "template_origin": sets.template.origin,
        "train_examples": len(sets.train),
        "valid_examples": len(sets.valid),
        "adapter": adapter_cfg,
        "from_run": settings.from_run,
        "ranks": ranks,  # data-parallel ranks: a resume needs as many (the batches depend on it)
    }
    if sets.template.template and sets.template.origin != "model":
        atomic_write_text(run_dir / TEMPLATE_FILE, sets.template.template)
    atomic_write_text(run_dir / RUN_FILE, json.dumps(info, indent=2))


def _print_header(console, settings: PreferenceSettings, sets: PreferenceSets, trainable, total, steps,
                  reference_mode, objective: PreferenceObjective, quantization, memory_plan,
                  parallel: DataParallel) -> None:
    method = settings.method if not quantization or settings.method == "full" else f"Q{settings.method.upper()}"
    if settings.objective == "dpo":
        loss = f"DPO sigmoid, beta {settings.beta:g}" + (
            f", label smoothing {settings.label_smoothing:g}" if settings.label_smoothing else "")
    else:
        loss = f"ORPO, beta (odds-ratio weight) {settings.beta:g}"
    rows = [
        ("objective", loss),
        ("reference", {"adapters off": "the same weights with the adapters switched off (no second model)",
                       "precomputed": f"precomputed once per pair ({REFERENCE_FILE})",
                       "none": "none (ORPO)"}[reference_mode]),
        ("method", f"{method} rank {settings.rank} alpha {settings.alpha:g}" if settings.method != "full" else "full"),
        ("trainable", f"{trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"),
        ("data", f"{sets.shape}: {len(sets.train)} train / {len(sets.valid)} valid pairs"),
        ("template", sets.template.name),
        ("steps", f"{steps} optimizer steps × {settings.grad_accumulation} micro-batch(es) of "
                  f"{settings.batch_size} pairs, lr {settings.learning_rate:g} {settings.schedule}"),
        ("log-probs", "selective (answer positions only)" if objective.logps.selective else "full logits"),
        ("memory", f"{memory_plan.verdict()} ({memory_plan.budget_source})"),
        ("device", str(mx.default_device())),
    ]
    if parallel.distributed:
        rows.append(("ranks", parallel.describe()))
    console.print(summary_table("preference run", rows))


def _print_summary(console, result: PreferenceResult) -> None:
    def val(d, key, fmt="{:.3f}"):
        return "—" if not d or d.get(key) is None else fmt.format(d[key])

    rows = [
        ("steps", f"{result.steps}/{result.total_steps} ({result.stopped})"),
        ("val accuracy", f"{val(result.initial_val, 'accuracy')} → {val(result.final_val, 'accuracy')} "
                         f"(best step {result.best_step})"),
        ("val loss", f"{val(result.initial_val, 'loss')} → {val(result.final_val, 'loss')}"),
        ("val margin", f"{val(result.initial_val, 'margin')} → {val(result.final_val, 'margin')}"),
        ("train", f"loss {val(result.final_train, 'loss')} · accuracy {val(result.final_train, 'accuracy')} · "
                  f"margin {val(result.final_train, 'margin')}"),
        ("speed", f"{result.tokens_per_second or 0:.0f} tokens/s"),
        ("peak memory", f"{result.peak_memory_gb or 0:.2f} GB"),
        ("adapter", f"{result.run_dir}/adapters.safetensors"),
    ]
    console.print(summary_table("result", rows))
