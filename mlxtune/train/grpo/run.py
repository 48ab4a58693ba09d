"""`mlxtune grpo`: GRPO (train/grpo/objective.py) run by the training engine.

The same engine as `mlxtune lora` and `mlxtune dpo` (train/engine.py: checkpoints, exact resume with the data
fingerprint, best/, patience, the NaN guard, signals, the memory guard, metrics.jsonl, loss.png). The run directory
is an ordinary run — config.yaml stays a plain LoRA config, GRPO's own settings go to grpo.yaml — so fuse, export,
chat and eval take it like any other. `--from RUN_DIR` starts from a supervised run merged into its base
(fuse.merge_sft_run), which is also the reference when β > 0.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlxtune.cpu_quantized import requested_path
from mlxtune.data.dataset import resolve_data_path
from mlxtune.data.prompts import PROMPT_KEY, PromptRecord, prompt_ids, read_prompt_splits
from mlxtune.data.template import TemplateChoice, choose_template
from mlxtune.errors import UsageError
from mlxtune.model_config import model_name
from mlxtune.models import load_model
from mlxtune.runs import GRPO_FILE, RUN_FILE, SAMPLES_FILE, TEMPLATE_FILE
from mlxtune.settings import GrpoSettings
from mlxtune.storage import atomic_write_text, check_writable
from mlxtune.train.adapters import parameter_counts
from mlxtune.train.engine import TrainingRun, finish, grad_checkpoint, prepare_backend, train
from mlxtune.train.grpo.losses import GRPOLossConfig, preset
from mlxtune.train.grpo.objective import GrpoLoss, GrpoObjective
from mlxtune.train.grpo.update import GrpoStep
from mlxtune.train.grpo.rewards import check_fields, parse_rewards
from mlxtune.train.parallel import DataParallel, check_resume_ranks
from mlxtune.train.recovery import apply_resume_flags, data_fingerprint
from mlxtune.train.runsetup import (ObjectiveResult, check_from_run, load_split_settings, open_run_dir,
                                    plan_then_adapt, restore, save_split_settings, verdict_or_refusal)
from mlxtune.train.step import build_optimizer
from mlxtune.ui import TrainingReporter, make_console, summary_table

def loss_config(settings: GrpoSettings) -> GRPOLossConfig:
    """The loss's options: the --loss-type preset, with β, the completion length and any ε given."""
    overrides = {"beta": settings.beta, "max_completion_tokens": settings.max_completion_tokens}
    if settings.epsilon_low is not None:
        overrides["epsilon_low"] = settings.epsilon_low
    if settings.epsilon_high is not None:
        overrides["epsilon_high"] = settings.epsilon_high
    return preset(settings.loss_type, **overrides)


def save_grpo_settings(settings: GrpoSettings, run_dir: Path) -> None:
    """config.yaml stays a plain LoRA config (fuse/export/chat read it); GRPO's own settings go to grpo.yaml."""
    save_split_settings(settings, run_dir, GRPO_FILE)


def is_grpo_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / GRPO_FILE).is_file()


def load_grpo_settings(run_dir: str | Path) -> GrpoSettings:
    return load_split_settings(Path(run_dir), GRPO_FILE, GrpoSettings)


def resume_grpo_settings(run_dir: str | Path, overrides: dict) -> GrpoSettings:
    """A GRPO run's settings with `overrides` (flags; None = not given) applied as `mlxtune lora --resume` applies
    them (recovery.apply_resume_flags): the changeable ones taken, any other change refused."""
    run_dir = Path(run_dir)
    if not is_grpo_run(run_dir):
        raise UsageError(f"{run_dir} is not a GRPO run (no {GRPO_FILE})",
                         "resume a LoRA run with mlxtune lora --resume, a DPO run with mlxtune dpo --resume")
    settings = load_grpo_settings(run_dir)
    apply_resume_flags(settings, overrides, run_dir)
    settings.out = str(run_dir)
    return settings.validate()


