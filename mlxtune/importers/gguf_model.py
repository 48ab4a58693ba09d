"""A GGUF model file as an MLX model directory (config.json + model.safetensors), computing what llama.cpp computes.

- Q4_0, Q4_1 and Q8_0 tensors stay quantized, converted exactly: MLX reads them natively as its affine format with
  groups of 32 (Q4_1's scale and minimum are MLX's scale and bias; Q4_0 and Q8_0 get the bias -8·d and -128·d) —
  unless -q asks otherwise: `none` dequantizes them, the other bit width re-quantizes them (saying what it costs).
- F32, F16 and BF16 tensors are kept as floats (`dtype`, float16 by default), quantized only when -q 4/8 is given.
- Other types (K-quants, IQ-quants, …) are dequantized with the `gguf` package and re-quantized to `quantize` bits
  (8 by default: close to the file; 4 is lossy on top of the file's own loss) or kept as floats (`none`).
- Llama-family q/k projections are permuted back from llama.cpp's rotary layout (its converter permuted them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlxtune.errors import UsageError

# GGUF architecture → (mlx-lm model_type, q/k rows permuted by llama.cpp's converter)
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
EXACT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # MLX affine quantization holds them exactly (groups of 32)
FLOAT_TYPES = {"F32", "F16", "BF16"}
GGUF_GROUP_SIZE = 32

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def open_gguf(path: Path):
    """A GGUFReader over `path`, or a one-line UsageError when it is not a (complete) GGUF file."""
    from gguf import GGUFReader

    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise UsageError(f"{path}: can't read it ({exc.strerror})", "check the path and its permissions") from None
    if magic != b"GGUF":
        raise UsageError(f"{path} is not a GGUF file (it does not start with the GGUF magic)",
                         "give a .gguf model file as llama.cpp, Ollama or LM Studio use")
    try:
        reader = GGUFReader(str(path))
        for tensor in reader.tensors:  # a cut-off file ends inside (or before) its tensor data
            if tensor.data_offset + tensor.n_bytes > path.stat().st_size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except Exception as exc:
        raise UsageError(f"{path} is truncated or damaged: {type(exc).__name__}: {exc}".splitlines()[0],
                         "download or copy the file again") from None
    return reader


def read_metadata(reader) -> dict:
    """The key/value metadata as Python values (strings, numbers, lists)."""
    from gguf import GGUFValueType

    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        kind = field.types[0] if field.types else None
        if kind == GGUFValueType.ARRAY:
            inner = field.types[-1]
            if inner == GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
        elif kind == GGUFValueType.STRING:
            value = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        else:
            value = field.parts[field.data[0]].tolist()[0]
        metadata[key] = value
    return metadata


def check_architecture(metadata: dict) -> str:
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UsageError(f"the GGUF's architecture {arch!r} is not supported for import yet",
                         f"supported: {', '.join(ARCHITECTURES)} (Llama 2/3, SmolLM, Qwen2/2.5 families)")
    return arch


def hf_config(metadata: dict, arch: str, tied: bool, rope_freqs: np.ndarray | None,
              dtype: str = "float16") -> dict:
    """config.json for mlx-lm (and transformers) from the GGUF's hyperparameters."""
    def key(name, default=None):
        return metadata.get(f"{arch}.{name}", default)

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_size = int(key("attention.key_length", hidden // heads))
    config = {
        "model_type": ARCHITECTURES[arch][0],
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "vocab_size": len(metadata["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
    }
    if head_size != hidden // heads:
        config["head_dim"] = head_size
    if key("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif rope_freqs is not None:  # Llama 3.1+: llama.cpp stores the resulting per-frequency factors only
        config["rope_scaling"] = _llama3_rope_scaling(rope_freqs, config)
    elif key("rope.scaling.type") not in (None, "none"):
        raise UsageError(f"the GGUF's rope scaling {key('rope.scaling.type')!r} is not supported for import",
                         "use a file without rope scaling, or the original Hugging Face model")
    return config


def _llama3_rope_scaling(factors: np.ndarray, config: dict) -> dict:
    """Llama 3's rope_scaling parameters that give `factors` (its published low/high frequency factors and original
    context; the factor is the largest one). Refused when they don't reproduce the file's factors."""
    from mlxtune.export.gguf import llama3_rope_factors

    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if not np.allclose(llama3_rope_factors({**config, "rope_scaling": scaling}), factors, rtol=1e-4):
        raise UsageError("the GGUF's rope_freqs don't match Llama 3's rope scaling", "import is not supported for it")
    return scaling


def _hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, tensor = base.split(".", 2)
        mapped = _LAYER_TENSORS.get(tensor)
        return f"model.layers.{layer}.{mapped}.{suffix}" if mapped else None
    mapped = _GLOBAL_TENSORS.get(base)
    return f"{mapped}.{suffix}" if mapped else None


def _unpermute(array, n_head: int):
    """Rows of a q/k projection (or its scales, biases) from llama.cpp's interleaved rotary pairs back to HF's
    half-split order: the inverse of export.gguf.permute_rotary."""
    rows = array.shape[0]
    return (array.reshape(n_head, rows // n_head // 2, 2, *array.shape[1:])
            .swapaxes(1, 2).reshape(array.shape))


def convert(path: Path, out: Path, quantize: str | None, dtype: str | None = None) -> dict:
    """Write the MLX model (weights + config.json, without the tokenizer) of the GGUF at `path` into `out`.

    `quantize`: None (the default) keeps Q4_0/Q4_1/Q8_0 exactly, floats as floats, and re-quantizes other types to 8
    bits; "none" dequantizes every tensor to `dtype`; "4"/"8" keeps the file's tensors of exactly that width and
    (re-)quantizes all others to it. `dtype` ("float16" by default, "float32", "bfloat16") is the precision of the
    float tensors. Returns a summary: config, the GGUF types found, notes."""
    import mlx.core as mx
    from gguf import GGMLQuantizationType as Q

    dtype = dtype or "float16"
    reader = open_gguf(path)
    metadata = read_metadata(reader)
    arch = check_architecture(metadata)
    types = {t.name: Q(t.tensor_type).name for t in reader.tensors}
    permute_qk = ARCHITECTURES[arch][1]
    heads = int(metadata[f"{arch}.attention.head_count"])
    kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
    notes = []

    unknown = sorted({n for n in types if n != "rope_freqs.weight" and _hf_name(n) is None})
    if unknown:
        raise UsageError(f"the GGUF has tensors an imported {arch} model can't place: {', '.join(unknown[:3])}",
                         "it is a variant of the architecture this importer doesn't handle")
    requantized = sorted({t for t in types.values() if t not in EXACT_TYPES and t not in FLOAT_TYPES})
    if requantized:
        bits = quantize or "8"
        notes.append(f"{', '.join(requantized)} tensors have no exact MLX form: dequantized and "
                     + (f"kept as {dtype}" if bits == "none" else
                        f"re-quantized to {bits}-bit (group {GGUF_GROUP_SIZE})"
                        + ("; 4-bit on top of the file's own quantization loses more, -q 8 keeps it close"
                           if bits == "4" else "")))
    # Exact types an explicit -q doesn't keep: dequantized (-q none) or re-quantized to the other width.
    changed = sorted({t for t in types.values() if t in EXACT_TYPES and quantize is not None
                      and (quantize == "none" or EXACT_TYPES[t] != int(quantize))})
    if changed:
        notes.append(f"{', '.join(changed)} tensors " + _exact_type_cost(quantize, dtype))
    float_bits = quantize if quantize not in (None, "none") else None

    if not requantized:
        # MLX reads GGUF natively: Q4_0/Q4_1/Q8_0 come back as (weight, scales, biases), exactly.
        loaded = dict(mx.load(str(path), format="gguf"))  # Ollama blobs have no extension
        for scales in [n for n in loaded if n.endswith(".scales") and types[n[:-7] + ".weight"] in changed]:
            base = scales[:-7]
            loaded[f"{base}.weight"] = mx.dequantize(  # in float32: the file's values to float32 rounding
                loaded[f"{base}.weight"], loaded.pop(scales).astype(mx.float32),
                loaded.pop(f"{base}.biases").astype(mx.float32), group_size=GGUF_GROUP_SIZE,
                bits=EXACT_TYPES[types[f"{base}.weight"]])
    else:
        loaded = _dequantized(reader)
    weights, per_layer = {}, {}
    for gguf_name, array in loaded.items():
        tensor = gguf_name.rsplit(".", 1)[0] + ".weight"
        if gguf_name.startswith("rope_freqs"):
            continue
        hf = _hf_name(gguf_name)
        if permute_qk and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            array = _unpermute(array, heads if ".attn_q." in gguf_name else kv_heads)
        if mx.issubdtype(array.dtype, mx.floating):
            array = array.astype(getattr(mx, dtype))
        weights[hf] = array
        module = hf.rsplit(".", 1)[0]
        kind = types[tensor]
        if kind in EXACT_TYPES and not requantized and kind not in changed:
            per_layer[module] = EXACT_TYPES[kind]
    # Tensors to quantize now: dequantized ones per -q (default 8), float matrices only when -q was given.
    for hf in list(weights):
        module, suffix = hf.rsplit(".", 1)
        gguf_type = types[_gguf_name(hf)]
        bits = (quantize or "8") if gguf_type not in FLOAT_TYPES else float_bits
        if suffix != "weight" or module in per_layer or weights[hf].ndim != 2 or bits in (None, "none"):
            continue
        if "norm" in module or weights[hf].shape[-1] % GGUF_GROUP_SIZE:
            continue
        weights[hf], weights[f"{module}.scales"], weights[f"{module}.biases"] = mx.quantize(
            weights[hf], group_size=GGUF_GROUP_SIZE, bits=int(bits))
        per_layer[module] = int(bits)

    tied = "lm_head.weight" not in weights
    rope_freqs = np.array(loaded["rope_freqs.weight"].astype(mx.float32)) if "rope_freqs.weight" in loaded else None
    config = hf_config(metadata, arch, tied, rope_freqs, dtype)
    if dtype == "bfloat16" and any(types[_gguf_name(m + ".weight")] in EXACT_TYPES for m in per_layer):
        notes.append("the scales of the Q4/Q8 layers kept quantized are rounded to bfloat16 (not exact): "
                     "--dtype f16 or f32 keeps them exact")
    if per_layer:
        counts = {b: list(per_layer.values()).count(b) for b in set(per_layer.values())}
        main_bits = max(counts, key=counts.get)
        quantization = {"group_size": GGUF_GROUP_SIZE, "bits": main_bits}
        # mlx-lm quantizes exactly the layers whose scales are in the weights; other bit widths per layer.
        quantization.update({m: {"group_size": GGUF_GROUP_SIZE, "bits": b} for m, b in per_layer.items()
                             if b != main_bits})
        config["quantization"] = config["quantization_config"] = quantization
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {"config": config, "metadata": metadata, "types": sorted(set(types.values())), "notes": notes}


def _exact_type_cost(quantize: str, dtype: str) -> str:
    """What an explicit -q costs for tensors the file holds in an exact type of another width (one line)."""
    if quantize == "none":
        precision = "to float32 rounding" if dtype == "float32" else f"rounded to {dtype} (--dtype f32 keeps them)"
        return (f"dequantized to {dtype} as -q none asks: the file's values {precision}, in 2-4x the memory of the "
                "quantized import (leave -q out to keep them quantized)")
    if quantize == "4":
        return ("re-quantized to 4-bit as -q 4 asks: a second, 4-bit rounding on top of the file's 8-bit one "
                "(leave -q out to keep them exactly)")
    return ("re-quantized to 8-bit as -q 8 asks: close to the file's 4-bit values but not bit for bit, at about "
            "twice the size, no accuracy gained (leave -q out to keep them exactly)")


def _gguf_name(hf: str) -> str:
    module = hf.rsplit(".", 1)[0]
    for short, long in _GLOBAL_TENSORS.items():
        if module == long:
            return f"{short}.weight"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{next(k for k, v in _LAYER_TENSORS.items() if v == rest)}.weight"


def _dequantized(reader) -> dict:
    """Every tensor as float32 (gguf's numpy dequantizer handles all types it knows), named as in the file."""
    import mlx.core as mx
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    out = {}
    for tensor in reader.tensors:
        kind = Q(tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        try:
            array = np.asarray(tensor.data) if kind.name in FLOAT_TYPES else dequantize(tensor.data, kind)
        except NotImplementedError:
            raise UsageError(f"the GGUF tensor {tensor.name} is of type {kind.name}, which can't be dequantized",
                             "use a file with another quantization (Q8_0, Q4_K_M, …)") from None
        if kind.name == "BF16":
            array = dequantize(tensor.data, kind)
        out[tensor.name] = mx.array(np.ascontiguousarray(array, dtype=np.float32).reshape(shape))
    return out
