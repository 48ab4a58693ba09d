"""The training engine: one loop for every objective (SFT, DPO, ORPO, GRPO).

The engine owns what every run needs and no objective should write twice: the step's straight line (batches →
gradients → data-parallel sums → NaN/inf guard → update), the evaluation cadence, best/ and patience through the
objective's notion of better, checkpoints with the progress a resume needs (data fingerprint, settings), Ctrl-C
and SIGTERM, the memory guard, metrics.jsonl, the chart, the progress reporter and result.json.

An objective (`Objective`) supplies the rest: the micro-batches of a step, their gradients and loss, the
validation metrics, what "better" means, how to shrink its batches, and its summary lines. It knows nothing of
files; the engine knows nothing of DPO. (The shape is mlx-lm's `train(…, loss=, iterate_batches=)`.)
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxtune.backend import set_blas_threads
from mlxtune.errors import RunFailed
from mlxtune.faults import fault_point
from mlxtune.models import floating_parameters
from mlxtune.runs import BEST_DIR, METRICS_FILE, PLOT_FILE, RESULT_FILE
from mlxtune.storage import atomic_write_text
from mlxtune.train.adapters import trainable_weights
from mlxtune.train.checkpoint import save_adapter, save_checkpoint
from mlxtune.train.metrics import MetricsLog
from mlxtune.train.parallel import DataParallel
from mlxtune.train.plot import plot_losses
from mlxtune.memory.guard import MemoryGuard, describe_change, is_out_of_memory
from mlxtune.train.recovery import adapter_settings, claim_run_dir, unlock_run_dir
from mlxtune.ui import GB, TrainingReporter


class Objective:
    """What one kind of training computes. Subclasses set `trainer` and fill in every method that raises here.

    `command` names the CLI command (resume hints); `watch` the validation metric early stopping and best/ follow.
    """

    command = "lora"
    watch = "loss"
    higher_is_better = False
    shown = "loss"  # the validation metric the live progress line shows

    def batches(self, step: int) -> list:
        """This rank's micro-batches of optimizer step `step` (a pure function of the seed and the step)."""
        raise NotImplementedError

    def gradients(self, micro: list):
        """(loss sum, count, statistics or None, summed gradients) over the micro-batches; `count` is what the
        loss is a mean over (supervised tokens, pairs); statistics are summed like the loss."""
        raise NotImplementedError

    trainer = None  # the objective's compiled step: gradients and an `update(grads, count)` sharing `state`

    def update(self, grads, count) -> None:
        """Apply the step's gradients (their sum divided by `count`: a mean over the whole step)."""
        self.trainer.update(grads, count)

    @property
    def state(self) -> list:
        """The arrays an update changes (evaluated by the engine after each step)."""
        return self.trainer.state

    def tokens(self, micro: list) -> int:
        return sum(b.tokens for b in micro if b is not None)

    def has_validation(self) -> bool:
        raise NotImplementedError

    def validate(self) -> dict:
        """Validation metrics, at least {"loss": ...}."""
        raise NotImplementedError

    def summarise(self, loss_sum: float, count: float, stats) -> dict:
        """Training metrics of a report window, at least {"loss": ...}."""
        return {"loss": loss_sum / max(count, 1.0)}

    def rates(self, count: float, seconds: float) -> dict:
        """Extra throughput figures of a report window for metrics.jsonl."""
        return {}

    def progress_note(self, train_metrics: dict) -> str:
        """Extra figures for the live progress line, after the loss (nothing by default)."""
        return ""

    def better(self, metrics: dict, best: dict | None, min_delta: float) -> bool:
        """Whether validation `metrics` beat the best so far (nanoGPT's one visible condition)."""
        if best is None or best.get(self.watch) is None:
            return True
        if self.higher_is_better:
            return metrics[self.watch] > best[self.watch] + min_delta
        return metrics[self.watch] < best[self.watch] - min_delta

    def shrink(self, guard: MemoryGuard, peak: int | None, step: int) -> dict:
        """Halve the micro-batch and double accumulation (the memory guard's recovery); the change as a record."""
        raise NotImplementedError

    def save_settings(self, run_dir: Path) -> None:
        """Write the (changed) settings into the run directory."""
        raise NotImplementedError

    def nan_hint(self) -> str:
        return "lower --learning-rate (or --grad-clip); with float16 weights, train in float32/bfloat16"

    def try_first(self, step: int) -> None:
        """Before the first step (and after the memory guard changed the batches): a chance to run the largest
        batch once so a run that won't fit fails at once. Nothing by default."""


