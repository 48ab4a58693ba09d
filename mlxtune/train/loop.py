"""The training loop, top to bottom: batch → gradients → update → log → evaluate → save."""

from __future__ import annotations

import copy
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import mlx.core as mx

from mlxtune.data.batching import BatchPlan, batch_plan, batches_per_epoch, describe_plan, training_batch
from mlxtune.data.dataset import Datasets, load_datasets, resolve_data_path
from mlxtune.data.quality import steps_warning, summary
from mlxtune.errors import RunFailed, UsageError
from mlxtune.backend import set_blas_threads
from mlxtune.cpu_quantized import accelerate_quantized, requested_path
from mlxtune.train.evaluate import validation_loss
from mlxtune.train.loss import Loss, supports_packing
from mlxtune.model_config import DEFAULT_QUANTIZE, model_name, text_config
from mlxtune.models import DEFAULT_BASE_MODEL, load_model, resolve_model
from mlxtune.runs import (
    ADAPTER_FILE,
    BEST_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    RESULT_FILE,
    RUN_FILE,
    TEMPLATE_FILE,
)
from mlxtune.settings import LoraSettings, load_run_settings, save_settings
from mlxtune.storage import check_writable
from mlxtune.train.adapters import attach_adapters, parameter_counts, trainable_weights
from mlxtune.train.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    save_adapter,
    save_checkpoint,
)
from mlxtune.train.metrics import MetricsLog
from mlxtune.train.parallel import DataParallel, check_resume_ranks
from mlxtune.train.plot import plot_losses
from mlxtune.train.recovery import (
    check_resume_state,
    claim_run_dir,
    data_fingerprint,
    find_resume_point,
    progress_state,
    restore_progress,
    unlock_run_dir,
)
from mlxtune.train.planner import MemoryGuard, MemoryPlan, describe_change, is_out_of_memory, plan_for_run
from mlxtune.train.step import TrainStep, build_optimizer
from mlxtune.ui import GB, TrainingReporter, make_console



@dataclass
class RunResult:
    run_dir: str
    steps: int
    total_steps: int
    initial_val_loss: float | None = None
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    final_train_loss: float | None = None
    tokens_per_second: float | None = None
    supervised_tokens_per_second: float | None = None
    peak_memory_gb: float | None = None
    trainable_parameters: int = 0
    total_parameters: int = 0
    stopped: str = "completed"  # completed | early-stopped | interrupted
    notes: list[str] = field(default_factory=list)
    data_warnings: list[dict] = field(default_factory=list)  # {"code", "where", "message"}, as `data check` gives
    memory_estimate_gb: float | None = None
    memory_budget_gb: float | None = None
    memory_changes: list[dict] = field(default_factory=list)  # what the memory guard changed, and why

    def to_dict(self) -> dict:
        return asdict(self)


def default_run_dir(model_path: Path) -> Path:
    return Path("runs") / f"{model_name(model_path)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def total_optimizer_steps(settings: LoraSettings, train, plan: BatchPlan) -> int:
    if settings.iters is not None:
        return settings.iters
    micro_batches = math.ceil(settings.epochs * batches_per_epoch(train, plan, settings.seed))
    return max(1, math.ceil(micro_batches / settings.grad_accumulation))


def _prepare_run_dir(settings: LoraSettings, model_path: Path, resume: bool) -> tuple[Path, list[str]]:
    run_dir = Path(settings.out) if settings.out else default_run_dir(model_path)
    return run_dir, claim_run_dir(run_dir, resume)  # locked for this process; reusable if nothing was trained


class _StopRequest:
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


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


@dataclass
class TrainingSetup:
    """Everything the loop needs, made ready by `prepare_training`: the loop itself only reads it."""

    settings: LoraSettings  # a copy of the caller's, with model, data and out resolved
    run_dir: Path
    model_path: Path
    model: object
    model_config: dict
    datasets: Datasets
    adapter_config: dict
    plan: BatchPlan
    total_steps: int
    optimizer: object
    loss: Loss
    start_step: int = 0
    resume: bool = False
    resumed: dict | None = None  # the checkpoint state a resumed run continues from (None: from step 0)
    data_files: dict | None = None  # fingerprint of the data files, checked on resume
    parallel: DataParallel = field(default_factory=DataParallel)  # this process's rank (alone: rank 0 of 1)
    memory_plan: MemoryPlan | None = None  # the estimate against the budget, made before the model was loaded


