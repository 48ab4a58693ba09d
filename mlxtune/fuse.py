"""Merge a run's adapter into its base model and prove the written model still carries the finetune.

The merge happens at full precision: a quantized base is dequantized first (re-quantizing `W + BA` with the base's
own grid is what rounds small adapters away in other tools). Three comparisons on held-out text from the run:

- the merge: the merged model, still in float32, against base + adapter — only float32 arithmetic separates them, so
  a tight bound catches a merge that is wrong anywhere (one layer's adapter left out, a wrong scale);
- the file: the written model, reloaded from disk, against the merged model as written (rounded to the base's own
  float16/bfloat16, or re-quantized) — the same numbers, so a bad save or config shows;
- what the finetune kept: the written model against base + adapter — log-probabilities, KL, and the validation loss
  exactly as training measured it (same examples, same batches), so the numbers match the run's. Rounding fused
  weights to float16 moves log-probabilities by up to ~0.1 over a large vocabulary and 30 layers (legitimately: the
  base itself carries that rounding), so this one is reported, not bounded; a re-quantized fuse reports how much of
  the finetune's loss gain survived.
An unquantized fuse that fails a check is not written."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxtune.cpu_quantized import match_dtype
from mlxtune.data.dataset import load_datasets
from mlxtune.errors import RunFailed, UsageError
from mlxtune.train.validation import validation_loss
from mlxtune.library import base_source, models_in_use
from mlxtune.faults import fault_point
from mlxtune.model_config import (DEFAULT_GROUP_SIZE, check_quantization, config_dtype, directory_size, read_config,
                                  weight_bytes, without_quantization)
from mlxtune.models import floating_parameters, load_model
from mlxtune.train.loss import Loss
from mlxtune.runs import (FUSE_REPORT_FILE, MERGED_BASE, METRICS_FILE, TEMPLATE_FILE, Run, check_output,
                          open_for_inference, open_run)
from mlxtune.train.metrics import read_metrics
from mlxtune.storage import (atomic_write_text, check_free_space, check_writable, clean_stale, staging_path, swap_in,
                             translate)
from mlxtune.ui import GB, quiet_stdout

CHECK_EXAMPLES = 16
CHECK_LENGTH = 256
SURVIVAL_WARNING = 0.9
FLOAT32_CHECK_BYTES = 6 * GB  # a float32 copy this big still fits beside the model on a 16 GB Mac
# Max |log-prob difference| the merge and file checks allow. Compared in float32, only float32 arithmetic separates
# the merged model from base + adapter (W·x + B·A·x against (W + B·A)·x: 9.5e-5 measured on SmolLM2-135M, 30 layers
# and log-probabilities down to about -30; a stories260K run ~1e-6) and the reloaded file from the model as written
# (0 measured). Leaving out one layer's adapter moves them by far more. Models too large for a float32 copy are
# compared in their own precision, where activations round too.
TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1}
# Every file a tokenizer may be read from: transformers' fast tokenizer re-saves only tokenizer.json and its config,
# but llama.cpp's converters, slow tokenizers and our GGUF writer read the SentencePiece model or vocab/merges files.
# (Chat templates are not carried: the run's own template is written separately.)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt",
                   "vocab.txt", "tokenizer.tiktoken", "qwen.tiktoken")


@dataclass
class FuseResult:
    out: str
    quantization: dict | None
    max_abs_diff: float  # written model vs base + adapter log-probabilities (float32 computation): reported
    mean_kl: float  # KL(base+adapter || written model), nats per token
    tolerance: float  # the bound the merge check (and, unquantized, the file check) must meet
    checked_tokens: int
    loss_base: float  # the run's loss definition (split, batches, val_batches subset): base = the run's starting loss
    loss_adapter: float  # = the run's validation loss at the fused checkpoint
    loss_fused: float
    survival: float | None  # share of the finetune's loss gain the fused model keeps
    loss_split: str = "valid"  # the data the losses are on: "train" without a validation set, "chosen" for dpo/orpo
    loss_examples: int = 0  # how many examples those losses average over
    merge_diff: float = 0.0  # merged model (float32, before rounding or quantizing) vs base + adapter: bounded
    file_diff: float | None = None  # reloaded file vs the merged model as written: bounded; None when re-quantized
    stored_dtype: str = "float32"  # the precision the fused weights are written in
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def survival_ratio(loss_base: float, loss_adapter: float, loss_fused: float) -> float | None:
    """(loss_base - loss_fused) / (loss_base - loss_adapter); None when the finetune gained nothing to keep."""
    gain = loss_base - loss_adapter
    if not math.isfinite(gain) or gain <= 0:
        return None
    return (loss_base - loss_fused) / gain


def survival_warning(survival: float | None, quantize: str) -> str | None:
    """What to tell the user when re-quantization rounded away too much of the finetune."""
    if quantize == "none" or survival is None or survival >= SURVIVAL_WARNING:
        return None
    better = "--quantize none" if quantize == "8" else "--quantize 8 or --quantize none"
    return (f"only {100 * survival:.0f}% of the finetune's loss gain survives {quantize}-bit quantization "
            f"(below {100 * SURVIVAL_WARNING:.0f}%); use {better}, or a smaller --group-size")


@dataclass
class _HeldOut:
    loss_examples: list  # what training evaluated (its validation set, or its training data without one)
    split: str
    batch_size: int
    max_batches: int
    selective: bool

    def loss(self, model) -> float:
        """The validation loss as the training loop computes it: same examples, batches and subset."""
        return validation_loss(model, self.loss_examples, self.batch_size, self.max_batches,
                               Loss(model, self.selective))

    @property
    def examples(self) -> int:
        limited = self.max_batches != -1 and self.max_batches * self.batch_size < len(self.loss_examples)
        return self.max_batches * self.batch_size if limited else len(self.loss_examples)

    def check_examples(self):
        """The first few examples, cut to check length, for the log-probability comparison."""
        from mlxtune.data.template import TokenizedExample

        return [TokenizedExample(e.ids[:CHECK_LENGTH], e.supervised[:CHECK_LENGTH], e.source)
                for e in self.loss_examples[:CHECK_EXAMPLES]]


def _held_out(run: Run, tokenizer) -> _HeldOut:
    """The run's own validation data (training data if it had none), with the run's evaluation settings."""
    s = run.settings
    if run.info.get("objective") in ("dpo", "orpo"):  # a preference run: its pairs' chosen answers
        from mlxtune.data.preference import chosen_examples

        examples = chosen_examples(s.data, tokenizer, s.chat_template, s.seed)
        return _HeldOut(examples, "chosen", s.batch_size, s.val_batches, s.selective_loss)
    if run.info.get("objective") == "grpo":  # a GRPO run has no answers: its held-out prompts' text
        from mlxtune.train.grpo.run import held_out_prompt_examples

        examples, _ = held_out_prompt_examples(run.path, tokenizer)
        return _HeldOut(examples, "prompts", s.batch_size, s.val_batches, s.selective_loss)
    datasets = load_datasets(s.data, tokenizer, **s.dataset_options())
    split = "valid" if datasets.valid else "train"
    return _HeldOut(datasets.valid or datasets.train, split, s.batch_size, s.val_batches, s.selective_loss)


def _cast_floating(model, dtype) -> None:
    model.update(tree_unflatten([(k, v.astype(dtype)) for k, v in tree_flatten(model.parameters())
                                 if mx.issubdtype(v.dtype, mx.floating)]))
    match_dtype(model)  # the CPU backend's float copies of quantized weights follow (mlxtune/cpu_quantized.py)


def _as_float32(model) -> None:
    """Compare in float32 so the check measures the fused weights, not half-precision rounding of activations.

    Models too big to hold in float32 (over FLOAT32_CHECK_BYTES) are compared in their own precision instead."""
    if _float32_bytes(model) <= FLOAT32_CHECK_BYTES:
        _cast_floating(model, mx.float32)


def _float32_bytes(model) -> int:
    return sum(v.size * 4 for v in floating_parameters(model))


def _floating_dtypes(model) -> set:
    return {v.dtype for v in floating_parameters(model)}


def _tolerance(compared_dtypes: set) -> float:
    """The bound of the merge and file checks, by the precision the comparison computes in."""
    if compared_dtypes <= {mx.float32}:
        return TOLERANCE["float32"]
    return TOLERANCE["bfloat16" if mx.bfloat16 in compared_dtypes else "float16"]


def _max_diff(actual: list[mx.array], expected: list[mx.array]) -> float:
    return max(mx.abs(a - e).max().item() for a, e in zip(actual, expected))


def merge_adapters(model) -> None:
    """Merge every adapter of `model` into its layer, at the model's precision (a quantized base dequantized)."""
    from mlx_lm.utils import dequantize_model

    fused = [(name, module.fuse(dequantize=True)) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if _is_quantized(model):  # embeddings, heads and unadapted layers of a QLoRA base
        dequantize_model(model)


def check_merge(model, examples, expected: list[mx.array]) -> tuple[float, list[mx.array]]:
    """The merged `model` against base + adapter's log-probabilities `expected`: (the max difference, within the
    bound of the precision it computes in, or RunFailed; the merged model's log-probabilities)."""
    merged = _log_probs(model, examples)
    diff = _max_diff(merged, expected)
    tolerance = _tolerance(_floating_dtypes(model))
    if not diff <= tolerance:
        raise RunFailed(f"the merged model's log-probabilities differ from base+adapter by {diff:.2e} "
                        f"(> {tolerance:g}) before it was written; nothing written",
                        "report this with the run directory; the adapter itself is unaffected")
    return diff, merged


def _stored_dtype(model):
    """The floating dtype the base keeps its weights (or its quantization scales) in."""
    for name, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating) and "lora_" not in name and not name.endswith(".m"):
            return value.dtype
    return mx.float32