class GrpoResult(ObjectiveResult):
    """A grpo run's result: its validation metrics are the mean reward on the held-out prompts (fixed-key samples)
    and each reward's mean; its train metrics the last window's rewards, KL, clip fraction, lengths and rates."""


@dataclass
class PromptSets:
    train: list[tuple[PromptRecord, list[int]]]  # each record with its rendered prompt's token ids
    valid: list[tuple[PromptRecord, list[int]]]
    template: TemplateChoice  # the chat template the prompts were rendered with
    notes: list[str]


def tokenize_prompts(records: dict[str, list[PromptRecord]], tokenizer, settings: GrpoSettings,
                     notes: list[str]) -> PromptSets:
    """Each prompt rendered with the chat template; prompts leaving no room for a completion within
    max_seq_length are left out (each counted in a note)."""
    choice = choose_template(tokenizer, "chat", settings.chat_template)
    room = settings.max_seq_length - settings.max_completion_tokens
    if room < 1:
        raise UsageError(f"--max-completion-tokens {settings.max_completion_tokens} leaves no room for a prompt "
                         f"within --max-seq-length {settings.max_seq_length}",
                         "lower --max-completion-tokens or raise --max-seq-length")
    out = {}
    for split in ("train", "valid"):
        pairs = [(r, prompt_ids(r, tokenizer, choice.template)) for r in records.get(split, [])]
        kept = [(r, ids) for r, ids in pairs if len(ids) <= room]
        if len(kept) < len(pairs):
            notes.append(f"{len(pairs) - len(kept)} {split} prompt(s) longer than {room} tokens (max_seq_length − "
                         "max_completion_tokens) left out")
        out[split] = kept
    if not out["train"]:
        raise UsageError("no training prompt fits", "raise --max-seq-length or lower --max-completion-tokens")
    return PromptSets(out["train"], out["valid"], choice, notes)


def held_out_prompt_examples(run_dir: str | Path, tokenizer) -> tuple[list, str]:
    """A GRPO run's held-out prompts (its validation split, else its training prompts) rendered as training renders
    them, every token supervised: the text `fuse` checks the fused model on (a GRPO run has no answers to score).
    Returns (examples, split)."""
    import numpy as np

    from mlxtune.data.template import TokenizedExample

    settings = load_grpo_settings(run_dir)
    records, _ = read_prompt_splits(settings.data, settings.seed, prompt_key=settings.prompt_key or PROMPT_KEY)
    split = "valid" if records.get("valid") else "train"
    template = choose_template(tokenizer, "chat", settings.chat_template).template
    examples = []
    for record in records[split]:
        ids = np.asarray(prompt_ids(record, tokenizer, template)[: settings.max_seq_length], np.int32)
        examples.append(TokenizedExample(ids, np.ones(len(ids), bool), record.source))
    return examples, split


