"""`mlxtune dpo` / `mlxtune orpo`: a preference run, top to bottom.

The same flow as `mlxtune lora` — model library, adapters, optimizer, checkpoints, exact resume, metrics.jsonl,
loss.png — with pairs instead of examples and a preference objective (train/preference.py) instead of
cross-entropy. The run directory is an ordinary run: fuse, export, chat and generate take it as they take a LoRA
run. `--from RUN_DIR` starts from a supervised run: its adapter is merged into the base (written once into the new
run as `sft-merged/`), which is then both the model the new adapter trains on and DPO's reference.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from datetime import datetime
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_map
from rich.markup import escape

from mlxtune.cpu_quantized import accelerate_quantized, requested_path
from mlxtune.data.batching import BatchPlan, batches_per_epoch, plan_epoch
from mlxtune.data.dataset import resolve_data_path
from mlxtune.data.preference import PreferenceSets, read_preference_splits, tokenize_preference_splits
from mlxtune.data.quality import context_warnings
from mlxtune.errors import UsageError
from mlxtune.model_config import context_length, model_name, read_config
from mlxtune.models import DEFAULT_BASE_MODEL, load_model, resolve_model
from mlxtune.library import hold_model
from mlxtune.runs import (BEST_DIR, CONFIG_FILE, METRICS_FILE, PLOT_FILE, PREFERENCE_FILE, RESULT_FILE, RUN_FILE,
                          RUN_MARKER, TEMPLATE_FILE)
from mlxtune.settings import LoraSettings, load_run_settings, read_yaml_config, save_settings
from mlxtune.storage import atomic_write_text, check_writable
from mlxtune.train.adapters import attach_adapters, parameter_counts, trainable_weights
from mlxtune.train.checkpoint import load_checkpoint, save_adapter, save_checkpoint
from mlxtune.train.metrics import MetricsLog
from mlxtune.train.plot import plot_losses
from mlxtune.train.recovery import LOCK_FILE, claim_run_dir, find_resume_point, unlock_run_dir
from mlxtune.train.preference.objective import (
    OBJECTIVES,
    PreferenceObjective,
    SequenceLogProbs,
    adapters_off,
    answer_logps,
    evaluate_pairs,
    make_pair_batch,
    summarise,
)
from mlxtune.train.step import build_optimizer
from mlxtune.ui import fmt_loss, make_console, sparkline, step_progress, summary_table, training_progress

REFERENCE_FILE = "reference_logps.npz"
MERGED_BASE = "sft-merged"
STOP_ON = ("loss", "accuracy")


@dataclass
class PreferenceSettings(LoraSettings):
    """`mlxtune lora`'s settings plus the preference objective's own (saved apart, in preference.yaml)."""

    objective: str = "dpo"  # dpo | orpo
    beta: float = 0.1  # DPO: strength of the pull towards the reference; ORPO: weight of the odds-ratio term
    label_smoothing: float = 0.0  # DPO: assumed share of flipped labels (conservative DPO)
    precompute_reference: bool = False  # DPO: reference log-probs computed once before training, cached per pair
    from_run: str | None = None  # start from this supervised run (its adapter merged into the base)
    from_checkpoint: str = "last"  # which adapter of --from: last, best or a step number
    stop_on: str = "loss"  # early stopping watches the validation loss or the validation preference accuracy
    skip_invalid: bool = False  # train without the bad records (each named in a note) instead of refusing the data

    def validate(self) -> "PreferenceSettings":
        super().validate()
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown objective {self.objective!r}", f"use one of {', '.join(OBJECTIVES)}")
        if not self.beta > 0:
            raise UsageError(f"beta must be positive, got {self.beta}", "set --beta (0.1 is usual)")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UsageError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}",
                             "set --label-smoothing (0 = plain DPO)")
        if self.stop_on not in STOP_ON:
            raise UsageError(f"unknown stop_on {self.stop_on!r}", f"use one of {', '.join(STOP_ON)}")
        if self.objective == "orpo" and (self.precompute_reference or self.label_smoothing):
            raise UsageError("ORPO uses no reference model and no label smoothing",
                             "drop --precompute-reference/--label-smoothing, or use mlxtune dpo")
        return self

    def lora_part(self) -> LoraSettings:
        own = {f.name for f in fields(LoraSettings)}
        return LoraSettings(**{k: v for k, v in self.to_dict().items() if k in own})

    def preference_part(self) -> dict:
        own = {f.name for f in fields(LoraSettings)}
        return {k: v for k, v in self.to_dict().items() if k not in own}


def save_preference_settings(settings: PreferenceSettings, run_dir: Path) -> None:
    """config.yaml stays a plain LoRA config (fuse/export/chat read it); the objective goes to preference.yaml."""
    save_settings(settings.lora_part(), run_dir / CONFIG_FILE)
    atomic_write_text(run_dir / PREFERENCE_FILE, yaml.safe_dump(settings.preference_part(), sort_keys=False))


def load_preference_settings(run_dir: Path) -> PreferenceSettings:
    lora = load_run_settings(run_dir / CONFIG_FILE)
    extra = read_yaml_config(run_dir / PREFERENCE_FILE, PreferenceSettings)
    return PreferenceSettings(**{**lora.to_dict(), **extra})


def is_preference_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / PREFERENCE_FILE).is_file()


def resume_preference_settings(run_dir: str | Path, overrides: dict) -> PreferenceSettings:
    run_dir = Path(run_dir)
    if not is_preference_run(run_dir):
        raise UsageError(f"{run_dir} is not a preference run (no {PREFERENCE_FILE})",
                         "resume a LoRA run with mlxtune lora --resume")
    settings = load_preference_settings(run_dir)
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    settings.out = str(run_dir)
    return settings.validate()


@dataclass
class PreferenceResult:
    run_dir: str
    objective: str
    steps: int
    total_steps: int
    initial_val: dict | None = None  # loss, accuracy, margin, rewards before training
    final_val: dict | None = None
    best_step: int | None = None
    best_val: dict | None = None
    final_train: dict | None = None
    tokens_per_second: float | None = None
    peak_memory_gb: float | None = None
    memory_estimate_gb: float | None = None  # the planner's estimate of the peak, made before training
    memory_budget_gb: float | None = None
    trainable_parameters: int = 0
    total_parameters: int = 0
    reference: str = "adapters off"  # adapters off | precomputed | none
    stopped: str = "completed"
    notes: list | None = None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
        total = None
        for batch in batches:
            # The reference pass runs outside the compiled gradient: it swaps the adapter layers out and back.
            # It is evaluated on its own, first: in one graph with the policy pass, its vocabulary-sized
            # temporaries would be alive at the same time as the policy's (a third more peak memory).
            arrays = self.objective.loss_arrays(self.model, batch)
            mx.eval(arrays[-2:])
            out = self.gradients(*arrays)
            total = out if total is None else tuple(
                tree_map(mx.add, a, b) if isinstance(a, dict) else a + b for a, b in zip(total, out))
            # One micro-batch at a time (as train/step.py): together they would hold all their activations at
            # once, and gradient accumulation would save no memory.
            mx.eval(*total)
        return total


def _pair_batch_at(pairs, plan: BatchPlan, seed: int, index: int, references):
    """The `index`-th training batch of pairs, counting across epochs (a pure function of seed and index)."""
    epoch = 0
    while True:
        batches = plan_epoch(pairs, plan, seed, epoch)
        if index < len(batches):
            return make_pair_batch([pairs[i] for row in batches[index] for i in row], references)
        index -= len(batches)
        epoch += 1


def merge_sft_run(from_run: str | Path, run_dir: Path, checkpoint: str, console) -> Path:
    """The supervised run's adapter merged into its base (re-quantized like the base), written into the run once."""
    from mlxtune.fuse import fuse_run
    from mlxtune.runs import open_run

    source = open_run(from_run)
    if is_preference_run(source.path):
        pass  # a preference run is a run like any other: its adapter merges the same way
    target = run_dir / MERGED_BASE
    if (target / "config.json").is_file():
        return target
    quantization = read_config(source.base_model).get("quantization") or {}
    bits = str(quantization.get("bits")) if quantization.get("bits") in (4, 8) else "none"
    with console.status(f"merging {source.path.name}'s adapter ({checkpoint}) into its base"):
        result = fuse_run(source.path, target, checkpoint=checkpoint, quantize=bits)
    console.print(f"started from {source.path} ({checkpoint} adapter merged"
                  + (f", re-quantized to {bits} bits" if bits != "none" else "") + f"): {target}")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    return target


