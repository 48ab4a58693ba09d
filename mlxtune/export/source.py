"""What every exporter starts from: a full-precision model (weights as a dict of arrays, config, tokenizer files).

A run is fused first (verified, in a temporary directory); a quantized model is dequantized, because GGUF's own
quantizations and transformers' loaders expect float weights.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxtune.model_config import without_quantization
from mlxtune.inference import prompt_format
from mlxtune.runs import TEMPLATE_FILE, is_run_dir, open_for_inference
from mlxtune.storage import atomic_write_text, temp_dir

DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}


@dataclass
class ExportSource:
    path: Path  # an MLX model directory (the fused one for a run)
    config: dict  # without quantization keys
    weights: dict[str, mx.array]  # HF-style names, float
    tokenizer: object  # mlx-lm TokenizerWrapper
    chat_template: str | None
    origin: str  # what the user named


@contextmanager
def open_source(run_or_model: str | Path, checkpoint: str = "last", console=None):
    """Yields an ExportSource; a run is fused into a temporary directory that is removed afterwards."""
    from mlx_lm.utils import dequantize_model

    temp = None
    try:
        if is_run_dir(run_or_model):
            from mlxtune.fuse import fuse_run

            temp = temp_dir("mlxtune-export-")  # named with our PID: a killed export's copy is removed next time
            if console:
                console.print(f"fusing {run_or_model} ({checkpoint}) before export")
            fuse_run(run_or_model, temp / "fused", checkpoint=checkpoint)
            loaded = open_for_inference(temp / "fused")
        else:
            loaded = open_for_inference(run_or_model, console=console)
        dequantize_model(loaded.model)
        config = without_quantization(loaded.config)
        weights = dict(tree_flatten(loaded.model.parameters()))
        # the template chat/generate/serve render with (inference.prompt_format: the one template rule)
        template = prompt_format(loaded).template
        yield ExportSource(loaded.path, config, weights, loaded.tokenizer, template, str(run_or_model))
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def floating_dtype(weights: dict[str, mx.array]):
    for value in weights.values():
        if mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    return mx.float32


def copy_tokenizer_files(source: ExportSource, out: Path) -> None:
    from mlxtune.fuse import carry_tokenizer_files

    source.tokenizer.save_pretrained(str(out))
    carry_tokenizer_files(source.path, out)  # the SentencePiece model too, for slow tokenizers and converters
    for name in ("generation_config.json",):
        if (source.path / name).is_file():
            shutil.copy(source.path / name, out / name)
    if source.chat_template:
        atomic_write_text(out / TEMPLATE_FILE, source.chat_template)
