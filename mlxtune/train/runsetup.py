"""What the runs of the engine's non-SFT objectives (dpo/orpo, grpo) set up alike before `engine.train`: their
settings split between config.yaml (a plain LoRA config that fuse/export/chat read) and the objective's own file,
the run directory (with `--from` a supervised run merged into it first), the memory verdict, the checkpoint a
resume continues from, and the result they return. One place, so the objectives differ only in what they compute.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import yaml

from mlxtune.errors import UsageError
from mlxtune.library import hold_model
from mlxtune.model_config import DEFAULT_QUANTIZE, model_name
from mlxtune.models import DEFAULT_BASE_MODEL, resolve_model
from mlxtune.runs import CONFIG_FILE, LOCK_FILE, RUN_MARKER, default_run_dir, follow_up_run_dir
from mlxtune.settings import LoraSettings, load_run_settings, read_yaml_config, save_settings
from mlxtune.storage import atomic_write_text
from mlxtune.train.checkpoint import load_checkpoint
from mlxtune.train.engine import claim
from mlxtune.train.recovery import check_resume_state, find_resume_point, unlock_run_dir


def lora_part(settings) -> LoraSettings:
    """The LoRA settings of an objective's settings (a LoraSettings subclass): what config.yaml holds."""
    own = {f.name for f in fields(LoraSettings)}
    return LoraSettings(**{k: v for k, v in settings.to_dict().items() if k in own})


def objective_part(settings) -> dict:
    """The objective's own settings (the subclass's fields): what its own YAML file holds."""
    own = {f.name for f in fields(LoraSettings)}
    return {k: v for k, v in settings.to_dict().items() if k not in own}


def save_split_settings(settings, run_dir: Path, own_file: str) -> None:
    save_settings(lora_part(settings), run_dir / CONFIG_FILE)
    atomic_write_text(run_dir / own_file, yaml.safe_dump(objective_part(settings), sort_keys=False))


def load_split_settings(run_dir: Path, own_file: str, cls):
    """`cls` (an objective's settings) from config.yaml and the objective's own file."""
    lora = load_run_settings(Path(run_dir) / CONFIG_FILE)
    own = {f.name for f in fields(cls)}  # lora's data settings in config.yaml that `cls` lacks are not its
    return cls(**{**{k: v for k, v in lora.to_dict().items() if k in own},
                  **read_yaml_config(Path(run_dir) / own_file, cls)})


def check_from_run(from_run: str | None, resume: bool, *, distributed: bool, merges: bool = True) -> None:
    """A new run `--from` a supervised run needs that run merged into its base first (`merges`: a `start_from`
    given), which a data-parallel run can't do on every rank: refused there with the way round it."""
    if not from_run or resume:
        return
    if distributed:
        raise UsageError("--from is not available with --nproc/--hosts",
                         f"fuse the supervised run first (mlxtune fuse {from_run} --out MODEL_DIR) and "
                         "pass --model MODEL_DIR")
    if not merges:
        raise UsageError("--from needs its supervised run merged first",
                         "call mlxtune.fuse.merge_sft_run as start_from (the CLI does)")


def open_run_dir(settings, *, resume: bool, reporter, start_from, kind: str, writes: bool = True
                 ) -> tuple[Path, Path]:
    """The run directory claimed and the model resolved (its files checked, held against `models rm`). With
    `settings.from_run` (a new run), the directory is claimed first and `start_from(run_dir)` makes the model in it.
    Without `writes` (a data-parallel rank other than 0, given rank 0's directory) the directory is neither made
    nor claimed. Returns (run directory, model path); `settings.model` and `settings.out` are updated."""
    if settings.from_run and not resume:
        run_dir = Path(settings.out) if settings.out else follow_up_run_dir(settings.from_run, kind)
        run_dir.mkdir(parents=True, exist_ok=True)
        claim(run_dir, resume, reporter)
        settings.model = str(start_from(run_dir))
    if not settings.model:
        reporter.default_model(DEFAULT_BASE_MODEL, DEFAULT_QUANTIZE)
        settings.model = DEFAULT_BASE_MODEL
    model_path = resolve_model(settings.model, console=reporter.console)
    settings.fit_model(model_path)  # max_seq_length from the model's context; its files checked before loading
    hold_model(model_path)  # `models rm` refuses it while this run trains
    if resume or not settings.from_run:
        run_dir = Path(settings.out) if settings.out else default_run_dir(model_name(model_path), kind)
        if writes:
            run_dir.mkdir(parents=True, exist_ok=True)
            claim(run_dir, resume, reporter)
    settings.model, settings.out = str(model_path), str(run_dir)
    return run_dir, model_path