def prepare_training(settings: LoraSettings, *, resume: bool = False, reporter: TrainingReporter | None = None,
                     parallel: DataParallel | None = None, choose_sizes: bool = False,
                     force: bool = False) -> TrainingSetup:
    """Resolve the model and data, create (or reopen) the run directory, load the model with its adapters and the
    datasets, and restore the latest checkpoint when resuming. `settings` itself is left as it was.
    With `parallel`, this process is one rank of a data-parallel run (train/distributed.py starts those).
    Memory is planned before the model loads (train/planner.py): with `choose_sizes` the planner picks the
    batch/length settings for the budget; otherwise settings that won't fit are refused unless `force`."""
    reporter = reporter or TrainingReporter(make_console())
    parallel = parallel or DataParallel()
    writes = parallel.is_main  # rank 0 alone writes the run directory
    settings = copy.deepcopy(settings).validate()
    requested_path()  # a bad MLXTUNE_DEQUANTIZE fails before anything is written
    if not settings.data:
        raise UsageError("no data given", "pass --data with a directory of train/valid .jsonl files or one file")
    if not settings.model:
        reporter.default_model(DEFAULT_BASE_MODEL, DEFAULT_QUANTIZE)
        settings.model = DEFAULT_BASE_MODEL
    if writes:
        check_writable(Path(settings.out or "runs"))  # before any model is pulled or loaded
    model_path = resolve_model(settings.model, console=reporter.console)
    settings.fit_model(model_path)  # max_seq_length from the model's context; its files checked before loading
    data_path = resolve_data_path(settings.data)
    if writes:
        run_dir, dir_notes = _prepare_run_dir(settings, model_path, resume)
        for note in dir_notes:
            reporter.note(note)
    else:
        run_dir = Path(settings.out)
    settings.model, settings.data, settings.out = str(model_path), str(data_path.resolve()), str(run_dir)

    reporter.start(settings.method, model_path, run_dir)
    memory_plan = plan_for_run(settings, model_path, data_path, choose=choose_sizes and not resume,
                               force=force or resume, console=reporter.console)
    reporter.info(f"loading the model from {model_path} …")  # said before each phase that can take minutes
    model, tokenizer, model_config = load_model(model_path)
    if settings.threads is not None and _on_cpu() and not set_blas_threads(settings.threads):
        reporter.note("--threads applies to the system BLAS, which is not in use here")
    if settings.cache_limit_gb is not None:
        mx.set_cache_limit(int(settings.cache_limit_gb * GB))
    if _on_cpu() and any(v.dtype in (mx.float16, mx.bfloat16) for v in floating_parameters(model)):
        # MLX's CPU backend has no fast half-precision matmul: float32 is much faster there.
        model.set_dtype(mx.float32)
        reporter.info("CPU backend: training in float32 (half-precision weights upcast)")
    context = text_config(model_config).get("max_position_embeddings")
    reporter.info(f"reading and tokenizing {data_path} …")
    datasets = load_datasets(data_path, tokenizer, **settings.dataset_options(),
                             context_length=context if isinstance(context, int) else None)
    for note in datasets.notes:
        reporter.note(note)

    mx.random.seed(settings.seed)
    adapter_config = attach_adapters(model, settings)
    quantized = accelerate_quantized(model, memory_plan.budget if memory_plan else None)  # CPU backend only
    if quantized:
        reporter.info(quantized)
    if adapter_config["num_layers"] < (settings.layers or 0):
        reporter.note(f"the model has {adapter_config['num_layers']} blocks; adapting all of them")
    # Planned for the whole world (per-rank budget × ranks); each rank takes its rows of every batch.
    world_batch_size, world_batch_tokens = parallel.world_batch(settings.batch_size, settings.batch_tokens)
    plan, plan_notes = batch_plan([len(e) for e in datasets.train], batch_size=world_batch_size,
                                  batch_tokens=world_batch_tokens, pack=settings.pack,
                                  max_seq_length=settings.max_seq_length, packing_supported=supports_packing(model))
    for note in plan_notes:
        reporter.note(note)
    total_steps = total_optimizer_steps(settings, datasets.train, plan)
    if settings.iters is not None:  # an explicit step count that passes over the data too often
        per_step = settings.grad_accumulation * len(datasets.train) / batches_per_epoch(datasets.train, plan,
                                                                                         settings.seed)
        datasets.warnings += steps_warning(total_steps, per_step, len(datasets.train))
    reporter.data_problems([w.to_dict() for w in datasets.warnings])
    optimizer = build_optimizer(settings, total_steps)

    start_step, resumed = 0, None
    data_files = data_fingerprint(data_path)
    if resume:
        check_resume_ranks(run_dir, parallel.size)
        point = find_resume_point(run_dir, total_steps)
        for warning in point.warnings:
            reporter.warning(warning)
        if point.checkpoint is not None:
            resumed = load_checkpoint(point.checkpoint, model, optimizer)
            check_resume_state(run_dir, resumed, total_steps, data_files)
            start_step = resumed["step"]
            reporter.resumed(point.checkpoint.name, start_step, total_steps)
    parallel.broadcast_weights(model)  # every rank starts from rank 0's weights
    if writes:
        save_settings(settings, run_dir / CONFIG_FILE)
        _write_run_info(run_dir, datasets, model_path, model_config, adapter_config, parallel.size)
    if settings.grad_checkpoint:
        # mlx-lm's helper patches the block class's __call__ to recompute activations in the backward pass (so
        # patching layer 0 covers every block). It lives in the tuner's trainer module, not a public API:
        # tests/test_mlx_lm_private.py fails clearly if an upgrade moves it.
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    loss = Loss(model, settings.selective_loss)
    if settings.selective_loss and not loss.selective:
        reporter.note("this architecture's output head can't be applied separately: computing the loss over full "
                      "logits")
    return TrainingSetup(settings, run_dir, model_path, model, model_config, datasets, adapter_config, plan,
                         total_steps, optimizer, loss, start_step, resume, resumed, data_files, parallel, memory_plan)


