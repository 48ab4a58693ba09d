"""Memory planning for a run: will these settings fit the budget, and which do.

The estimate itself (`memory/estimate.py`) works from shapes; this module turns a dataset and settings into those
shapes (the batches the run will really draw) and searches for settings that fit. The run's guard is
`memory/guard.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from mlxtune.data.batching import PAD_MULTIPLE, batch_plan, evaluation_batches, padded_positions, plan_epoch
from mlxtune.memory.budget import GB, fmt_gb, memory_budget
from mlxtune.memory.estimate import BatchShape, Estimate, ModelFacts, RunShape, estimate
from mlxtune.memory.limits import cpu_loss_streams
from mlxtune.settings import UPPER_BOUNDS, LoraSettings

# Settings that size a batch: when the user gave none of them, the planner chooses.
SIZING_KEYS = ("batch_size", "batch_tokens", "pack", "max_seq_length", "grad_accumulation", "grad_checkpoint")
MIN_SEQ_LENGTH = 256


def on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def loss_stream_count() -> int:
    """As many as mlxtune.train.loss.loss_streams() uses, without creating them."""
    return cpu_loss_streams() if on_cpu() else 1


def dequantize_path(facts: ModelFacts, cpu: bool, bits: int | None = None, budget: int | None = None) -> str:
    """How the run's quantized base will compute (`off` for an unquantized one): the run's own decision
    (`cpu_quantized.choose_path`, by the float copies' size against `budget`; None: this machine's)."""
    from mlxtune.cpu_quantized import choose_path

    if not (facts.bits or bits):
        return "off"
    return choose_path(facts.dequantized_bytes(bits), budget, on_cpu=cpu)


def run_shape(settings: LoraSettings, cpu: bool | None = None, bits: int | None = None, *,
              facts: ModelFacts | None = None, budget: int | None = None) -> RunShape:
    """The settings as the estimate sees them; with `facts`, how a quantized base computes under `budget`."""
    cpu = on_cpu() if cpu is None else cpu
    return RunShape(dequantize="off" if facts is None else dequantize_path(facts, cpu, bits, budget),
                    method=settings.method, rank=settings.rank, layers=settings.layers,
                    target_modules=settings.target_modules, grad_checkpoint=settings.grad_checkpoint,
                    selective_loss=settings.selective_loss, grad_accumulation=settings.grad_accumulation,
                    on_cpu=cpu, streams=loss_stream_count() if cpu else 1, bits=bits,
                    # the training loss makes a frozen head's gradient chunk by chunk (train/loss.py); no run
                    # method trains the head
                    fused_head=settings.selective_loss)


def _shape_of(rows: list[list[int]], lengths: list[int], supervised: list[int], packed: bool) -> BatchShape:
    used = [sum(lengths[i] - 1 for i in row) for row in rows]
    length = PAD_MULTIPLE * math.ceil(max(used) / PAD_MULTIPLE)
    positions = sum(supervised[i] for row in rows for i in row)
    return BatchShape(len(rows), length, padded_positions(positions, len(rows) * length), packed)


def batch_shapes(lengths: list[int], supervised: list[int], plan, seed: int = 0,
                 limit: int | None = None) -> list[BatchShape]:
    """The distinct micro-batch shapes of the run's first epoch (or of its first `limit` batches)."""
    batches = plan_epoch_from_lengths(lengths, plan, seed)
    if limit is not None:
        batches = (batches * (1 + limit // max(len(batches), 1)))[:limit]
    return sorted({_shape_of(rows, lengths, supervised, plan.pack) for rows in batches},
                  key=lambda s: (s.rows * s.length, s.length))


def plan_epoch_from_lengths(lengths: list[int], plan, seed: int):
    class _Sized:  # plan_epoch only asks each example for its length
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    return plan_epoch([_Sized(n) for n in lengths], plan, seed, 0)


def largest_first(facts: ModelFacts, settings: LoraSettings, data: "DataLengths", plan) -> int:
    """The index, in the first epoch, of the micro-batch with the largest estimated peak: the loop tries it before
    its first step, so a run that will run out of memory does so in its first minute, not hours in."""
    shapes = [_shape_of(rows, data.lengths, data.supervised, plan.pack)
              for rows in plan_epoch_from_lengths(data.lengths, plan, settings.seed)]
    run = run_shape(settings, facts=facts)
    peaks = {shape: estimate(facts, run, [shape]).total for shape in set(shapes)}
    return max(range(len(shapes)), key=lambda i: peaks[shapes[i]])


def eval_shapes(valid, batch_size: int, val_batches: int) -> list[BatchShape]:
    return sorted({BatchShape(*b.inputs.shape, len(b.positions)) for b in evaluation_batches(valid, batch_size,
                                                                                              val_batches)},
                  key=lambda s: (s.rows * s.length, s.length))


@dataclass
class DataLengths:
    """Token counts of a tokenized dataset: all the planner needs to know about it."""

    lengths: list[int]
    supervised: list[int]
    valid: list = field(default_factory=list)  # validation examples (evaluation batches are built from them)

    @classmethod
    def of(cls, datasets) -> "DataLengths":
        return cls([len(e) for e in datasets.train], [int(sum(e.supervised[1:])) for e in datasets.train],
                   list(datasets.valid))

    def truncated(self, max_seq_length: int) -> "DataLengths":
        return DataLengths([min(n, max_seq_length) for n in self.lengths],
                           [min(s, max_seq_length - 1) for s in self.supervised],
                           [e for e in self.valid])


def estimate_settings(facts: ModelFacts, settings: LoraSettings, data: DataLengths, *, cpu: bool | None = None,
                      bits: int | None = None, limit: int | None = None, packing_supported: bool = True,
                      with_eval: bool = True, budget: int | None = None) -> Estimate:
    """Peak bytes of training `settings` on `data` (the first `limit` batches, default: a whole epoch) under
    `budget` (which decides how a quantized base computes on the CPU backend; None: this machine's)."""
    lengths = data.lengths if settings.max_seq_length >= max(data.lengths) else data.truncated(
        settings.max_seq_length).lengths
    plan, _ = batch_plan(lengths, batch_size=settings.batch_size, batch_tokens=settings.batch_tokens,
                         pack=settings.pack, max_seq_length=settings.max_seq_length,
                         packing_supported=packing_supported)
    shapes = batch_shapes(lengths, data.supervised, plan, settings.seed, limit)
    evals = eval_shapes(data.valid, settings.batch_size, settings.val_batches) if with_eval and data.valid else []
    return estimate(facts, run_shape(settings, cpu, bits, facts=facts, budget=budget), shapes, evals)


@dataclass
class MemoryPlan:
    """The verdict for a run: estimate vs budget, and (when it doesn't fit) settings that do, with reasons."""

    fits: bool
    estimate: Estimate
    budget: int
    budget_source: str
    suggested: dict = field(default_factory=dict)  # flag (settings key) → value
    reasons: list[str] = field(default_factory=list)
    suggested_estimate: Estimate | None = None
    suggested_fits: bool = False

    def to_dict(self) -> dict:
        return {
            "fits": self.fits,
            "estimate_gb": round(self.estimate.total / GB, 3),
            "budget_gb": round(self.budget / GB, 3),
            "budget_source": self.budget_source,
            "suggested": self.suggested,
            "reasons": self.reasons,
            "suggested_estimate_gb": (round(self.suggested_estimate.total / GB, 3)
                                      if self.suggested_estimate else None),
            "suggested_fits": self.suggested_fits,
            "parts_gb": self.estimate.to_dict()["parts_gb"],
        }

    def flags(self) -> str:
        """The suggestion as command-line flags."""
        words = []
        for key, value in self.suggested.items():
            if key == "quantize":
                continue
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                words.append(flag if value else "--no-" + key.replace("_", "-"))
            else:
                words.append(f"{flag} {value}")
        return " ".join(words)

    def verdict(self) -> str:
        share = 100 * self.estimate.total / max(self.budget, 1)
        return (f"estimated peak {fmt_gb(self.estimate.total)} of a {fmt_gb(self.budget)} budget ({share:.0f}%) — "
                + ("fits" if self.fits else "does not fit"))


def _fits(value: Estimate, budget: int) -> bool:
    return value.total <= budget


def plan_memory(facts: ModelFacts, settings: LoraSettings, data: DataLengths, budget: int, budget_source: str,
                *, cpu: bool | None = None, packing_supported: bool = True) -> MemoryPlan:
    """Estimate `settings`; when they don't fit, change them, cheapest change for quality first, until they do."""
    current = estimate_settings(facts, settings, data, cpu=cpu, packing_supported=packing_supported,
                                budget=budget)
    result = MemoryPlan(_fits(current, budget), current, budget, budget_source)
    if result.fits:
        return result

    trial = replace(settings)
    suggested, reasons = {}, []

    def attempt(bits=None):
        return estimate_settings(facts, trial, data, cpu=cpu, bits=bits, packing_supported=packing_supported,
                                 budget=budget)

    best = current
    # 1. Gradient checkpointing: the same training, slower (each block's forward pass runs twice).
    if not trial.grad_checkpoint:
        trial.grad_checkpoint = True
        best = attempt()
        suggested["grad_checkpoint"] = True
        reasons.append(f"--grad-checkpoint: recompute activations in the backward pass, same results, ~30% slower "
                       f"({fmt_gb(best.total)})")
    # 2. Smaller micro-batches, more of them per step: the same tokens per optimizer step.
    if not _fits(best, budget):
        best = _shrink_batches(trial, attempt, budget, suggested, reasons, data) or best
    # 3. Shorter sequences: long examples are truncated (less context trained on).
    while not _fits(best, budget) and trial.max_seq_length > MIN_SEQ_LENGTH and max(data.lengths) > MIN_SEQ_LENGTH:
        trial.max_seq_length = max(MIN_SEQ_LENGTH, min(trial.max_seq_length, max(data.lengths)) // 2)
        best = attempt()
        suggested["max_seq_length"] = trial.max_seq_length
        shrunk = _shrink_batches(trial, attempt, budget, suggested, [], data)
        best = shrunk or best
    if "max_seq_length" in suggested:
        reasons.append(f"--max-seq-length {trial.max_seq_length}: longer examples are truncated "
                       f"({fmt_gb(best.total)})")
    # 4. Fewer adapted blocks (the lower ones stay frozen: less to learn with, much less to keep).
    while not _fits(best, budget) and trial.method != "full" and (trial.layers or facts.layers) > 1:
        trial.layers = max(1, (trial.layers or facts.layers) // 2)
        best = attempt()
        suggested["layers"] = trial.layers
    if "layers" in suggested:
        reasons.append(f"--layers {trial.layers}: adapt only the top {trial.layers} blocks ({fmt_gb(best.total)})")
    # 5. A quantized base (QLoRA): weights in 4 bits.
    if not _fits(best, budget) and not facts.bits:
        best = attempt(bits=4)
        suggested["quantize"] = 4
        reasons.append(f"a 4-bit base (`mlxtune pull MODEL --quantize 4`), trained as QLoRA ({fmt_gb(best.total)})")
    result.suggested, result.reasons = suggested, reasons
    result.suggested_estimate, result.suggested_fits = best, _fits(best, budget)
    return result


def default_batch_tokens(settings: LoraSettings, lengths: list[int]) -> int:
    """The token budget the batch plan uses when --batch-tokens isn't given."""
    plan, _ = batch_plan(lengths, batch_size=settings.batch_size, batch_tokens=settings.batch_tokens, pack=None,
                         max_seq_length=settings.max_seq_length, packing_supported=True)
    return plan.batch_tokens


def _shrink_batches(trial: LoraSettings, attempt, budget: int, suggested: dict, reasons: list,
                    data: DataLengths) -> Estimate | None:
    """The largest micro-batch that fits (token budget, or examples when batches are fixed), accumulation raised
    to keep the tokens per optimizer step. Returns the new estimate, or None when nothing smaller fits either."""
    fixed = trial.pack is False and not trial.batch_tokens
    original = replace(trial)
    if fixed:
        sizes = [s for s in range(trial.batch_size - 1, 0, -1)]
    else:
        start = trial.batch_tokens or default_batch_tokens(trial, data.lengths)
        # A micro-batch holds at least one whole example: the longest (after truncation), padded.
        smallest = PAD_MULTIPLE * math.ceil((min(max(data.lengths), trial.max_seq_length) - 1) / PAD_MULTIPLE)
        sizes = []
        size = start
        while size > smallest:
            size = max(smallest, (size // 2) // PAD_MULTIPLE * PAD_MULTIPLE)
            sizes.append(size)
    found = None
    for size in sizes:
        if fixed:
            trial.batch_size = size
            factor = math.ceil(original.batch_size / size)
        else:
            trial.batch_tokens = size
            factor = math.ceil((original.batch_tokens or start) / size)
            # validation batches hold `batch_size` examples whatever the token budget: they shrink alike (with
            # the fused loss a validation batch can be the run's peak)
            trial.batch_size = max(1, original.batch_size // factor)
        # Bounded like the flag (a 4-billion-step accumulation never finishes a step): fewer tokens per step then.
        trial.grad_accumulation = min(original.grad_accumulation * factor, UPPER_BOUNDS["grad_accumulation"])
        value = attempt()
        found = value
        if value.total <= budget:
            break
    if found is None:
        return None
    key = "batch_size" if fixed else "batch_tokens"
    suggested[key] = getattr(trial, key)
    extra = ""
    if not fixed and trial.batch_size != original.batch_size:
        suggested["batch_size"] = trial.batch_size
        extra = f" --batch-size {trial.batch_size}"
    suggested["grad_accumulation"] = trial.grad_accumulation
    reasons.append(f"--{key.replace('_', '-')} {getattr(trial, key)}{extra} --grad-accumulation "
                   f"{trial.grad_accumulation}: smaller micro-batches, the same tokens per optimizer step "
                   f"({fmt_gb(found.total)})")
    return found


def apply_suggestions(settings: LoraSettings, suggested: dict) -> None:
    for key, value in suggested.items():
        if key != "quantize":
            setattr(settings, key, value)


# ------------------------------------------------------------------------------------------- before a run


def plan_for_data(settings: LoraSettings, model_path, data_path) -> MemoryPlan:
    """Tokenize the data with the model's tokenizer (no weights loaded) and plan `settings` against the budget."""
    from mlx_lm.utils import load_tokenizer

    from mlxtune.data.dataset import load_datasets

    budget, source = memory_budget(settings.memory)
    datasets = load_datasets(data_path, load_tokenizer(model_path), **settings.dataset_options())
    return plan_memory(ModelFacts.from_dir(model_path), settings, DataLengths.of(datasets), budget, source)


def plan_for_run(settings: LoraSettings, model_path, data_path, *, choose: bool, force: bool, console) -> MemoryPlan:
    """The plan `finetune` starts from: chosen settings applied (`choose`), or a refusal before any weight loads."""
    plan = plan_for_data(settings, model_path, data_path)
    if plan.fits:
        return plan
    if choose and plan.suggested_fits and "quantize" not in plan.suggested:
        apply_suggestions(settings, plan.suggested)
        console.print(f"memory: the default settings need {fmt_gb(plan.estimate.total)}, more than the "
                      f"{fmt_gb(plan.budget)} budget ({plan.budget_source}); planned instead:")
        for reason in plan.reasons:
            console.print(f"  {reason}")
        chosen = MemoryPlan(True, plan.suggested_estimate, plan.budget, plan.budget_source, plan.suggested,
                            plan.reasons, plan.suggested_estimate, True)
        return chosen
    if force:
        console.print(f"[yellow]warning:[/] {plan.verdict()}; --force: trying anyway (the memory guard shrinks "
                      f"the batches if the run overshoots)")
        return plan
    if plan.suggested_fits and "quantize" not in plan.suggested:
        hint = f"use {plan.flags()} (`mlxtune plan` explains), or --force to try anyway"
    elif "quantize" in plan.suggested:
        hint = (f"even {plan.flags() or 'the smallest settings'} won't do on these weights: use a 4-bit base "
                f"(`mlxtune pull MODEL --quantize 4`), raise --memory, or --force")
    else:
        hint = "raise --memory or use a smaller model; --force to try anyway"
    raise over_budget(plan, hint)


def over_budget(plan: MemoryPlan, hint: str):
    """The refusal of settings that won't fit (lora's and the preference runs' alike)."""
    from mlxtune.errors import UsageError

    return UsageError(f"these settings need an estimated {fmt_gb(plan.estimate.total)}, more than the "
                      f"{fmt_gb(plan.budget)} memory budget ({plan.budget_source})", hint)


def sizes_given(config_path, flags: dict) -> bool:
    """True when the user set any batch/length setting (a flag, or a key of the --config file)."""
    from mlxtune.settings import read_yaml_config

    if any(flags.get(key) is not None for key in SIZING_KEYS):
        return True
    return bool(config_path) and any(key in read_yaml_config(config_path) for key in SIZING_KEYS)