def release_unused(run_dir: Path) -> None:
    """A run refused before anything was written: unlocked, and no empty run directory left behind."""
    unlock_run_dir(run_dir)
    if run_dir.is_dir() and all(p.name in (LOCK_FILE, RUN_MARKER) for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def verdict_or_refusal(plan, *, force: bool, console, hint: str):
    """The planner's plan if it fits (or `force`: with a warning); otherwise the refusal, with the settings that fit
    when there are some, else `hint`."""
    from mlxtune.memory.planner import over_budget

    if plan.fits or force:
        if not plan.fits:
            console.print(f"[yellow]warning:[/] {plan.verdict()}; --force: trying anyway")
        return plan
    raise over_budget(plan, f"use {plan.flags()}, or --force to try anyway" if plan.suggested_fits else hint)


def restore(run_dir: Path, total_steps: int, model, optimizer, data_files, settings, reporter, command: str
            ) -> tuple[int, dict | None]:
    """Resume: the latest good checkpoint loaded into the model and optimizer and checked against this run (data,
    settings, steps). Returns (start step, the checkpoint's state), (0, None) when there is none."""
    point = find_resume_point(run_dir, total_steps)
    for warning in point.warnings:
        reporter.warning(warning)
    if point.checkpoint is None:
        return 0, None
    resumed = load_checkpoint(point.checkpoint, model, optimizer)
    start_step = resumed["step"]
    if start_step >= total_steps:
        raise UsageError(f"{run_dir} already trained {start_step} of {total_steps} steps",
                         f"extend it: mlxtune {command} --resume {run_dir} --iters N (N > {start_step})")
    check_resume_state(run_dir, resumed, total_steps, data_files, settings)
    reporter.resumed(point.checkpoint.name, start_step, total_steps)
    return start_step, resumed


def plan_then_adapt(settings, model, run_dir: Path, plan, reporter, *, writes: bool = True):
    """`plan()`'s memory verdict (a refusal releases the still-empty run directory, where this process `writes` it),
    then the adapters attached (seeded) and, on the CPU backend, a quantized base made fast. Returns (the plan, the
    adapter config)."""
    from mlxtune.cpu_quantized import accelerate_quantized
    from mlxtune.train.adapters import attach_adapters

    try:
        memory_plan = plan()
    except UsageError:
        if writes:
            release_unused(run_dir)  # refused before anything was written: no empty run directory left behind
        raise
    mx.random.seed(settings.seed)
    adapter_cfg = attach_adapters(model, settings)
    quantized = accelerate_quantized(model, memory_plan.budget)  # CPU backend only
    if quantized:
        reporter.info(quantized)
    return memory_plan, adapter_cfg


@dataclass
class ObjectiveResult:
    """What a dpo/orpo or grpo run returns (and writes to result.json): the engine's progress and the planner's
    memory figures; each objective adds its own fields."""

    run_dir: str
    steps: int
    total_steps: int
    initial_val: dict | None = None  # the objective's validation metrics before training
    final_val: dict | None = None
    best_step: int | None = None
    best_val: dict | None = None
    final_train: dict | None = None  # the last report window's metrics
    tokens_per_second: float | None = None
    peak_memory_gb: float | None = None
    memory_estimate_gb: float | None = None  # the planner's estimate of the peak, made before training
    memory_budget_gb: float | None = None
    trainable_parameters: int = 0
    total_parameters: int = 0
    stopped: str = "completed"
    notes: list | None = None
    memory_changes: list | None = None  # what the memory guard changed, and why

    @classmethod
    def of(cls, run_dir: Path, progress, total_steps: int, memory_plan, trainable: int, total: int, notes: list,
           **own):
        """The result of a finished `engine.train` (`progress`); `notes`: the set-up's, before the engine's."""
        plan = memory_plan.to_dict()
        return cls(str(run_dir), progress.steps, total_steps, progress.initial_val, progress.final_val,
                   progress.best_step, progress.best_val, progress.final_train, progress.tokens_per_second,
                   progress.peak_memory_gb, plan["estimate_gb"], plan["budget_gb"], trainable, total,
                   progress.stopped, list(notes) + progress.notes, progress.memory_changes, **own)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