def _log_probs(model, examples) -> list[mx.array]:
    out = []
    for example in examples:
        logits = model(mx.array(example.ids)[None])[0].astype(mx.float32)
        out.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        mx.eval(out[-1])
    return out


def _is_quantized(model) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def fuse_run(run_dir: str | Path, out: str | Path, checkpoint: str = "last", quantize: str = "none",
             group_size: int | None = None, overwrite: bool = False) -> FuseResult:
    """Write `out`, a standalone MLX model = base + adapter (optionally re-quantized), verified against the run."""
    from mlx_lm.utils import quantize_model, save

    run = open_run(run_dir)
    base_quantization = read_config(run.base_model).get("quantization") or {}
    group_size = group_size or base_quantization.get("group_size") or DEFAULT_GROUP_SIZE
    quantize = check_quantization(quantize, group_size)  # before any model is loaded
    out = Path(out)
    check_output(out, run=run.path, base_model=run.base_model, library_entries=models_in_use())
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UsageError(f"output directory {out} already exists", "choose another --out or pass --overwrite")
    run.adapter_dir(checkpoint)  # an unknown checkpoint fails before any model is loaded
    check_writable(out.parent)  # a read-only or unwritable --out, before any model is loaded
    clean_stale(out)  # hidden copies that killed fuses of this --out left behind
    need = fused_bytes(run.base_model, quantize)
    check_free_space(out, need, "the fused model")

    base = open_for_inference(run.path, checkpoint, adapter=False)
    held_out = _held_out(run, base.tokenizer)
    examples = held_out.check_examples()
    _as_float32(base.model)
    loss_base = held_out.loss(base.model)
    del base

    tuned = open_for_inference(run.path, checkpoint)
    model, tokenizer, config = tuned.model, tuned.tokenizer, tuned.config
    del tuned
    stored_dtype = _stored_dtype(model)
    # Reference: base + adapter as training saw it, evaluated in float32 (the merge below then also runs in float32).
    _as_float32(model)
    expected = _log_probs(model, examples)
    loss_adapter = held_out.loss(model)

    merge_adapters(model)
    merge_diff, written = check_merge(model, examples, expected)
    compared = _floating_dtypes(model)
    tolerance = _tolerance(compared)
    _cast_floating(model, stored_dtype)  # the base's own precision (float16 stays float16)
    if quantize != "none":
        written = None  # re-quantized: what survives is measured against base + adapter instead
    elif _floating_dtypes(model) != compared:  # rounded to float16/bfloat16: computed again as the reload will be
        _cast_floating(model, mx.float32)  # (exact: every float16/bfloat16 value is a float32 value)
        written = _log_probs(model, examples)
        _cast_floating(model, stored_dtype)
    config = without_quantization(config)
    if quantize != "none":
        with quiet_stdout():
            model, config = quantize_model(model, config, group_size, int(quantize))
    if run.chat_template:  # keep the fallback/file template so inference renders prompts as training did
        # mlx-lm's TokenizerWrapper has no public setter; its private `_tokenizer` is the Hugging Face tokenizer that
        # `save` writes out (tests/test_mlx_lm_private.py fails clearly if an upgrade renames it).
        tokenizer._tokenizer.chat_template = run.chat_template

    staging = staging_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save(staging, run.base_model, model, tokenizer, config, donate_model=False)
        carry_tokenizer_files(Path(run.base_model), staging)
        fault_point("fuse.saved")
        del model
        reloaded, _, _ = load_model(staging)
        reloaded.eval()
        _as_float32(reloaded)
        actual = _log_probs(reloaded, examples)
        loss_fused = held_out.loss(reloaded)
        kl = mx.concatenate([(mx.exp(e) * (e - a)).sum(-1) for a, e in zip(actual, expected)]).mean().item()
        quantization = {"bits": int(quantize), "group_size": group_size} if quantize != "none" else None
        result = FuseResult(
            out=str(out), quantization=quantization, max_abs_diff=_max_diff(actual, expected), mean_kl=max(kl, 0.0),
            tolerance=tolerance, checked_tokens=sum(len(e) for e in examples), loss_base=loss_base,
            loss_adapter=loss_adapter, loss_fused=loss_fused,
            survival=survival_ratio(loss_base, loss_adapter, loss_fused), loss_split=held_out.split,
            loss_examples=held_out.examples, merge_diff=merge_diff,
            file_diff=None if written is None else _max_diff(actual, written),
            stored_dtype=str(stored_dtype).removeprefix("mlx.core."),
        )
        if result.file_diff is not None and not result.file_diff <= tolerance:
            raise RunFailed(
                f"the fused model read back from disk differs from the model written by {result.file_diff:.2e} "
                f"(> {tolerance:g}); nothing written",
                "report this with the run directory; the adapter itself is unaffected",
            )
        warning = survival_warning(result.survival, quantize)
        if warning:
            result.warnings.append(warning)
        _write_extras(staging, run, checkpoint, result)
        swap_in(staging, out)  # an old --out (--overwrite) is removed only once the new one is in place
    except (OSError, RuntimeError) as exc:
        error = translate(exc, out, need)  # disk full, read-only: one line that says where and how much
        if error is None:
            raise
        raise error from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def carry_tokenizer_files(base: Path, out: Path) -> list[str]:
    """Copy the base's tokenizer files that `out` lacks (never overwriting what was saved there); their names."""
    carried = []
    for name in TOKENIZER_FILES:
        if (base / name).is_file() and not (out / name).exists():
            shutil.copy(base / name, out / name)
            carried.append(name)
    return carried


