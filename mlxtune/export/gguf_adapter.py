"""A run's LoRA adapter alone as a llama.cpp LoRA GGUF (`llama-cli --lora`, Ollama's ADAPTER line).

llama.cpp applies `W x + (alpha / rank) · B (A x)` with A = `<tensor>.lora_a` (rank × in) and B = `<tensor>.lora_b`
(out × rank), rank read from A; mlx-lm's layers store A transposed (in × rank) and B transposed (rank × out) with
`scale`, so we write alpha = scale × rank. Llama's q/k rows are permuted for llama.cpp's RoPE layout, so B's rows
are permuted the same way.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxtune.errors import UsageError
from mlxtune.export.gguf import arch_spec, finish, permute_rotary, rotary_heads
from mlxtune.model_config import read_config, text_config
from mlxtune.runs import ADAPTER_FILE, Run


def export_gguf_adapter(run: Run, out_file: Path, checkpoint: str = "last") -> Path:
    import gguf

    adapter = run.info.get("adapter") or {}
    method = adapter.get("fine_tune_type", "lora")
    if method != "lora":
        raise UsageError(f"llama.cpp adapters are plain LoRA; this run trained {method}",
                         "fuse it and export the whole model: mlxtune export RUN --format gguf")
    config = read_config(run.base_model)
    text = text_config(config)
    spec = arch_spec(config)
    arch = getattr(gguf.MODEL_ARCH, spec.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, text["num_hidden_layers"])
    params = adapter.get("lora_parameters", {})
    rank, scale = int(params["rank"]), float(params["scale"])

    weights = mx.load(str(run.adapter_dir(checkpoint) / ADAPTER_FILE))
    layers = sorted({k.rsplit(".", 1)[0] for k in weights if k.endswith((".lora_a", ".lora_b"))})
    if not layers:
        raise UsageError(f"{run.path}: the adapter has no LoRA tensors",
                         "was the run trained with --method full? export the whole model: --format gguf")

    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scale * rank)
    writer.add_name(f"{run.path.name} (LoRA adapter)")
    for layer in layers:
        base_name = name_map.get_name(layer + ".weight", try_suffixes=(".weight",))
        if base_name is None:
            raise UsageError(f"no llama.cpp tensor for adapted layer {layer}", "export the fused model instead")
        a = np.array(weights[layer + ".lora_a"].astype(mx.float32)).T  # rank × in
        b = np.array(weights[layer + ".lora_b"].astype(mx.float32)).T  # out × rank
        heads = rotary_heads(layer, text, spec)
        if heads:
            b = permute_rotary(b, heads)
        writer.add_tensor(base_name + ".lora_a", np.ascontiguousarray(a))
        writer.add_tensor(base_name + ".lora_b", np.ascontiguousarray(b))
    return finish(writer, partial, out_file)