@dataclass
class Progress:
    """What the engine learns while it runs; the objective turns it into its own result."""

    steps: int
    total_steps: int
    initial_val: dict | None = None
    final_val: dict | None = None
    best_val: dict | None = None
    best_step: int | None = None
    final_train: dict | None = None
    tokens_per_second: float | None = None
    peak_memory_gb: float | None = None
    stopped: str = "completed"  # completed | early-stopped | interrupted
    evals_without_gain: int = 0
    notes: list[str] = field(default_factory=list)
    memory_changes: list[dict] = field(default_factory=list)
    window: dict = field(default_factory=dict)  # the last report window's raw sums (count, seconds)

    def state(self, data: dict | None, settings) -> dict:
        """What a checkpoint saves beside the weights so that resume continues the same run."""
        loss = lambda val: None if not val else val.get("loss")  # noqa: E731  (the keys older checkpoints read)
        return {"total_steps": self.total_steps, "initial_val": self.initial_val, "best_val": self.best_val,
                "initial_val_loss": loss(self.initial_val), "best_val_loss": loss(self.best_val),
                "best_step": self.best_step, "evals_without_gain": self.evals_without_gain, "stopped": self.stopped,
                "data": data, "settings": adapter_settings(settings) if settings is not None else None}

    def restore(self, state: dict) -> None:
        """Put a checkpoint's saved progress back (also from checkpoints that saved only the losses)."""
        as_val = lambda key: None if state.get(key) is None else {"loss": state[key]}  # noqa: E731
        self.initial_val = state.get("initial_val") or as_val("initial_val_loss")
        self.best_val = state.get("best_val") or as_val("best_val_loss")
        self.best_step = state.get("best_step")
        self.evals_without_gain = int(state.get("evals_without_gain") or 0)


@dataclass
class TrainingRun:
    """The run the engine drives, made ready by the objective's preparation (run directory claimed, model loaded,
    checkpoint restored)."""

    run_dir: Path
    model: object
    optimizer: object
    adapter_config: dict
    settings: object  # LoraSettings or a subclass: the cadence (report/eval/save every), patience, min_delta, seed
    total_steps: int
    plot_title: str
    start_step: int = 0
    resume: bool = False
    resumed: dict | None = None  # the checkpoint state a resumed run continues from
    data_files: dict | None = None  # the data fingerprint, saved in every checkpoint and checked on resume
    parallel: DataParallel = field(default_factory=DataParallel)
    memory_budget: int | None = None  # the memory guard's budget (None: no guard)