def fused_bytes(base: Path, quantize: str) -> int:
    """About how much disk the fused model takes: the base's weights at full precision (or re-quantized)."""
    config = read_config(base)
    bits = 32 if config_dtype(config) == "float32" else 16
    stored = (config.get("quantization") or {}).get("bits") or bits
    full = weight_bytes(base) * bits / stored
    weights = full if quantize == "none" else full * int(quantize) / bits
    return int(weights + directory_size(base) - weight_bytes(base))


def _final_losses(run: Run) -> dict:
    losses = {}
    for record in read_metrics(run.path / METRICS_FILE):
        for key in ("train_loss", "val_loss"):
            if record.get(key) is not None:
                losses[key] = record[key]
    return losses


def _write_extras(out: Path, run: Run, checkpoint: str, result: FuseResult) -> None:
    """What inference needs beyond weights: the template training used, and a model card with the facts."""
    if run.chat_template:
        atomic_write_text(out / TEMPLATE_FILE, run.chat_template)
    atomic_write_text(out / FUSE_REPORT_FILE, json.dumps({"run": str(run.path), "checkpoint": checkpoint,
                                                          "data_kind": run.data_kind, **result.to_dict()},
                                                         indent=2) + "\n")
    atomic_write_text(out / "README.md", model_card(run, checkpoint, result))