def finetune(settings: LoraSettings, *, resume: bool = False, console=None,
             parallel: DataParallel | None = None, choose_sizes: bool = False, force: bool = False) -> RunResult:
    """Train adapters as `settings` say and return what happened. With `resume`, continue `settings.out`.

    `settings` is not changed; the resolved copy the run used is saved as the run's config.yaml. `choose_sizes`
    and `force`: see `prepare_training`."""
    reporter = TrainingReporter(console or make_console())
    setup = prepare_training(settings, resume=resume, reporter=reporter, parallel=parallel,
                             choose_sizes=choose_sizes, force=force)
    return run_training(setup, reporter)


def run_training(setup: TrainingSetup, reporter: TrainingReporter) -> RunResult:
    """The loop, top to bottom: batch → gradients → update → log → evaluate → save, until the last step, an early
    stop or a signal."""
    settings, run_dir, model, datasets, loss = setup.settings, setup.run_dir, setup.model, setup.datasets, setup.loss
    optimizer, adapter_cfg, plan, total_steps = setup.optimizer, setup.adapter_config, setup.plan, setup.total_steps
    parallel = setup.parallel
    writes = parallel.is_main  # rank 0 alone writes checkpoints, metrics, plots and the best adapter
    metrics_path = run_dir / METRICS_FILE
    metrics = MetricsLog(metrics_path if writes else None, settings.report_to if writes else None, run_dir.name,
                         settings.to_dict())
    resumed, data_files = setup.resumed, setup.data_files
    if setup.resume:
        metrics.trim(setup.start_step if resumed else -1)
    plot_title = f"{model_name(setup.model_path)} · {run_dir.name}"

    trainable, total = parameter_counts(model)
    reporter.header(settings, data_kind=datasets.kind, train_examples=len(datasets.train),
                    valid_examples=len(datasets.valid), template_origin=datasets.template.origin,
                    data_warnings=summary(datasets.warnings)
                    + (" (`mlxtune data check` lists them)" if datasets.warnings else ""),
                    trainable=trainable, total=total, steps=total_steps,
                    quantization=setup.model_config.get("quantization"),
                    loss_mode="selective (supervised positions only)" if loss.selective else "full logits",
                    batching=describe_plan(plan), device=str(mx.default_device()),
                    ranks=parallel.describe() if parallel.distributed else None)
    result = RunResult(str(run_dir), setup.start_step, total_steps, trainable_parameters=trainable,
                       total_parameters=total, notes=list(datasets.notes),
                       data_warnings=[w.to_dict() for w in datasets.warnings])
    memory_plan = setup.memory_plan
    if memory_plan is not None:
        result.memory_estimate_gb = memory_plan.to_dict()["estimate_gb"]
        result.memory_budget_gb = memory_plan.to_dict()["budget_gb"]
        reporter.info(f"memory: {memory_plan.verdict()} ({memory_plan.budget_source})")
    trainer = TrainStep(model, optimizer, settings.grad_clip, loss)
    model.train()
    val_loss = math.nan
    evals_without_gain = restore_progress(resumed, result) if resumed else 0
    window = {"loss_sum": 0.0, "count": 0.0, "tokens": 0, "seconds": 0.0, "steps": 0}
    step = setup.start_step
    with _StopRequest() as stop, reporter.training(total_steps, step, val_loss):
        if step == 0 and datasets.valid:
            reporter.info(f"measuring the validation loss before training ({_val_batches(settings, datasets)}) …")
            val_loss = validation_loss(model, datasets.valid, settings.batch_size, settings.val_batches, loss,
                                       parallel)
            result.initial_val_loss = result.best_val_loss = val_loss
            result.best_step = 0
            if writes:
                _save_best(run_dir, model, adapter_cfg)
            metrics.write({"step": 0, "val_loss": val_loss})
            reporter.initial_validation(val_loss)
        if parallel.any(stop.signal_name):  # Ctrl-C during the first validation: a step-0 checkpoint
            if writes:
                _save(run_dir, model, optimizer, adapter_cfg, step,
                      progress_state(result, evals_without_gain, total_steps, data_files))
            result.stopped = "interrupted"
            reporter.interrupted(stop.signal_name or "stop request", step, run_dir)
        # One process only: ranks shrinking on their own would no longer draw matching batches.
        guard = MemoryGuard(memory_plan.budget) if memory_plan is not None and parallel.size == 1 else None

        def shrink_batches(peak):  # the memory guard's recovery: checkpoint, smaller micro-batches, continue
            _save(run_dir, model, optimizer, adapter_cfg, step,
                  progress_state(result, evals_without_gain, total_steps, data_files))
            event = guard.shrink(settings, plan.batch_tokens, max(len(e) for e in datasets.train), peak, step)
            metrics.write(event)
            result.memory_changes.append(event)
            result.notes.append(describe_change(event))
            reporter.warning(describe_change(event))
            save_settings(settings, run_dir / CONFIG_FILE)
            return batch_plan([len(e) for e in datasets.train], batch_size=settings.batch_size,
                              batch_tokens=settings.batch_tokens, pack=settings.pack,
                              max_seq_length=settings.max_seq_length, packing_supported=plan.pack)[0]

        while step < total_steps and result.stopped != "interrupted":
            tic = time.perf_counter()
            # Dropout's randomness is a function of (seed, step): a resumed run draws what the original would.
            # 1_000_003 is a prime larger than any step count, so no two (seed, step) pairs share a seed.
            mx.random.seed(parallel.step_seed(settings.seed * 1_000_003 + step))
            micro = [
                training_batch(datasets.train, plan, settings.seed, step * settings.grad_accumulation + k,
                               parallel.rank, parallel.size)
                for k in range(settings.grad_accumulation)
            ]
            try:
                loss_sum, count, grads = trainer.accumulate(micro)
            except (RuntimeError, MemoryError) as exc:
                if guard is None or not is_out_of_memory(exc):
                    raise
                plan = shrink_batches(None)
                continue
            # Data-parallel: the world's sums (one rank: unchanged), so the update is the same per-token mean.
            loss_sum, count, tokens, grads = parallel.reduce_step(loss_sum, count, sum(b.tokens for b in micro if b),
                                                                  grads)
            step_loss = (loss_sum / count).item()
            if not math.isfinite(step_loss):
                saved = "the last checkpoint is kept"
                if writes and _all_finite(model):  # never save weights that are themselves NaN/inf as "good"
                    _save(run_dir, model, optimizer, adapter_cfg, step,
                          progress_state(result, evals_without_gain, total_steps, data_files))
                    saved = f"the last good weights (step {step}) are saved"
                raise RunFailed(
                    f"the loss became {step_loss} at step {step + 1}; {saved}",
                    "lower --learning-rate (or --grad-clip); with float16 weights, train in float32/bfloat16",
                )
            trainer.update(grads, count)
            mx.eval(trainer.state)
            step += 1
            window["loss_sum"] += loss_sum.item()
            window["count"] += count.item()
            window["tokens"] += tokens
            window["seconds"] += time.perf_counter() - tic
            window["steps"] += 1

            if step % settings.report_every == 0 or step == total_steps:
                train_loss = window["loss_sum"] / max(window["count"], 1.0)
                record = {
                    "step": step,
                    "train_loss": train_loss,
                    "learning_rate": optimizer.learning_rate.item(),
                    "tokens_per_second": window["tokens"] / window["seconds"],
                    "supervised_tokens_per_second": window["count"] / window["seconds"],
                    "supervised_tokens": int(window["count"]),
                    "peak_memory_gb": mx.get_peak_memory() / GB,
                }
                metrics.write(record)
                result.final_train_loss = train_loss
                result.tokens_per_second = record["tokens_per_second"]
                result.supervised_tokens_per_second = record["supervised_tokens_per_second"]
                result.peak_memory_gb = record["peak_memory_gb"]
                reporter.train_report(train_loss, record["tokens_per_second"], record["peak_memory_gb"])
                window = dict.fromkeys(window, 0)

            if datasets.valid and (step % settings.eval_every == 0 or step == total_steps):
                val_loss = validation_loss(model, datasets.valid, settings.batch_size, settings.val_batches, loss,
                                           parallel)
                metrics.write({"step": step, "val_loss": val_loss})
                result.final_val_loss = val_loss
                if result.best_val_loss is None or val_loss < result.best_val_loss - settings.min_delta:
                    result.best_val_loss, result.best_step, evals_without_gain = val_loss, step, 0
                    if writes:
                        _save_best(run_dir, model, adapter_cfg)
                else:
                    evals_without_gain += 1
                reporter.val_report(val_loss)
                if writes:
                    plot_losses(metrics_path, run_dir / PLOT_FILE, plot_title)
                if settings.patience and evals_without_gain >= settings.patience:
                    result.stopped = "early-stopped"

            stopping = parallel.any(stop.signal_name)  # every rank stops at the same step
            if writes and (step % settings.save_every == 0 or step == total_steps or stopping
                           or result.stopped == "early-stopped"):
                if step == total_steps or stopping or result.stopped == "early-stopped":
                    reporter.info(f"saving the adapter and checkpoint of step {step} to {run_dir} …")
                _save(run_dir, model, optimizer, adapter_cfg, step,
                      progress_state(result, evals_without_gain, total_steps, data_files))
            reporter.step_done(step)
            result.steps = step
            if (guard is not None and guard.overshoot() and step < total_steps and result.stopped == "completed"
                    and not stop.signal_name):
                plan = shrink_batches(guard.peak())
            if result.stopped == "early-stopped":
                reporter.early_stop(settings.patience, result.best_step, run_dir / BEST_DIR)
                break
            if stopping:
                result.stopped = "interrupted"
                reporter.interrupted(stop.signal_name or "stop request", step, run_dir)
                break

    metrics.close()
    if writes:
        plot_losses(metrics_path, run_dir / PLOT_FILE, plot_title)
        atomic_write_text(run_dir / RESULT_FILE, json.dumps(result.to_dict(), indent=2))
        unlock_run_dir(run_dir)
    reporter.summary(result, run_dir / ADAPTER_FILE)
    return result


