"""Hugging Face safetensors (dequantized) that transformers loads directly."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from mlxtune.storage import create_file
from mlxtune.export.source import DTYPES, ExportSource, copy_tokenizer_files, floating_dtype

TORCH_DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def export_hf(source: ExportSource, out: Path, dtype: str | None = None) -> Path:
    """Write config.json, model.safetensors and tokenizer files into `out`.

    mlx-lm keeps Hugging Face parameter names for these architectures, so the names carry over; tied embeddings
    stay tied through `tie_word_embeddings`.
    """
    out.mkdir(parents=True, exist_ok=True)
    target = DTYPES[dtype] if dtype else floating_dtype(source.weights)
    weights = {name: (v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v)
               for name, v in source.weights.items()}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    config = dict(source.config)
    config["torch_dtype"] = TORCH_DTYPE_NAMES[target]
    create_file(out / "config.json", json.dumps(config, indent=2) + "\n")  # new in the export's staging folder
    copy_tokenizer_files(source, out)
    return out / "model.safetensors"
