"""Merge a run's adapter into its base model and prove the written model still carries the finetune.

The merge happens at full precision: a quantized base is dequantized first (re-quantizing `W + BA` with the base's
own grid is what rounds small adapters away in other tools). The written model is reloaded from disk and compared
with base + adapter on held-out text from the run: logits, KL and validation loss. An unquantized fuse that does
not match is deleted; a re-quantized one reports how much of the finetune's loss gain survived.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxtune.data.dataset import load_datasets
from mlxtune.errors import RunFailed, UsageError
from mlxtune.train.evaluate import validation_loss
from mlxtune.library import base_source
from mlxtune.model_config import DEFAULT_GROUP_SIZE, check_quantization, read_config, without_quantization
from mlxtune.models import load_model
from mlxtune.runs import METRICS_FILE, TEMPLATE_FILE, Run, open_for_inference, open_run
from mlxtune.train.metrics import read_metrics
from mlxtune.ui import quiet_stdout

CHECK_EXAMPLES = 16
CHECK_LENGTH = 256
SURVIVAL_WARNING = 0.9
FLOAT32_CHECK_BYTES = 6 * 2**30
# Max |log-prob difference| allowed between base+adapter and the unquantized fused model. Compared in float32, the
# only difference is the fused weights' rounding: 1e-4 for float32 weights, 1e-3 for half-precision ones. Models too
# large for a float32 copy are compared in their own precision, where activations round too.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
HALF_WEIGHTS_TOLERANCE = 1e-3
REPORT_FILE = "mlxtune_fuse.json"


@dataclass
class FuseResult:
    out: str
    quantization: dict | None
    max_abs_diff: float  # fused vs base + adapter logits, float32 computation
    mean_kl: float  # KL(base+adapter || fused), nats per token
    tolerance: float | None  # the bound an unquantized fuse must meet; None when re-quantized
    checked_tokens: int
    loss_base: float
    loss_adapter: float
    loss_fused: float
    survival: float | None  # share of the finetune's loss gain the fused model keeps
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


def _check_examples(run: Run, tokenizer):
    """Held-out examples from the run's own validation data (training data if it had none), cut to check length."""
    from mlxtune.data.template import TokenizedExample

    if run.info.get("objective") in ("dpo", "orpo"):  # a preference run: its pairs' chosen answers
        from mlxtune.data.preference import chosen_examples

        examples = chosen_examples(run.settings.data, tokenizer, run.settings.chat_template,
                                   run.settings.seed)[:CHECK_EXAMPLES]
    else:
        datasets = load_datasets(run.settings.data, tokenizer, **run.settings.dataset_options())
        examples = (datasets.valid or datasets.train)[:CHECK_EXAMPLES]
    return [TokenizedExample(e.ids[:CHECK_LENGTH], e.supervised[:CHECK_LENGTH], e.source) for e in examples]


def _cast_floating(model, dtype) -> None:
    model.update(tree_unflatten([(k, v.astype(dtype)) for k, v in tree_flatten(model.parameters())
                                 if mx.issubdtype(v.dtype, mx.floating)]))


def _as_float32(model) -> None:
    """Compare in float32 so the check measures the fused weights, not half-precision rounding of activations.

    Models too big to hold in float32 (over FLOAT32_CHECK_BYTES) are compared in their own precision instead."""
    if _float32_bytes(model) <= FLOAT32_CHECK_BYTES:
        _cast_floating(model, mx.float32)


def _float32_bytes(model) -> int:
    return sum(v.size * 4 for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating))


def _floating_dtypes(model) -> set:
    return {v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}