def _val_batches(settings, datasets) -> str:
    batches = -(-len(datasets.valid) // settings.batch_size)
    if settings.val_batches >= 0:
        batches = min(batches, settings.val_batches)
    return f"{batches} batch{'es' if batches != 1 else ''} of up to {settings.batch_size}"


def floating_parameters(model) -> list[mx.array]:
    """Every floating-point parameter of `model` (frozen or trainable): what a dtype change would touch."""
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]


def _save(run_dir: Path, model, optimizer, adapter_cfg: dict, step: int, state: dict) -> None:
    weights = trainable_weights(model)
    optimizer.init(model.trainable_parameters())  # a no-op after the first update; gives step 0 its state
    save_adapter(run_dir, weights, adapter_cfg)
    save_checkpoint(run_dir, step, weights, adapter_cfg, optimizer, state)


def _all_finite(model) -> bool:
    return all(mx.isfinite(v).all().item() for v in trainable_weights(model).values())


def _save_best(run_dir: Path, model, adapter_cfg: dict) -> None:
    best = run_dir / BEST_DIR
    best.mkdir(exist_ok=True)
    save_adapter(best, trainable_weights(model), adapter_cfg)


def _write_run_info(run_dir: Path, datasets: Datasets, model_path: Path, model_config: dict, adapter_cfg: dict,
                    ranks: int = 1):
    info = {
        "ranks": ranks,  # data-parallel ranks: a resume needs as many (the batches depend on it)
        "base_model": str(model_path),
        "model_type": model_config.get("model_type"),
        "data_kind": datasets.kind,
        "template_origin": datasets.template.origin,
        "train_examples": len(datasets.train),
        "valid_examples": len(datasets.valid),
        "adapter": adapter_cfg,
    }
    if datasets.template.template and datasets.template.origin != "model":
        atomic_write_text(run_dir / TEMPLATE_FILE, datasets.template.template)
    atomic_write_text(run_dir / RUN_FILE, json.dumps(info, indent=2))


