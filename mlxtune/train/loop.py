"""The training loop, top to bottom: batch → gradients → update → log → evaluate → save."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxtune.data.batching import BatchPlan, batch_plan, batches_per_epoch, describe_plan, training_batch
from mlxtune.data.dataset import Datasets, load_datasets, resolve_data_path
from mlxtune.data.quality import steps_warning, summary
from mlxtune.errors import UsageError
from mlxtune.cpu_quantized import accelerate_quantized, requested_path
from mlxtune.train.validation import validation_loss
from mlxtune.train.loss import Loss, supports_packing
from mlxtune.model_config import DEFAULT_QUANTIZE, model_name, text_config
from mlxtune.models import DEFAULT_BASE_MODEL, load_model, resolve_model
from mlxtune.library import hold_model
from mlxtune.runs import (
    ADAPTER_FILE,
    CONFIG_FILE,
    RUN_FILE,
    STATE_FILE,
    TEMPLATE_FILE,
    default_run_dir,
    read_run_settings,
)
from mlxtune.settings import LoraSettings, save_settings
from mlxtune.storage import check_writable
from mlxtune.train.adapters import attach_adapters, parameter_counts
from mlxtune.train.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
)
from mlxtune.train.parallel import DataParallel, check_resume_ranks
from mlxtune.train.recovery import (
    apply_resume_flags,
    check_resume_state,
    check_settings_unchanged,
    data_fingerprint,
    find_resume_point,
)
from mlxtune.memory.estimate import ModelFacts
from mlxtune.memory.guard import MemoryGuard
from mlxtune.train.engine import Objective, TrainingRun, claim, finish, grad_checkpoint, prepare_backend, train
from mlxtune.memory.planner import DataLengths, MemoryPlan, largest_first, plan_for_run
from mlxtune.train.step import TrainStep, build_optimizer
from mlxtune.ui import TrainingReporter, make_console



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


def total_optimizer_steps(settings: LoraSettings, train, plan: BatchPlan) -> int:
    if settings.iters is not None:
        return settings.iters
    micro_batches = math.ceil(settings.epochs * batches_per_epoch(train, plan, settings.seed))
    return max(1, math.ceil(micro_batches / settings.grad_accumulation))


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
    Memory is planned before the model loads (memory/planner.py): with `choose_sizes` the planner picks the
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
    hold_model(model_path)  # `models rm` refuses it while this run trains
    data_path = resolve_data_path(settings.data)
    if writes:
        run_dir = Path(settings.out) if settings.out else default_run_dir(model_name(model_path))
        claim(run_dir, resume, reporter)  # locked for this process; reusable if nothing was trained
    else:
        run_dir = Path(settings.out)
    settings.model, settings.data, settings.out = str(model_path), str(data_path.resolve()), str(run_dir)

    reporter.start(settings.method, model_path, run_dir)
    memory_plan = plan_for_run(settings, model_path, data_path, choose=choose_sizes and not resume,
                               force=force or resume, console=reporter.console)
    reporter.info(f"loading the model from {model_path} …")  # said before each phase that can take minutes
    model, tokenizer, model_config = load_model(model_path)
    prepare_backend(settings, model, reporter)
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
            check_resume_state(run_dir, resumed, total_steps, data_files, settings)
            start_step = resumed["step"]
            reporter.resumed(point.checkpoint.name, start_step, total_steps)
    parallel.broadcast_weights(model)  # every rank starts from rank 0's weights
    if writes:
        save_settings(settings, run_dir / CONFIG_FILE)
        _write_run_info(run_dir, datasets, model_path, model_config, adapter_config, parallel.size)
    if settings.grad_checkpoint:
        grad_checkpoint(model)
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


class SupervisedObjective(Objective):
    """Cross-entropy on the supervised tokens (SFT: LoRA, DoRA, full): batches of examples, the per-token mean."""

    command = "lora"

    def __init__(self, setup: TrainingSetup):
        self.setup, self.settings, self.datasets = setup, setup.settings, setup.datasets
        self.plan, self.parallel, self.loss = setup.plan, setup.parallel, setup.loss
        self.trainer = TrainStep(setup.model, setup.optimizer, self.settings.grad_clip, setup.loss)

    def batches(self, step: int) -> list:
        accumulation = self.settings.grad_accumulation
        return [training_batch(self.datasets.train, self.plan, self.settings.seed, step * accumulation + k,
                               self.parallel.rank, self.parallel.size) for k in range(accumulation)]

    def gradients(self, micro: list):
        loss_sum, count, grads = self.trainer.accumulate(micro)
        return loss_sum, count, None, grads

    def has_validation(self) -> bool:
        return bool(self.datasets.valid)

    def validate(self) -> dict:
        return {"loss": validation_loss(self.setup.model, self.datasets.valid, self.settings.batch_size,
                                        self.settings.val_batches, self.loss, self.parallel)}

    def rates(self, count: float, seconds: float) -> dict:
        return {"supervised_tokens_per_second": count / seconds, "supervised_tokens": int(count)}

    def shrink(self, guard: MemoryGuard, peak: int | None, step: int) -> dict:
        settings, train = self.settings, self.datasets.train
        event = guard.shrink(settings, self.plan.batch_tokens, max(len(e) for e in train), peak, step)
        self.plan = batch_plan([len(e) for e in train], batch_size=settings.batch_size,
                               batch_tokens=settings.batch_tokens, pack=settings.pack,
                               max_seq_length=settings.max_seq_length, packing_supported=self.plan.pack)[0]
        return event

    def save_settings(self, run_dir: Path) -> None:
        save_settings(self.settings, run_dir / CONFIG_FILE)

    def try_first(self, step: int) -> None:
        """Fail fast: the run's largest micro-batch (`planner.largest_first`), once, before the step, untimed and
        discarded (nothing is updated; dropout is seeded per step afterwards), so a run that would run out of memory
        does so in its first minute rather than when that batch comes up hours in. Skipped when the step is about
        to draw it anyway."""
        settings, setup = self.settings, self.setup
        largest = largest_first(ModelFacts.from_dir(setup.model_path), settings, DataLengths.of(self.datasets),
                                self.plan)
        first = step * settings.grad_accumulation
        if first <= largest < first + settings.grad_accumulation:
            return
        # The optimizer's state (AdamW's two moments, as large as the trainable weights: large for `full`) already
        # exists (the engine makes it before the first step), so it is part of the trial's peak as of every step's.
        self.trainer.accumulate([training_batch(self.datasets.train, self.plan, settings.seed, largest,
                                                self.parallel.rank, self.parallel.size)])


def run_training(setup: TrainingSetup, reporter: TrainingReporter) -> RunResult:
    """SFT as the engine's objective: the run table, the engine's loop, the result and its summary."""
    settings, run_dir, model, datasets = setup.settings, setup.run_dir, setup.model, setup.datasets
    trainable, total = parameter_counts(model)
    reporter.header(settings, data_kind=datasets.kind, train_examples=len(datasets.train),
                    valid_examples=len(datasets.valid), template=datasets.template.name,
                    data_warnings=summary(datasets.warnings)
                    + (" (`mlxtune data check` lists them)" if datasets.warnings else ""),
                    trainable=trainable, total=total, steps=setup.total_steps,
                    quantization=setup.model_config.get("quantization"),
                    loss_mode="selective (supervised positions only)" if setup.loss.selective else "full logits",
                    batching=describe_plan(setup.plan), device=str(mx.default_device()),
                    ranks=setup.parallel.describe() if setup.parallel.distributed else None)
    memory_plan = setup.memory_plan
    if memory_plan is not None:
        reporter.info(f"memory: {memory_plan.verdict()} ({memory_plan.budget_source})")
    run = TrainingRun(run_dir, model, setup.optimizer, setup.adapter_config, settings, setup.total_steps,
              f"{model_name(setup.model_path)} · {run_dir.name}", setup.start_step, setup.resume, setup.resumed,
              setup.data_files, setup.parallel, memory_plan.budget if memory_plan is not None else None)
    progress = train(run, SupervisedObjective(setup), reporter)
    loss = lambda val: None if not val else val["loss"]  # noqa: E731
    result = RunResult(str(run_dir), progress.steps, setup.total_steps, loss(progress.initial_val),
                       loss(progress.final_val), loss(progress.best_val), progress.best_step,
                       loss(progress.final_train), progress.tokens_per_second,
                       progress.window.get("supervised_tokens_per_second"), progress.peak_memory_gb, trainable, total,
                       progress.stopped, list(datasets.notes) + progress.notes,
                       [w.to_dict() for w in datasets.warnings], memory_changes=progress.memory_changes)
    if memory_plan is not None:
        result.memory_estimate_gb = memory_plan.to_dict()["estimate_gb"]
        result.memory_budget_gb = memory_plan.to_dict()["budget_gb"]
    finish(run, result)
    reporter.summary(result, run_dir / ADAPTER_FILE)
    return result


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


def resume_settings(run_dir: str | Path, overrides: dict) -> LoraSettings:
    """Settings of an existing run with `overrides` (None = not given) applied: the CHANGEABLE_ON_RESUME ones are
    taken, any other that differs from the run's own value is refused with a UsageError naming it."""
    config = Path(run_dir) / CONFIG_FILE
    if not config.is_file():
        raise UsageError(f"{run_dir} is not an mlxtune run (no {CONFIG_FILE})", "give the run directory to resume")
    settings = read_run_settings(config)
    apply_resume_flags(settings, overrides, run_dir)
    settings.out = str(run_dir)
    settings = settings.validate()
    latest = latest_checkpoint(Path(run_dir))  # an edited config.yaml is refused now, before any model is loaded
    if latest is not None:
        try:
            state = json.loads((latest / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = None  # a damaged checkpoint: resume skips it (and checks the one it takes)
        if isinstance(state, dict):
            check_settings_unchanged(Path(run_dir), state, settings)
    return settings
