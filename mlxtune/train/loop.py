"""The training loop, top to bottom: batch → gradients → update → log → evaluate → save."""

from __future__ import annotations

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
from mlxtune.train.evaluate import validation_loss
from mlxtune.train.loss import Loss, supports_packing
from mlxtune.backend import set_blas_threads
from mlxtune.model_config import DEFAULT_QUANTIZE, model_name, text_config
from mlxtune.models import DEFAULT_BASE_MODEL, load_model, resolve_model
from mlxtune.runs import (
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
from mlxtune.train.recovery import (
    check_resume_state,
    claim_run_dir,
    data_fingerprint,
    find_resume_point,
    progress_state,
    restore_progress,
    unlock_run_dir,
)
from mlxtune.train.metrics import MetricsLog
from mlxtune.train.plot import plot_losses
from mlxtune.train.step import TrainStep, build_optimizer
from mlxtune.ui import fmt_loss, make_console, print_data_problems, sparkline, summary_table, training_progress



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


def finetune(settings: LoraSettings, *, resume: bool = False, console=None) -> RunResult:
    """Train adapters as `settings` say and return what happened. With `resume`, continue `settings.out`."""
    console = console or make_console()
    settings.validate()
    if not settings.data:
        raise UsageError("no data given", "pass --data with a directory of train/valid .jsonl files or one file")
    if not settings.model:
        console.print(f"no --model given: using the default base model [cyan]{DEFAULT_BASE_MODEL}[/] "
                      f"({DEFAULT_QUANTIZE}-bit, pulled once into the model library)")
        settings.model = DEFAULT_BASE_MODEL
    check_writable(Path(settings.out or "runs"))  # before any model is pulled or loaded
    model_path = resolve_model(settings.model, console=console)
    data_path = resolve_data_path(settings.data)
    run_dir, dir_notes = _prepare_run_dir(settings, model_path, resume)
    for note in dir_notes:
        console.print(f"[yellow]note:[/] {note}")
    settings.model, settings.data, settings.out = str(model_path), str(data_path.resolve()), str(run_dir)

    console.print(f"[bold]mlxtune[/] {settings.method} · model [cyan]{model_path}[/] · run [cyan]{run_dir}[/]")
    model, tokenizer, model_config = load_model(model_path)
    if settings.threads is not None and _on_cpu() and not set_blas_threads(settings.threads):
        console.print("[yellow]note:[/] --threads applies to the system BLAS, which is not in use here")
    if settings.cache_limit_gb is not None:
        mx.set_cache_limit(int(settings.cache_limit_gb * 1e9))

    if _on_cpu() and any(v.dtype in (mx.float16, mx.bfloat16) for v in trainable_or_all(model)):
        # MLX's CPU backend has no fast half-precision matmul: float32 is much faster there.
        model.set_dtype(mx.float32)
        console.print("CPU backend: training in float32 (half-precision weights upcast)")
    context = text_config(model_config).get("max_position_embeddings")
    datasets = load_datasets(data_path, tokenizer, **settings.dataset_options(),
                             context_length=context if isinstance(context, int) else None)
    for note in datasets.notes:
        console.print(f"[yellow]note:[/] {note}")

    mx.random.seed(settings.seed)
    adapter_cfg = attach_adapters(model, settings)
    if adapter_cfg["num_layers"] < (settings.layers or 0):
        console.print(f"[yellow]note:[/] the model has {adapter_cfg['num_layers']} blocks; adapting all of them")
    plan, plan_notes = batch_plan([len(e) for e in datasets.train], batch_size=settings.batch_size,
                                  batch_tokens=settings.batch_tokens, pack=settings.pack,
                                  max_seq_length=settings.max_seq_length, packing_supported=supports_packing(model))
    for note in plan_notes:
        console.print(f"[yellow]note:[/] {note}")
    total_steps = total_optimizer_steps(settings, datasets.train, plan)
    if settings.iters is not None:  # an explicit step count that passes over the data too often
        per_step = settings.grad_accumulation * len(datasets.train) / batches_per_epoch(datasets.train, plan,
                                                                                         settings.seed)
        datasets.warnings += steps_warning(total_steps, per_step, len(datasets.train))
    print_data_problems(console, [], [w.to_dict() for w in datasets.warnings])
    optimizer = build_optimizer(settings, total_steps)

    metrics_path = run_dir / METRICS_FILE
    metrics = MetricsLog(metrics_path, settings.report_to, run_dir.name, settings.to_dict())
    start_step, resumed = 0, None
    data_files = data_fingerprint(data_path)
    if resume:
        point = find_resume_point(run_dir, total_steps)
        for warning in point.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        if point.checkpoint is not None:
            resumed = load_checkpoint(point.checkpoint, model, optimizer)
            check_resume_state(run_dir, resumed, total_steps, data_files)
            start_step = resumed["step"]
            console.print(f"resuming from {point.checkpoint.name} (step {start_step} of {total_steps})")
        metrics.trim(start_step if resumed else -1)
    save_settings(settings, run_dir / CONFIG_FILE)
    _write_run_info(run_dir, datasets, model_path, model_config, adapter_cfg)

    trainable, total = parameter_counts(model)
    if settings.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])

    result = RunResult(str(run_dir), start_step, total_steps, trainable_parameters=trainable, total_parameters=total,
                       notes=list(datasets.notes), data_warnings=[w.to_dict() for w in datasets.warnings])
    loss = Loss(model, settings.selective_loss)
    if settings.selective_loss and not loss.selective:
        console.print("[yellow]note:[/] this architecture's output head can't be applied separately: "
                      "computing the loss over full logits")
    quantization = model_config.get("quantization")
    _print_header(console, settings, datasets, trainable, total, total_steps, quantization,
                  "selective (supervised positions only)" if loss.selective else "full logits", describe_plan(plan))
    trainer = TrainStep(model, optimizer, settings.grad_clip, loss)
    model.train()
    history: list[float] = []
    val_loss = math.nan
    evals_without_gain = restore_progress(resumed, result) if resumed else 0
    window = {"loss_sum": 0.0, "count": 0.0, "tokens": 0, "seconds": 0.0, "steps": 0}
    step = start_step
    with _StopRequest() as stop, training_progress(console) as progress:
        if start_step == 0 and datasets.valid:
            val_loss = validation_loss(model, datasets.valid, settings.batch_size, settings.val_batches, loss)
            result.initial_val_loss = result.best_val_loss = val_loss
            result.best_step = 0
            _save_best(run_dir, model, adapter_cfg)
            metrics.write({"step": 0, "val_loss": val_loss})
            console.print(f"validation loss before training: {fmt_loss(val_loss)}")
        if stop.signal_name:  # Ctrl-C during the first validation: a step-0 checkpoint, as at any other step
            _save(run_dir, model, optimizer, adapter_cfg, step,
                  progress_state(result, evals_without_gain, total_steps, data_files))
            result.stopped = "interrupted"
            console.print(f"[yellow]{stop.signal_name}:[/] checkpoint saved at step {step}; "
                          f"continue with: mlxtune lora --resume {run_dir}")
        task = progress.add_task("train", total=total_steps, completed=step, loss="—", val=fmt_loss(val_loss),
                                 speed="—", memory="—", spark="")
        while step < total_steps and result.stopped != "interrupted":
            tic = time.perf_counter()
            # Dropout's randomness is a function of (seed, step): a resumed run draws what the original would.
            mx.random.seed(settings.seed * 1_000_003 + step)
            micro = [
                training_batch(datasets.train, plan, settings.seed, step * settings.grad_accumulation + k)
                for k in range(settings.grad_accumulation)
            ]
            loss_sum, count, grads = trainer.accumulate(micro)
            step_loss = (loss_sum / count).item()
            if not math.isfinite(step_loss):
                saved = "the last checkpoint is kept"
                if _all_finite(model):  # never save weights that are themselves NaN/inf as "good"
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
            window["tokens"] += sum(b.tokens for b in micro)
            window["seconds"] += time.perf_counter() - tic
            window["steps"] += 1

            if step % settings.report_every == 0 or step == total_steps:
                train_loss = window["loss_sum"] / max(window["count"], 1.0)
                history.append(train_loss)
                record = {
                    "step": step,
                    "train_loss": train_loss,
                    "learning_rate": optimizer.learning_rate.item(),
                    "tokens_per_second": window["tokens"] / window["seconds"],
                    "supervised_tokens_per_second": window["count"] / window["seconds"],
                    "supervised_tokens": int(window["count"]),
                    "peak_memory_gb": mx.get_peak_memory() / 1e9,
                }
                metrics.write(record)
                result.final_train_loss = train_loss
                result.tokens_per_second = record["tokens_per_second"]
                result.supervised_tokens_per_second = record["supervised_tokens_per_second"]
                result.peak_memory_gb = record["peak_memory_gb"]
                progress.update(task, loss=fmt_loss(train_loss), speed=f"{record['tokens_per_second']:.0f}",
                                memory=f"{record['peak_memory_gb']:.2f}GB", spark=sparkline(history))
                window = dict.fromkeys(window, 0)

            if datasets.valid and (step % settings.eval_every == 0 or step == total_steps):
                val_loss = validation_loss(model, datasets.valid, settings.batch_size, settings.val_batches, loss)
                metrics.write({"step": step, "val_loss": val_loss})
                result.final_val_loss = val_loss
                if result.best_val_loss is None or val_loss < result.best_val_loss - settings.min_delta:
                    result.best_val_loss, result.best_step, evals_without_gain = val_loss, step, 0
                    _save_best(run_dir, model, adapter_cfg)
                else:
                    evals_without_gain += 1
                progress.update(task, val=fmt_loss(val_loss))
                plot_losses(metrics_path, run_dir / PLOT_FILE, f"{model_name(model_path)} · {run_dir.name}")
                if settings.patience and evals_without_gain >= settings.patience:
                    result.stopped = "early-stopped"

            if (step % settings.save_every == 0 or step == total_steps or stop.signal_name
                    or result.stopped == "early-stopped"):
                _save(run_dir, model, optimizer, adapter_cfg, step,
                      progress_state(result, evals_without_gain, total_steps, data_files))
            progress.update(task, completed=step)
            result.steps = step
            if result.stopped == "early-stopped":
                console.print(f"early stop: no validation gain in {settings.patience} evaluations; "
                              f"best step {result.best_step} is in {run_dir / BEST_DIR}")
                break
            if stop.signal_name:
                result.stopped = "interrupted"
                console.print(f"[yellow]{stop.signal_name}:[/] checkpoint saved at step {step}; "
                              f"continue with: mlxtune lora --resume {run_dir}")
                break

    metrics.close()
    plot_losses(metrics_path, run_dir / PLOT_FILE, f"{model_name(model_path)} · {run_dir.name}")
    atomic_write_text(run_dir / RESULT_FILE, json.dumps(result.to_dict(), indent=2))
    _print_summary(console, result)
    unlock_run_dir(run_dir)
    return result