def precompute_references(model, objective: PreferenceObjective, sets: PreferenceSets, run_dir: Path,
                          batch_size: int, console) -> dict[str, tuple[float, float]]:
    """Reference log-probs of every pair, from the weights before training; cached in the run by pair fingerprint."""
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
        keys = sorted(cached)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        tmp.unlink(missing_ok=True)  # numpy opens the name as it finds it: a planted link is removed, not followed
        np.savez(tmp, keys=np.array(keys), values=np.array([cached[k] for k in keys], np.float64))
        tmp.replace(path)
    return cached


def _better(settings: PreferenceSettings, metrics: dict, best: dict | None) -> bool:
    if best is None:
        return True
    if settings.stop_on == "accuracy":
        return metrics["accuracy"] > best["accuracy"] + settings.min_delta
    return metrics["loss"] < best["loss"] - settings.min_delta


def check_memory(settings: PreferenceSettings, model_path: Path, sets: PreferenceSets, *, force: bool, console):
    """The planner's verdict on this run; a refusal (with settings that fit) unless `force` or resuming."""
    from mlxtune.memory import ModelFacts
    from mlxtune.train.planner import memory_budget, over_budget
    from mlxtune.train.preference.memory import plan_preference

    budget, source = memory_budget(settings.memory)
    plan = plan_preference(ModelFacts.from_dir(model_path), settings, sets.train, sets.valid, budget, source)
    if plan.fits or force:
        if not plan.fits:
            console.print(f"[yellow]warning:[/] {plan.verdict()}; --force: trying anyway")
        return plan
    hint = (f"use {plan.flags()}, or --force to try anyway" if plan.suggested_fits else
            "use a smaller or 4-bit model (`mlxtune pull MODEL --quantize 4`), a shorter --max-seq-length, raise "
            "--memory, or --force")
    raise over_budget(plan, hint)