# Settings a resumed run may change: how long it runs, how often it evaluates/saves/logs, the optimizer's step sizes
# (the schedule is a function of the step, so a new one simply takes over) and machine-only knobs. Everything else
# decides what the adapter or the data order is, so changing it would silently train a different run.
CHANGEABLE_ON_RESUME = (
    "iters", "epochs", "eval_every", "save_every", "report_every", "val_batches", "patience", "min_delta",
    "learning_rate", "schedule", "warmup_steps", "weight_decay", "grad_clip", "grad_checkpoint", "report_to",
    "threads", "cache_limit_gb", "memory",
)


def resume_settings(run_dir: str | Path, overrides: dict) -> LoraSettings:
    """Settings of an existing run with `overrides` (None = not given) applied: the CHANGEABLE_ON_RESUME ones are
    taken, any other that differs from the run's own value is refused with a UsageError naming it."""
    config = Path(run_dir) / CONFIG_FILE
    if not config.is_file():
        raise UsageError(f"{run_dir} is not an mlxtune run (no {CONFIG_FILE})", "give the run directory to resume")
    settings = load_run_settings(config)
    refused = []
    for key, value in overrides.items():
        if value is None:
            continue
        if key in CHANGEABLE_ON_RESUME:
            setattr(settings, key, value)
        elif key != "out" and _differs(getattr(settings, key), value):
            refused.append(f"--{key.replace('_', '-')} (the run has {getattr(settings, key)!r})")
    if refused:
        raise UsageError(f"can't change {', '.join(refused)} when resuming {run_dir}",
                         "drop those flags, or start a new run with --out; --resume may change "
                         + ", ".join(f"--{k.replace('_', '-')}" for k in CHANGEABLE_ON_RESUME))
    settings.out = str(run_dir)
    return settings.validate()


def _differs(saved, given) -> bool:
    if saved is None or given is None:
        return saved != given
    if isinstance(given, str) and isinstance(saved, str) and Path(given).exists() and Path(saved).exists():  # --model / --data paths
        return Path(given).resolve() != Path(saved).resolve()
    if isinstance(saved, list) and isinstance(given, str):  # --target-modules a,b against the saved list
        given = [m.strip() for m in given.split(",") if m.strip()]
    if isinstance(saved, float) or isinstance(given, float):
        return not math.isclose(float(saved), float(given))
    if saved is not None and given is not None and not isinstance(saved, type(given)):
        return str(saved) != str(given)
    return saved != given