def _tolerance(weight_dtypes: set, compared_dtypes: set) -> float:
    """The bound an unquantized fuse must meet, by the precision of its weights and of the comparison."""
    if compared_dtypes <= {mx.float32}:
        return TOLERANCE["float32"] if weight_dtypes <= {mx.float32} else HALF_WEIGHTS_TOLERANCE
    return TOLERANCE["bfloat16" if mx.bfloat16 in compared_dtypes else "float16"]


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
    from mlx_lm.utils import dequantize_model, quantize_model, save

    run = open_run(run_dir)
    base_quantization = read_config(run.base_model).get("quantization") or {}
    group_size = group_size or base_quantization.get("group_size") or DEFAULT_GROUP_SIZE
    quantize = check_quantization(quantize, group_size)  # before any model is loaded
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"output directory {out} already exists", "choose another --out or pass --overwrite")
    run.adapter_dir(checkpoint)  # an unknown checkpoint fails before any model is loaded

    base = open_for_inference(run.path, checkpoint, adapter=False)
    examples = _check_examples(run, base.tokenizer)
    _as_float32(base.model)
    loss_base = validation_loss(base.model, examples)
    del base

    tuned = open_for_inference(run.path, checkpoint)
    model, tokenizer, config = tuned.model, tuned.tokenizer, tuned.config
    del tuned
    stored_dtype = _stored_dtype(model)
    # Reference: base + adapter as training saw it, evaluated in float32 (the merge below then also runs in float32).
    _as_float32(model)
    expected = _log_probs(model, examples)
    loss_adapter = validation_loss(model, examples)

    fused = [(name, module.fuse(dequantize=True)) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if _is_quantized(model):  # embeddings, heads and unadapted layers of a QLoRA base
        dequantize_model(model)
    _cast_floating(model, stored_dtype)  # the base's own precision (float16 stays float16)
    config = without_quantization(config)
    if quantize != "none":
        with quiet_stdout():
            model, config = quantize_model(model, config, group_size, int(quantize))
    if run.chat_template:  # keep the fallback/file template so inference renders prompts as training did
        tokenizer._tokenizer.chat_template = run.chat_template

    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save(staging, run.base_model, model, tokenizer, config, donate_model=False)
        del model
        reloaded, _, _ = load_model(staging)
        reloaded.eval()
        weight_dtypes = _floating_dtypes(reloaded)
        _as_float32(reloaded)
        tolerance = _tolerance(weight_dtypes, _floating_dtypes(reloaded))
        actual = _log_probs(reloaded, examples)
        loss_fused = validation_loss(reloaded, examples)
        max_diff = max(mx.abs(a - e).max().item() for a, e in zip(actual, expected))
        kl = mx.concatenate([(mx.exp(e) * (e - a)).sum(-1) for a, e in zip(actual, expected)]).mean().item()
        quantization = {"bits": int(quantize), "group_size": group_size} if quantize != "none" else None
        result = FuseResult(
            out=str(out), quantization=quantization, max_abs_diff=max_diff, mean_kl=max(kl, 0.0),
            tolerance=None if quantization else tolerance,
            checked_tokens=sum(len(e) for e in examples), loss_base=loss_base, loss_adapter=loss_adapter,
            loss_fused=loss_fused, survival=survival_ratio(loss_base, loss_adapter, loss_fused),
        )
        if result.tolerance is not None and not max_diff <= result.tolerance:
            raise RunFailed(
                f"the fused model's log-probabilities differ from base+adapter by {max_diff:.2e} "
                f"(> {result.tolerance:g}); nothing written",
                "report this with the run directory; the adapter itself is unaffected",
            )
        warning = survival_warning(result.survival, quantize)
        if warning:
            result.warnings.append(warning)
        _write_extras(staging, run, checkpoint, result)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


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
        (out / TEMPLATE_FILE).write_text(run.chat_template, encoding="utf-8")
    (out / REPORT_FILE).write_text(json.dumps({"run": str(run.path), "checkpoint": checkpoint,
                                               **result.to_dict()}, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(run, checkpoint, result), encoding="utf-8")


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
        f"On {result.checked_tokens} held-out tokens: validation loss base {result.loss_base:.4f}, "
        f"base + adapter {result.loss_adapter:.4f}, fused {result.loss_fused:.4f}; "
        f"max |log-prob difference| {result.max_abs_diff:.2e}, mean KL {result.mean_kl:.2e} nats. "
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