def trainable_or_all(model):
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


def _write_run_info(run_dir: Path, datasets: Datasets, model_path: Path, model_config: dict, adapter_cfg: dict):
    info = {
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


def _print_header(console, settings: LoraSettings, datasets: Datasets, trainable: int, total: int, steps: int,
                  quantization: dict | None, loss_mode: str, batching: str):
    method = settings.method if not quantization or settings.method == "full" else f"Q{settings.method.upper()}"
    base = f" on a {quantization.get('bits')}-bit base" if quantization else ""
    targets = f", modules {','.join(settings.target_modules)}" if settings.target_modules else ""
    rows = [
        ("method", f"{method}{base} rank {settings.rank} alpha {settings.alpha:g} (scale {settings.scale:g}){targets}"
         if settings.method != "full" else f"full{base}"),
        ("trainable", f"{trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"),
        ("data", f"{datasets.kind}: {len(datasets.train)} train / {len(datasets.valid)} valid examples"),
        ("data warnings", summary(datasets.warnings)
         + (" (`mlxtune data check` lists them)" if datasets.warnings else "")),
        ("template", datasets.template.origin),
        ("steps", f"{steps} optimizer steps × {settings.grad_accumulation} micro-batch(es), "
                  f"lr {settings.learning_rate:g} {settings.schedule}"),
        ("batching", batching),
        ("loss", loss_mode),
        ("device", str(mx.default_device())),
    ]
    console.print(summary_table("run", rows))


def _print_summary(console, result: RunResult) -> None:
    rows = [
        ("steps", f"{result.steps}/{result.total_steps} ({result.stopped})"),
        ("val loss", f"{fmt_loss(result.initial_val_loss)} → {fmt_loss(result.final_val_loss)} "
                     f"(best {fmt_loss(result.best_val_loss)})"),
        ("train loss", fmt_loss(result.final_train_loss)),
        ("speed", f"{result.tokens_per_second or 0:.0f} tokens/s"),
        ("peak memory", f"{result.peak_memory_gb or 0:.2f} GB"),
        ("adapter", f"{result.run_dir}/adapters.safetensors"),
    ]
    console.print(summary_table("result", rows))


def resume_settings(run_dir: str | Path, overrides: dict) -> LoraSettings:
    """Settings of an existing run, with `iters`/`epochs` and the like changed by `overrides`."""
    config = Path(run_dir) / CONFIG_FILE
    if not config.is_file():
        raise UsageError(f"{run_dir} is not an mlxtune run (no {CONFIG_FILE})", "give the run directory to resume")
    settings = load_run_settings(config)
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    settings.out = str(run_dir)
    return settings.validate()