def loss_label(result: FuseResult) -> str:
    """What the fuse's losses are: the run's own validation measure, so they match its summary."""
    if result.loss_split == "valid":
        return f"Validation loss as training measures it ({result.loss_examples} validation examples):"
    if result.loss_split == "chosen":
        return (f"Loss on the chosen answers of {result.loss_examples} preference pairs (a preference run's own "
                "validation measure is its preference loss):")
    if result.loss_split == "prompts":
        return (f"Loss on the text of {result.loss_examples} held-out prompts (a GRPO run's own validation measure is "
                "its mean reward):")
    return f"Training-data loss ({result.loss_examples} examples; the run had no validation set):"


def model_card(run: Run, checkpoint: str, result: FuseResult) -> str:
    s = run.settings
    info = run.info
    losses = _final_losses(run)
    source = base_source(run.base_model)
    quant = (f"{result.quantization['bits']}-bit, group size {result.quantization['group_size']}"
             if result.quantization else "none (full precision)")
    survival = "—" if result.survival is None else f"{100 * result.survival:.1f}%"
    method = s.method if s.method == "full" else f"{s.method} rank {s.rank}, alpha {s.alpha:g} (scale {s.scale:g})"
    lines = [
        "---",
        "library_name: mlx",
        "tags: [mlx, mlxtune, fine-tuned]",
        f"base_model: {source}",
        "---",
        "",
        f"# {Path(result.out).name}",
        "",
        f"Finetuned with mlxtune from `{source}` and fused "
        f"({datetime.now(timezone.utc):%Y-%m-%d}).",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {method} |",
        f"| data | {info.get('data_kind')}: {info.get('train_examples')} train / {info.get('valid_examples')} valid "
        f"examples from `{Path(s.data).name}` |",
        f"| chat template | {info.get('template_origin')} |",
        f"| learning rate | {s.learning_rate:g} ({s.schedule}) |",
        f"| batch size | {s.batch_size} × {s.grad_accumulation} accumulation |",
        f"| max sequence length | {s.max_seq_length} |",
        f"| checkpoint fused | {checkpoint} |",
        f"| final train loss | {losses.get('train_loss', float('nan')):.4f} |",
        f"| final validation loss | {losses.get('val_loss', float('nan')):.4f} |",
        "",
        "## Fuse check",
        "",
        f"{loss_label(result)} base {result.loss_base:.4f}, base + adapter {result.loss_adapter:.4f}, "
        f"fused {result.loss_fused:.4f}. On {result.checked_tokens} held-out tokens: the merge (float32) differs "
        f"from base + adapter by at most {result.merge_diff:.2e} in log-probability; the written model "
        f"({result.stored_dtype} weights) by at most {result.max_abs_diff:.2e}, mean KL {result.mean_kl:.2e} nats. "
        f"Quantization: {quant}; finetune gain kept: {survival}.",
        "",
        "## Use",
        "",
        "```",
        f"mlxtune chat {result.out}",
        f"mlx_lm.generate --model {result.out} --prompt \"...\"",
        "```",
        "",
    ]
    return "\n".join(lines)


def merge_sft_run(from_run: str | Path, run_dir: Path, checkpoint: str, console) -> Path:
    """`dpo/orpo --from RUN`: the supervised run's adapter merged into its base (re-quantized like the base),
    written once into the new run as sft-merged/. Called before the training engine starts."""
    source = open_run(from_run)  # a preference run is a run like any other: its adapter merges the same way
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