class StopRequest:
    """SIGINT/SIGTERM finish the current step, save a checkpoint and stop; a second SIGINT aborts at once."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def claim(run_dir: Path, resume: bool, reporter: TrainingReporter) -> None:
    """The run directory locked for this process and checked to suit a new run (or a resume): recovery.py's rules
    (a folder mlxtune did not create is never emptied; one stopped before its first checkpoint starts afresh)."""
    for note in claim_run_dir(run_dir, resume):
        reporter.note(note)


def prepare_backend(settings, model, reporter: TrainingReporter) -> None:
    """The settings that shape the backend, applied: --threads (the system BLAS on the CPU backend),
    --cache-limit-gb, and float32 on the CPU backend (it has no fast half-precision matmul)."""
    cpu = mx.default_device() == mx.cpu
    if settings.threads is not None and cpu and not set_blas_threads(settings.threads):
        reporter.note("--threads applies to the system BLAS, which is not in use here")
    if settings.cache_limit_gb is not None:
        mx.set_cache_limit(int(settings.cache_limit_gb * GB))
    if cpu and any(v.dtype in (mx.float16, mx.bfloat16) for v in floating_parameters(model)):
        model.set_dtype(mx.float32)
        reporter.info("CPU backend: training in float32 (half-precision weights upcast)")


def grad_checkpoint(model) -> None:
    """--grad-checkpoint: activations recomputed in the backward pass. mlx-lm's helper patches the block class's
    __call__ (so patching layer 0 covers every block). It lives in the tuner's trainer module, not a public API:
    tests/test_mlx_lm_private.py fails clearly if an upgrade moves it."""
    from mlx_lm.tuner.trainer import grad_checkpoint as patch_blocks

    patch_blocks(model.layers[0])


def all_finite(model) -> bool:
    return all(mx.isfinite(v).all().item() for v in trainable_weights(model).values())


def save_best(run_dir: Path, model, adapter_cfg: dict) -> None:
    best = run_dir / BEST_DIR
    best.mkdir(exist_ok=True)
    save_adapter(best, trainable_weights(model), adapter_cfg)


def train(run: TrainingRun, objective: Objective, reporter: TrainingReporter) -> Progress:
    """The loop, top to bottom: batch → gradients → update → log → evaluate → save, until the last step, an early
    stop or a signal. Returns the progress; result.json is written by `finish`."""
    settings, run_dir, model, parallel = run.settings, run.run_dir, run.model, run.parallel
    writes = parallel.is_main  # rank 0 alone writes checkpoints, metrics, plots and the best adapter
    metrics_path = run_dir / METRICS_FILE
    metrics = MetricsLog(metrics_path if writes else None, settings.report_to if writes else None, run_dir.name,
                         settings.to_dict())
    if run.resume:
        metrics.trim(run.start_step if run.resumed else -1)
    progress = Progress(run.start_step, run.total_steps)
    if run.resumed:
        progress.restore(run.resumed)
    step = run.start_step

    def save(at_step: int) -> None:
        if not writes:
            return
        weights = trainable_weights(model)
        save_adapter(run_dir, weights, run.adapter_config)
        save_checkpoint(run_dir, at_step, weights, run.adapter_config, run.optimizer,
                        progress.state(run.data_files, settings))

    def evaluate(at_step: int) -> dict:
        val = objective.validate()
        metrics.write({"step": at_step, **{f"val_{k}": v for k, v in val.items()}})
        return val

    # The optimizer's state made before the first compiled call (a no-op when a resume restored it): made by the
    # first update instead, it changes the compiled functions' inputs and they re-trace at step 2 (a step's time).
    # Every checkpoint (step 0's too) and the fail-fast trial see it.
    run.optimizer.init(model.trainable_parameters())
    mx.eval(run.optimizer.state)
    model.train()
    window = _new_window()
    with StopRequest() as stop, reporter.training(run.total_steps, step, None):
        if step == 0 and objective.has_validation():
            reporter.info(f"measuring the validation {objective.shown} before training …")  # minutes on a big model
            val = evaluate(0)
            progress.initial_val = progress.best_val = val
            progress.best_step = 0
            if writes:
                save_best(run_dir, model, run.adapter_config)
            reporter.initial_validation(val)
        if parallel.any(stop.signal_name):  # Ctrl-C during the first validation: a step-0 checkpoint
            save(step)
            progress.stopped = "interrupted"
            reporter.interrupted(stop.signal_name or "stop request", step, run_dir, objective.command)
        # One process only: ranks shrinking on their own would no longer draw matching batches.
        guard = MemoryGuard(run.memory_budget) if run.memory_budget is not None and parallel.size == 1 else None

        def shrink_batches(peak):  # the memory guard's recovery: checkpoint, smaller micro-batches, continue
            save(step)
            event = objective.shrink(guard, peak, step)
            metrics.write(event)
            progress.memory_changes.append(event)
            progress.notes.append(describe_change(event))
            reporter.warning(describe_change(event))
            if writes:
                objective.save_settings(run_dir)

        try_first = True  # before the first step, and again after the guard changed the batches
        try:
            while step < run.total_steps and progress.stopped != "interrupted":
                try:
                    if try_first:
                        try_first = False
                        objective.try_first(step)
                    tic = time.perf_counter()
                    # Dropout's randomness is a function of (seed, step): a resumed run draws what the original
                    # would. 1_000_003 is a prime larger than any step count, so no two (seed, step) pairs share one.
                    mx.random.seed(parallel.step_seed(settings.seed * 1_000_003 + step))
                    micro = objective.batches(step)
                    loss_sum, count, stats, grads = objective.gradients(micro)
                except (RuntimeError, MemoryError) as exc:
                    if guard is None or not is_out_of_memory(exc):
                        raise
                    shrink_batches(None)
                    try_first = True
                    continue
                # Data-parallel: the world's sums (one rank: unchanged), so the update is the same mean per token
                # (per pair) as on one machine, however unevenly the ranks' shares are sized.
                loss_sum, count, tokens, grads = parallel.reduce_step(loss_sum, count, objective.tokens(micro),
                                                                      grads)
                if stats is not None and parallel.distributed:
                    stats = mx.stack(parallel.sum(*[stats[i] for i in range(stats.shape[0])]))
                step_loss = (loss_sum / count).item()
                if not math.isfinite(step_loss):
                    saved = "the last checkpoint is kept"
                    if writes and all_finite(model):  # never save weights that are themselves NaN/inf as "good"
                        save(step)
                        saved = f"the last good weights (step {step}) are saved"
                    raise RunFailed(f"the loss became {step_loss} at step {step + 1}; {saved}", objective.nan_hint())
                objective.update(grads, count)
                mx.eval(objective.state)
                step += 1
                window["loss_sum"] += loss_sum.item()
                window["count"] += count.item()
                if stats is not None:
                    window["stats"] = window["stats"] + np.array(stats)
                window["tokens"] += tokens
                window["seconds"] += time.perf_counter() - tic

                if step % settings.report_every == 0 or step == run.total_steps:
                    train_metrics = objective.summarise(window["loss_sum"], window["count"], window["stats"])
                    record = {"step": step, **{f"train_{k}": v for k, v in train_metrics.items()},
                              "learning_rate": run.optimizer.learning_rate.item(),
                              "tokens_per_second": window["tokens"] / window["seconds"],
                              **objective.rates(window["count"], window["seconds"]),
                              "peak_memory_gb": mx.get_peak_memory() / GB}
                    metrics.write(record)
                    progress.final_train = train_metrics
                    progress.window = record
                    progress.tokens_per_second = record["tokens_per_second"]
                    progress.peak_memory_gb = record["peak_memory_gb"]
                    reporter.train_report(train_metrics["loss"], record["tokens_per_second"],
                                          record["peak_memory_gb"], objective.progress_note(train_metrics))
                    window = _new_window()

                if objective.has_validation() and (step % settings.eval_every == 0 or step == run.total_steps):
                    val = evaluate(step)
                    progress.final_val = val
                    if objective.better(val, progress.best_val, settings.min_delta):
                        progress.best_val, progress.best_step, progress.evals_without_gain = val, step, 0
                        if writes:
                            save_best(run_dir, model, run.adapter_config)
                    else:
                        progress.evals_without_gain += 1
                    reporter.val_report(val[objective.shown])
                    if writes:
                        plot_losses(metrics_path, run_dir / PLOT_FILE, run.plot_title)
                    if settings.patience and progress.evals_without_gain >= settings.patience:
                        progress.stopped = "early-stopped"

                fault_point("train.step")
                stopping = parallel.any(stop.signal_name)  # every rank stops at the same step
                if (step % settings.save_every == 0 or step == run.total_steps or stopping
                        or progress.stopped == "early-stopped"):
                    if writes and (step == run.total_steps or stopping or progress.stopped == "early-stopped"):
                        reporter.info(f"saving the adapter and checkpoint of step {step} to {run_dir} …")
                    save(step)
                reporter.step_done(step)
                progress.steps = step
                if (guard is not None and guard.overshoot() and step < run.total_steps
                        and progress.stopped == "completed" and not stop.signal_name):
                    shrink_batches(guard.peak())
                    try_first = True
                if progress.stopped == "early-stopped":
                    reporter.early_stop(settings.patience, progress.best_step, run_dir / BEST_DIR, objective.watch)
                    break
                if stopping:
                    progress.stopped = "interrupted"
                    reporter.interrupted(stop.signal_name or "stop request", step, run_dir, objective.command)
                    break
        finally:
            if guard is not None:
                guard.close()  # MLX's memory limit back to what it was before the run
    metrics.close()
    return progress


def finish(run: TrainingRun, result) -> None:
    """The run's end: the chart, result.json, and the run directory released."""
    if run.parallel.is_main:
        plot_losses(run.run_dir / METRICS_FILE, run.run_dir / PLOT_FILE, run.plot_title)
        atomic_write_text(run.run_dir / RESULT_FILE, json.dumps(result.to_dict(), indent=2))
        unlock_run_dir(run.run_dir)


def _new_window() -> dict:
    return {"loss_sum": 0.0, "count": 0.0, "stats": 0.0, "tokens": 0, "seconds": 0.0}
