"""`mlxtune plan`: the memory plan of a run as a report, and (with --time) a few timed warm-up steps."""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from pathlib import Path

from mlxtune.data.batching import batch_plan, batches_per_epoch
from mlxtune.data.dataset import load_datasets, resolve_data_path
from mlxtune.errors import UsageError
from mlxtune.models import DEFAULT_BASE_MODEL, resolve_model
from mlxtune.settings import LoraSettings
from mlxtune.train.loop import finetune
from mlxtune.memory.planner import SIZING_KEYS, MemoryPlan, apply_suggestions, on_cpu, plan_for_data
from mlxtune.ui import make_console


def plan_report(settings: LoraSettings, *, timed: bool = False, console=None) -> dict:
    """What `mlxtune plan` shows: the verdict, the estimate's parts, the suggestion; with `timed` the duration."""
    if not settings.data:
        raise UsageError("no data given", "pass --data: the plan depends on how long the examples are")
    settings = replace(settings, model=settings.model or DEFAULT_BASE_MODEL)  # the model `lora` would use
    model_path = resolve_model(settings.model, console=console)
    settings.fit_model(model_path)  # max_seq_length from the model's context, as the run will have it
    data_path = resolve_data_path(settings.data)
    plan = plan_for_data(settings, model_path, data_path)
    report = {"model": str(model_path), "data": str(data_path), **plan.to_dict(),
              "settings": {key: getattr(settings, key) for key in SIZING_KEYS},
              "worst_batch": plan.estimate.to_dict()["worst_batch"], "device": "cpu" if on_cpu() else "gpu"}
    if timed:
        report["timing"] = time_warmup(settings, model_path, data_path, plan)
    return report


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
