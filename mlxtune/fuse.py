"""Merge a run's adapter into its base model and prove the written model still carries the finetune."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_unflatten

from mlxtune.data.dataset import load_datasets
from mlxtune.errors import RunFailed, UsageError
from mlxtune.models import load_model
from mlxtune.runs import open_run

CHECK_EXAMPLES = 8


@dataclass
class FuseResult:
    out: str
    max_abs_diff: float
    tolerance: float
    checked_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _check_inputs(run, tokenizer) -> list[mx.array]:
    """Held-out token sequences from the run's own validation data (training data if it had none)."""
    datasets = load_datasets(run.settings.data, tokenizer, **run.settings.dataset_options())
    examples = (datasets.valid or datasets.train)[:CHECK_EXAMPLES]
    return [mx.array(e.ids[:256])[None] for e in examples]


def _logits(model, inputs: list[mx.array]) -> list[mx.array]:
    outputs = [model(x).astype(mx.float32) for x in inputs]
    mx.eval(outputs)
    return outputs


def fuse_run(run_dir: str | Path, out: str | Path, checkpoint: str = "last", overwrite: bool = False,
             console=None) -> FuseResult:
    """Write `out`, a standalone MLX model = base + adapter; refuse to keep it if its logits drift."""
    from mlx_lm.utils import save

    run = open_run(run_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"output directory {out} already exists", "choose another --out or pass --overwrite")
        shutil.rmtree(out)
    adapter_dir = run.adapter_dir(checkpoint)
    model, tokenizer, config = load_model(run.base_model, adapter_dir)
    model.eval()
    inputs = _check_inputs(run, tokenizer)
    expected = _logits(model, inputs)

    fused = [(name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if run.chat_template:  # keep the fallback/file template so inference renders prompts as training did
        tokenizer._tokenizer.chat_template = run.chat_template
    save(out, run.base_model, model, tokenizer, config, donate_model=False)

    reloaded, _, _ = load_model(out)
    actual = _logits(reloaded, inputs)
    max_diff = max(mx.abs(a - e).max().item() for a, e in zip(actual, expected))
    half = any(v.dtype in (mx.float16, mx.bfloat16) for v in _floating(reloaded))
    tolerance = 1e-3 if half else 1e-4
    if not max_diff <= tolerance:
        shutil.rmtree(out, ignore_errors=True)
        raise RunFailed(
            f"the fused model's logits differ from base+adapter by {max_diff:.2e} (> {tolerance:g}); nothing written",
            "report this with the run directory; the adapter itself is unaffected",
        )
    return FuseResult(str(out), max_diff, tolerance, sum(x.size for x in inputs))


def _floating(model):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