def train_preference(settings: PreferenceSettings, *, resume: bool = False, force: bool = False,
                     console=None) -> PreferenceResult:
    """Train adapters with DPO or ORPO as `settings` say; with `resume`, continue `settings.out`. Settings the
    memory planner says won't fit are refused before training unless `force`."""
    console = console or make_console()
    settings.validate()
    requested_path()  # a bad MLXTUNE_DEQUANTIZE fails before anything is written
    if not settings.data:
        raise UsageError("no data given", "pass --data with preference pairs (prompt, chosen, rejected)")
    data_path = resolve_data_path(settings.data)
    # bad data fails before any model is loaded
    records = read_preference_splits(data_path, settings.seed, skip_invalid=settings.skip_invalid)
    check_writable(Path(settings.out or "runs"))
    if settings.from_run and not resume:
        run_dir = Path(settings.out or Path("runs") / f"{Path(settings.from_run).name}-{settings.objective}")
        _claim(run_dir, resume, console)
        settings.model = str(merge_sft_run(settings.from_run, run_dir, settings.from_checkpoint, console))
    if not settings.model:
        console.print(f"no --model given: using the default base model [cyan]{DEFAULT_BASE_MODEL}[/]")
        settings.model = DEFAULT_BASE_MODEL
    model_path = resolve_model(settings.model, console=console)
    settings.fit_model(model_path)  # max_seq_length from the model's context; its files checked before loading
    for warning in context_warnings(settings.max_seq_length, context_length(read_config(model_path)), []):
        console.print(f"[yellow]warning:[/] {escape(warning.message)}", highlight=False)
    hold_model(model_path)  # `models rm` refuses it while this run trains
    if resume or not settings.from_run:
        run_dir = Path(settings.out) if settings.out else default_run_dir(model_path, settings.objective)
        _claim(run_dir, resume, console)
    settings.model, settings.data, settings.out = str(model_path), str(data_path.resolve()), str(run_dir)

    console.print(f"[bold]mlxtune[/] {settings.objective} · model [cyan]{escape(str(model_path))}[/] · "
                  f"run [cyan]{escape(str(run_dir))}[/]")
    model, tokenizer, model_config = load_model(model_path)
    if mx.default_device() == mx.cpu and any(
            v.dtype in (mx.float16, mx.bfloat16) for v in _floating(model)):
        model.set_dtype(mx.float32)  # MLX's CPU backend has no fast half-precision matmul
        console.print("CPU backend: training in float32 (half-precision weights upcast)")
    sets = tokenize_preference_splits(records, tokenizer, max_seq_length=settings.max_seq_length,
                                      chat_template=settings.chat_template)
    for note in sets.notes:  # file:line lists and paths: text, never markup
        console.print(f"[yellow]note:[/] {escape(note)}")
    # Planned once the pairs are tokenized (with the model's own tokenizer, so after loading the weights): the
    # step's activations and head, not the weights, are what grows with the settings.
    try:
        memory_plan = check_memory(settings, model_path, sets, force=force or resume, console=console)
    except UsageError:
        _release_unused(run_dir)  # refused before anything was written: no empty run directory left behind
        raise

    mx.random.seed(settings.seed)
    adapter_cfg = attach_adapters(model, settings)
    quantized = accelerate_quantized(model, memory_plan.budget)  # CPU backend only
    if quantized:
        console.print(quantized)
    objective = PreferenceObjective(model, settings.objective, settings.beta, settings.label_smoothing,
                                    settings.selective_loss)
    plan = BatchPlan(batch_size=settings.batch_size)
    if settings.iters is not None:
        total_steps = settings.iters
    else:
        micro = math.ceil(settings.epochs * batches_per_epoch(sets.train, plan, settings.seed))
        total_steps = max(1, math.ceil(micro / settings.grad_accumulation))
    optimizer = build_optimizer(settings, total_steps)

    metrics_path = run_dir / METRICS_FILE
    metrics = MetricsLog(metrics_path, settings.report_to, run_dir.name, settings.to_dict())
    start_step, saved = 0, {}
    if resume:
        point = find_resume_point(run_dir, total_steps)
        for warning in point.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        if point.checkpoint is not None:
            saved = load_checkpoint(point.checkpoint, model, optimizer)
            start_step = saved["step"]
            if start_step >= total_steps:
                raise UsageError(f"{run_dir} already trained {start_step} of {total_steps} steps",
                                 f"extend it: mlxtune {settings.objective} --resume {run_dir} --iters N (N > {start_step})")
            console.print(f"resuming from {point.checkpoint.name} (step {start_step} of {total_steps})")
        metrics.trim(start_step if saved else -1)
    save_preference_settings(settings, run_dir)
    _write_run_info(run_dir, sets, model_path, model_config, adapter_cfg, settings)

    references = None
    reference_mode = "none"
    if objective.needs_reference:
        reference_mode = "adapters off"
        if settings.precompute_reference or settings.method == "full":
            if settings.method == "full" and not settings.precompute_reference:
                console.print("[yellow]note:[/] full finetuning has no adapter to switch off: "
                              "reference log-probs precomputed before training")
            if resume and not (run_dir / REFERENCE_FILE).is_file():
                raise UsageError(f"{run_dir / REFERENCE_FILE} is missing: the reference can't be recomputed "
                                 "from trained weights", "start a new run")
            references = precompute_references(model, objective, sets, run_dir, settings.batch_size * 2, console)
            reference_mode = "precomputed"

    trainable, total = parameter_counts(model)
    if settings.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    result = PreferenceResult(str(run_dir), settings.objective, start_step, total_steps,
                              trainable_parameters=trainable, total_parameters=total, reference=reference_mode,
                              notes=list(sets.notes))
    result.initial_val = saved.get("initial_val")
    result.best_val, result.best_step = saved.get("best_val"), saved.get("best_step")
    result.memory_estimate_gb = memory_plan.to_dict()["estimate_gb"]
    result.memory_budget_gb = memory_plan.to_dict()["budget_gb"]
    _print_header(console, settings, sets, trainable, total, total_steps, reference_mode, objective,
                  model_config.get("quantization"), memory_plan)
    trainer = PreferenceStep(model, optimizer, settings.grad_clip, objective)
    model.train()

    def validate() -> dict:
        return evaluate_pairs(model, objective, sets.valid, settings.batch_size, settings.val_batches, references)

    val = {}
    if start_step == 0 and sets.valid:
        val = validate()
        result.initial_val = result.best_val = val
        result.best_step = 0
        _save_best(run_dir, model, adapter_cfg)
        metrics.write({"step": 0, **{f"val_{k}": v for k, v in val.items()}})
        console.print(f"before training: validation loss {fmt_loss(val['loss'])}, "
                      f"preference accuracy {val['accuracy']:.3f}")

    evals_without_gain = saved.get("evals_without_gain", 0)
    window = {"loss": 0.0, "pairs": 0.0, "stats": np.zeros(4), "tokens": 0, "seconds": 0.0}
    history: list[float] = []
    step = start_step
    from mlxtune.train.loop import _StopRequest  # the loop's SIGINT/SIGTERM handling, shared

    with _StopRequest() as stop, training_progress(console) as progress:
        task = progress.add_task("train", total=total_steps, completed=step, loss="—",
                                 val=_fmt_val(val), speed="—", memory="—", spark="")
        while step < total_steps:
            tic = time.perf_counter()
            mx.random.seed(settings.seed * 1_000_003 + step)
            micro = [_pair_batch_at(sets.train, plan, settings.seed, step * settings.grad_accumulation + k,
                                    references) for k in range(settings.grad_accumulation)]
            loss_sum, pairs, stats, grads = trainer.accumulate(micro)
            step_loss = (loss_sum / pairs).item()
            if not math.isfinite(step_loss):
                _save(run_dir, model, optimizer, adapter_cfg, step, total_steps, result, evals_without_gain)
                from mlxtune.errors import RunFailed

                raise RunFailed(f"the loss became {step_loss} at step {step + 1}; the last good weights "
                                f"(step {step}) are saved", "lower --learning-rate or --beta")
            trainer.update(grads, pairs)
            mx.eval(trainer.state)
            step += 1
            window["loss"] += loss_sum.item()
            window["pairs"] += pairs.item()
            window["stats"] += np.array(stats)
            window["tokens"] += sum(b.tokens for b in micro)
            window["seconds"] += time.perf_counter() - tic

            if step % settings.report_every == 0 or step == total_steps:
                train = summarise(window["loss"], window["pairs"], window["stats"])
                history.append(train["loss"])
                record = {"step": step, **{f"train_{k}": v for k, v in train.items()},
                          "learning_rate": optimizer.learning_rate.item(),
                          "tokens_per_second": window["tokens"] / window["seconds"],
                          "peak_memory_gb": mx.get_peak_memory() / 1e9}
                metrics.write(record)
                result.final_train = train
                result.tokens_per_second = record["tokens_per_second"]
                result.peak_memory_gb = record["peak_memory_gb"]
                progress.update(task, loss=f"{fmt_loss(train['loss'])} acc {train['accuracy']:.2f}",
                                speed=f"{record['tokens_per_second']:.0f}",
                                memory=f"{record['peak_memory_gb']:.2f}GB", spark=sparkline(history))
                window = {"loss": 0.0, "pairs": 0.0, "stats": np.zeros(4), "tokens": 0, "seconds": 0.0}

            if sets.valid and (step % settings.eval_every == 0 or step == total_steps):
                val = validate()
                metrics.write({"step": step, **{f"val_{k}": v for k, v in val.items()}})
                result.final_val = val
                if _better(settings, val, result.best_val):
                    result.best_val, result.best_step, evals_without_gain = val, step, 0
                    _save_best(run_dir, model, adapter_cfg)
                else:
                    evals_without_gain += 1
                progress.update(task, val=_fmt_val(val))
                plot_losses(metrics_path, run_dir / PLOT_FILE, f"{model_name(model_path)} · {run_dir.name}")
                if settings.patience and evals_without_gain >= settings.patience:
                    result.stopped = "early-stopped"

            if (step % settings.save_every == 0 or step == total_steps or stop.signal_name
                    or result.stopped == "early-stopped"):
                _save(run_dir, model, optimizer, adapter_cfg, step, total_steps, result, evals_without_gain)
            progress.update(task, completed=step)
            result.steps = step
            if result.stopped == "early-stopped":
                console.print(f"early stop: no validation {settings.stop_on} gain in {settings.patience} "
                              f"evaluations; best step {result.best_step} is in {run_dir / 'best'}")
                break
            if stop.signal_name:
                result.stopped = "interrupted"
                console.print(f"[yellow]{stop.signal_name}:[/] checkpoint saved at step {step}; "
                              f"continue with: mlxtune {settings.objective} --resume {run_dir}")
                break

    metrics.close()
    plot_losses(metrics_path, run_dir / PLOT_FILE, f"{model_name(model_path)} · {run_dir.name}")
    atomic_write_text(run_dir / RESULT_FILE, json.dumps(result.to_dict(), indent=2))
    _print_summary(console, result)
    unlock_run_dir(run_dir)
    return result