def eos_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _sample_writer(run_dir: Path):
    def write(step: int, samples: list[dict]) -> None:
        with open(run_dir / SAMPLES_FILE, "a", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return write


def _trim_samples(run_dir: Path, step: int) -> None:
    """On resume: samples of steps after the checkpoint are drawn again, so their old lines go."""
    path = run_dir / SAMPLES_FILE
    if path.is_file():
        kept = [line for line in path.read_text("utf-8").splitlines(keepends=True)
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(path, "".join(kept))


def train_grpo(settings: GrpoSettings, *, resume: bool = False, force: bool = False, console=None,
               start_from=None, parallel: DataParallel | None = None) -> GrpoResult:
    """Train adapters with GRPO as `settings` say; with `resume`, continue `settings.out`. Settings the memory
    planner says won't fit are refused before training unless `force`. `start_from(run_dir) -> model path`: what
    makes the starting model for `settings.from_run` (the CLI passes fuse.merge_sft_run). With `parallel`, this
    process is one rank of a data-parallel run (train/distributed.py starts those): each rank rolls out
    --batch-size prompts per micro-batch, and rank 0 alone writes the run directory (samples.jsonl: its share)."""
    reporter = TrainingReporter(console or make_console())
    console = reporter.console
    parallel = parallel or DataParallel()
    writes = parallel.is_main
    settings = copy.deepcopy(settings).validate()
    requested_path()
    if not settings.data:
        raise UsageError("no data given", "pass --data with prompts ({\"prompt\": …, \"answer\": …} per line)")
    check_from_run(settings.from_run, resume, distributed=parallel.distributed, merges=start_from is not None)
    rewards = parse_rewards(settings.reward or [])  # a bad reward spec or file fails before anything loads
    data_path = resolve_data_path(settings.data)
    records, notes = read_prompt_splits(data_path, settings.seed, prompt_key=settings.prompt_key or PROMPT_KEY)
    for split in ("train", "valid"):
        check_fields(rewards, [r.fields for r in records.get(split, [])], [r.source for r in records.get(split, [])])
    if writes:
        check_writable(Path(settings.out or "runs"))
    # the other ranks are given rank 0's run directory (train/distributed.py): they neither create nor claim it
    run_dir, model_path = open_run_dir(settings, resume=resume, reporter=reporter, start_from=start_from,
                                       kind="grpo", writes=writes)
    settings.data = str(data_path.resolve())

    reporter.start("grpo", model_path, run_dir)
    model, tokenizer, model_config = load_model(model_path)
    prepare_backend(settings, model, reporter)
    sets = tokenize_prompts(records, tokenizer, settings, notes)
    for note in sets.notes:
        reporter.note(note)
    memory_plan, adapter_cfg = plan_then_adapt(settings, model, run_dir, lambda: check_grpo_memory(
        settings, model_path, sets, force=force or resume, console=console), reporter, writes=writes)
    total_steps = settings.iters or max(1, math.ceil(settings.epochs * len(sets.train) / (
        settings.batch_size * settings.grad_accumulation * parallel.size)))
    # The schedule counts optimizer updates: μ per step.
    optimizer = build_optimizer(settings, total_steps * settings.updates_per_batch)
    start_step, resumed = 0, None
    data_files = data_fingerprint(data_path)
    if resume:
        check_resume_ranks(run_dir, parallel.size)  # a step's prompts are per rank: the same world resumes it
        start_step, resumed = restore(run_dir, total_steps, model, optimizer, data_files, settings, reporter, "grpo")
        if writes:
            _trim_samples(run_dir, start_step)
    parallel.broadcast_weights(model)  # every rank starts from rank 0's weights
    if writes:
        save_grpo_settings(settings, run_dir)
        info = {"base_model": str(model_path), "model_type": model_config.get("model_type"), "data_kind": "prompts",
                "objective": "grpo", "template_origin": sets.template.origin, "train_examples": len(sets.train),
                "valid_examples": len(sets.valid), "adapter": adapter_cfg, "from_run": settings.from_run,
                "ranks": parallel.size}  # data-parallel ranks: a resume needs as many (the step's prompts are per rank)
        if sets.template.template and sets.template.origin != "model":
            atomic_write_text(run_dir / TEMPLATE_FILE, sets.template.template)
        atomic_write_text(run_dir / RUN_FILE, json.dumps(info, indent=2))

    loss = GrpoLoss(model, loss_config(settings), settings.selective_loss,
                    old_policy=settings.updates_per_batch > 1)
    trainable, total = parameter_counts(model)
    if settings.grad_checkpoint:
        grad_checkpoint(model)
    _print_header(console, settings, sets, trainable, total, total_steps, model_config.get("quantization"),
                  memory_plan, parallel)
    objective = GrpoObjective(model, tokenizer, GrpoStep(model, optimizer, settings.grad_clip, loss), loss,
                              settings, rewards, sets.train, sets.valid, eos_ids(tokenizer),
                              _sample_writer(run_dir) if writes else None, save_grpo_settings, parallel)
    run = TrainingRun(run_dir, model, optimizer, adapter_cfg, settings, total_steps,
                      f"{model_name(model_path)} · {run_dir.name} · GRPO", start_step, resume, resumed, data_files,
                      parallel, memory_budget=memory_plan.budget)
    progress = train(run, objective, reporter)
    result = GrpoResult.of(run_dir, progress, total_steps, memory_plan, trainable, total, sets.notes)
    finish(run, result)
    _print_summary(console, result)
    return result


def check_grpo_memory(settings: GrpoSettings, model_path: Path, sets: PromptSets, *, force: bool, console):
    """The planner's verdict on this run (rollout + update); a refusal with settings that fit unless `force`."""
    from mlxtune.memory.grpo import plan_for_prompts

    plan = plan_for_prompts(settings, model_path, longest_prompt(sets))
    return verdict_or_refusal(plan, force=force, console=console, hint=(
        "use a smaller or 4-bit model, a smaller --group-size or --max-completion-tokens, raise --memory, or --force"))


def longest_prompt(sets: PromptSets) -> int:
    return max(len(ids) for _, ids in sets.train)


def _print_header(console, settings: GrpoSettings, sets: PromptSets, trainable, total, steps, quantization,
                  memory_plan, parallel: DataParallel) -> None:
    method = settings.method if not quantization or settings.method == "full" else f"Q{settings.method.upper()}"
    config = loss_config(settings)
    rows = [
        ("objective", f"{settings.loss_type} ({config.aggregation} mean), ε {config.epsilon_low:g}/"
                      f"{config.epsilon_high:g}, β {settings.beta:g}, μ {settings.updates_per_batch}"),
        ("rewards", ", ".join(settings.reward or [])),
        ("rollouts", f"{settings.batch_size * settings.grad_accumulation * parallel.size} prompts × G "
                     f"{settings.group_size} per step, up to {settings.max_completion_tokens} tokens, "
                     f"temperature {settings.temperature:g}, top-p {settings.top_p:g}"),
        ("adapter", (f"{method} rank {settings.rank} alpha {settings.alpha:g}" if settings.method != "full" else
                     "full") + f" · {trainable:,} of {total:,} parameters trained"),
        ("data", f"prompts: {len(sets.train)} train / {len(sets.valid)} valid"),
        ("template", sets.template.name),
        ("steps", f"{steps} steps × {settings.updates_per_batch} update(s), lr {settings.learning_rate:g} "
                  f"{settings.schedule}"),
        ("memory", f"{memory_plan.verdict()} ({memory_plan.budget_source})"),
        ("device", str(mx.default_device())),
    ]
    if parallel.distributed:
        rows.append(("ranks", parallel.describe()))
    console.print(summary_table("grpo run", rows))


def _shown(values: dict | None, key: str, fmt: str = "{:.3f}") -> str:
    return "—" if not values or values.get(key) is None else fmt.format(values[key])


def _print_summary(console, result: GrpoResult) -> None:
    train, val = result.final_train, _shown
    rows = [
        ("val reward", f"{val(result.initial_val, 'reward')} → {val(result.final_val, 'reward')} "
                       f"(best step {result.best_step}; {result.steps}/{result.total_steps} steps, {result.stopped})"),
        ("train", f"reward {val(train, 'reward')} ± {val(train, 'reward_std')} · kl {val(train, 'kl')} · "
                  f"clipped {val(train, 'clip_fraction')} · length {val(train, 'completion_length', '{:.1f}')}"),
        ("speed", f"rollout {val(train, 'rollout_tokens_per_second', '{:.0f}')} tok/s · update "
                  f"{val(train, 'update_tokens_per_second', '{:.0f}')} tok/s · peak memory "
                  f"{result.peak_memory_gb or 0:.2f} GB"),
        ("adapter", f"{result.run_dir}/adapters.safetensors"),
    ]
    console.print(summary_table("result", rows))
