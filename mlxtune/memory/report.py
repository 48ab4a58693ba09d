"""`mlxtune plan`: the memory plan of a run as a report, and (with --time) a few timed warm-up steps."""

from __future__ import annotations

import math
import tempfile
from dataclasses import fields, replace
from pathlib import Path

from mlxtune.data.batching import batch_plan, batches_per_epoch
from mlxtune.data.dataset import load_datasets, resolve_data_path
from mlxtune.errors import UsageError
from mlxtune.models import DEFAULT_BASE_MODEL, resolve_model
from mlxtune.settings import GRPO_PLAN_KEYS, LoraSettings
from mlxtune.train.loop import finetune
from mlxtune.memory.planner import SIZING_KEYS, MemoryPlan, apply_suggestions, on_cpu, plan_for_data
from mlxtune.ui import make_console


GRPO_SIZING_KEYS = ("batch_size", "group_size", "max_completion_tokens", "grad_accumulation", "grad_checkpoint",
                    "max_seq_length")


def plan_settings(objective: str | None, config_path, flags: dict):
    """The settings `mlxtune plan` plans: a `lora` run's, or (`objective` "grpo") a `grpo` run's from its config
    file and flags, where lora's batching flags are refused (a GRPO batch is prompts × samples)."""
    from mlxtune.settings import GrpoSettings, resolve_settings

    grpo_flags = [k for k in GRPO_PLAN_KEYS if flags.get(k) is not None]
    if objective != "grpo":
        if grpo_flags:
            raise UsageError(f"--{grpo_flags[0].replace('_', '-')} sizes a GRPO run, not a lora one",
                             "add --objective grpo to plan a `mlxtune grpo` run")
        return resolve_settings(config_path, {k: v for k, v in flags.items() if k not in GRPO_PLAN_KEYS})
    known = {f.name for f in fields(GrpoSettings)}
    foreign = [k for k, v in flags.items() if v is not None and k not in known]
    if foreign:
        raise UsageError(f"--{foreign[0].replace('_', '-')} is a lora batching setting; a GRPO run has none",
                         "drop it: a GRPO micro-batch is --batch-size prompts × --group-size samples")
    return resolve_settings(config_path, flags, cls=GrpoSettings)


def plan_report(settings, *, timed: bool = False, console=None) -> dict:
    """What `mlxtune plan` shows: the verdict, the estimate's parts, the suggestion; with `timed` the duration.
    `settings`: a lora run's, or a grpo run's (`grpo_plan_report`)."""
    if not settings.data:
        raise UsageError("no data given", "pass --data: the plan depends on how long the examples are")
    settings = replace(settings, model=settings.model or DEFAULT_BASE_MODEL)  # the model the run would use
    model_path = resolve_model(settings.model, console=console)
    settings.fit_model(model_path)  # max_seq_length from the model's context, as the run will have it
    data_path = resolve_data_path(settings.data)
    if not isinstance(settings, LoraSettings):
        if timed:
            raise UsageError("--time times lora runs only", "time a GRPO step with a short run: mlxtune grpo ... "
                                                            "--iters 3 (its progress line shows s/step)")
        return grpo_plan_report(settings, model_path, data_path)
    plan = plan_for_data(settings, model_path, data_path)
    report = {"model": str(model_path), "data": str(data_path), **plan.to_dict(),
              "settings": {key: getattr(settings, key) for key in SIZING_KEYS},
              "worst_batch": plan.estimate.to_dict()["worst_batch"], "device": "cpu" if on_cpu() else "gpu"}
    if timed:
        report["timing"] = time_warmup(settings, model_path, data_path, plan)
    return report


def grpo_plan_report(settings, model_path: Path, data_path: Path) -> dict:
    """A GRPO run's plan: the larger of its rollout and its update (each shown), against the budget, with settings
    that fit when they don't (memory/grpo.py: the run's own planner)."""
    from mlx_lm.utils import load_tokenizer

    from mlxtune.data.prompts import PROMPT_KEY, read_prompt_splits
    from mlxtune.memory.estimate import ModelFacts
    from mlxtune.memory.grpo import FROZEN_ROWS, UPDATE_ROWS, grpo_phases, plan_for_prompts, shares_prompt
    from mlxtune.train.grpo.run import longest_prompt, tokenize_prompts

    records, notes = read_prompt_splits(data_path, settings.seed, prompt_key=settings.prompt_key or PROMPT_KEY)
    longest = longest_prompt(tokenize_prompts(records, load_tokenizer(model_path), settings, notes))
    plan = plan_for_prompts(settings, model_path, longest)
    phases = grpo_phases(ModelFacts.from_dir(model_path), settings, longest, budget=plan.budget,
                         shared=shares_prompt(model_path))
    return {"model": str(model_path), "data": str(data_path), "objective": "grpo", **plan.to_dict(),
            "settings": {key: getattr(settings, key) for key in GRPO_SIZING_KEYS},
            "worst_batch": plan.estimate.to_dict()["worst_batch"], "device": "cpu" if on_cpu() else "gpu",
            "longest_prompt": longest, "update_rows": UPDATE_ROWS, "frozen_rows": FROZEN_ROWS,
            "phases": {name: {"estimate_gb": value.to_dict()["estimate_gb"],
                              "worst_batch": value.to_dict()["worst_batch"]} for name, value in phases.items()}}


def time_warmup(settings: LoraSettings, model_path, data_path, plan: MemoryPlan, steps: int = 4) -> dict:
    """A few real steps (the first compiles and is not counted) and the expected duration of the whole run."""
    from mlx_lm.utils import load_tokenizer

    trial = replace(settings, iters=steps, eval_every=10**6, save_every=10**6, report_every=steps - 1,
                    val_batches=1, report_to=None)
    if not plan.fits and plan.suggested_fits:
        apply_suggestions(trial, plan.suggested)
    with tempfile.TemporaryDirectory(prefix="mlxtune-plan-") as tmp:
        trial.out = str(Path(tmp) / "run")
        result = finetune(trial, console=make_console(quiet=True), force=True)
    datasets = load_datasets(data_path, load_tokenizer(model_path), **trial.dataset_options())
    lengths = [len(e) for e in datasets.train]
    batch, _ = batch_plan(lengths, batch_size=trial.batch_size, batch_tokens=trial.batch_tokens, pack=trial.pack,
                          max_seq_length=trial.max_seq_length, packing_supported=True)
    per_epoch = batches_per_epoch(datasets.train, batch, trial.seed)
    total_steps = settings.iters or max(1, math.ceil(settings.epochs * per_epoch / trial.grad_accumulation))
    tokens_per_step = sum(lengths) / per_epoch * trial.grad_accumulation
    speed = result.tokens_per_second or 0.0
    return {"tokens_per_second": speed, "steps": total_steps,
            "expected_seconds": total_steps * tokens_per_step / speed if speed else None,
            "measured_peak_gb": result.peak_memory_gb}