def default_run_dir(model_path: Path, objective: str) -> Path:
    return Path("runs") / f"{model_name(model_path)}-{objective}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _claim(run_dir: Path, resume: bool, console) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for note in claim_run_dir(run_dir, resume):  # locked for this process, as a LoRA run
        console.print(f"[yellow]note:[/] {note}")


def _release_unused(run_dir: Path) -> None:
    unlock_run_dir(run_dir)
    if run_dir.is_dir() and all(p.name in (LOCK_FILE, RUN_MARKER) for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def _floating(model):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]


def _fmt_val(val: dict) -> str:
    return f"{fmt_loss(val['loss'])} acc {val['accuracy']:.2f}" if val else "—"


def _save(run_dir, model, optimizer, adapter_cfg, step, total_steps, result: PreferenceResult, evals_without_gain):
    weights = trainable_weights(model)
    optimizer.init(model.trainable_parameters())  # a no-op after the first update; gives step 0 its state
    save_adapter(run_dir, weights, adapter_cfg)
    save_checkpoint(run_dir, step, weights, adapter_cfg, optimizer, {
        "total_steps": total_steps, "initial_val": result.initial_val, "best_val": result.best_val,
        "best_step": result.best_step, "evals_without_gain": evals_without_gain})


def _save_best(run_dir: Path, model, adapter_cfg: dict) -> None:
    best = run_dir / BEST_DIR
    best.mkdir(exist_ok=True)
    save_adapter(best, trainable_weights(model), adapter_cfg)


def _write_run_info(run_dir: Path, sets: PreferenceSets, model_path: Path, model_config: dict, adapter_cfg: dict,
                    settings: PreferenceSettings) -> None:
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
    }
    if sets.template.template and sets.template.origin != "model":
        atomic_write_text(run_dir / TEMPLATE_FILE, sets.template.template)
    atomic_write_text(run_dir / RUN_FILE, json.dumps(info, indent=2))


def _print_header(console, settings: PreferenceSettings, sets: PreferenceSets, trainable, total, steps,
                  reference_mode, objective: PreferenceObjective, quantization, memory_plan) -> None:
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
        ("template", sets.template.origin),
        ("steps", f"{steps} optimizer steps × {settings.grad_accumulation} micro-batch(es) of "
                  f"{settings.batch_size} pairs, lr {settings.learning_rate:g} {settings.schedule}"),
        ("log-probs", "selective (answer positions only)" if objective.logps.selective else "full logits"),
        ("memory", f"{memory_plan.verdict()} ({memory_plan.budget_source})"),
        ("device", str(mx.default_device())),
    ]
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
