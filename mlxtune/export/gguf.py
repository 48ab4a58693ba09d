"""Full-model GGUF files for llama.cpp (and Ollama, LM Studio), written with the `gguf` library.

Per architecture we follow llama.cpp's own converter: its tensor names (`gguf.get_tensor_name_map`), its hyper-
parameter keys, the rotary permutation of Llama's q/k projections, Gemma's `1 + weight` norms; the tokenizer goes in
as llama.cpp reads it (SentencePiece scores and types, or GPT-2 style BPE tokens, merges and pre-tokenizer name),
with the special tokens and the chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxtune.errors import UsageError
from mlxtune.export.source import ExportSource
from mlxtune.export import OUTTYPES
from mlxtune.model_config import head_dim, text_config



@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # HF's rotate-half RoPE layout → llama.cpp's interleaved one
    norm_plus_one: bool = False  # HF Gemma stores (weight - 1) for its RMSNorms


ARCHITECTURES = {
    "llama": ArchSpec("LLAMA", permute_qk=True),
    "mistral": ArchSpec("LLAMA", permute_qk=True),
    "qwen2": ArchSpec("QWEN2"),
    "qwen3": ArchSpec("QWEN3"),
    "gemma": ArchSpec("GEMMA", norm_plus_one=True),
    "phi3": ArchSpec("PHI3"),
}


def arch_spec(config: dict) -> ArchSpec:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UsageError(f"GGUF export does not support the {model_type!r} architecture yet",
                         f"supported: {', '.join(ARCHITECTURES)}; export --format hf and use llama.cpp's "
                         "convert_hf_to_gguf.py, or use the MLX model directly")
    scaling = rope_type(config)
    if scaling not in (None, "default", "linear", "llama3"):
        raise UsageError(f"GGUF export does not handle rope_scaling type {scaling!r} yet",
                         "export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    return ARCHITECTURES[model_type]


def rope_type(config: dict) -> str | None:
    rope = config.get("rope_scaling") or {}
    return rope.get("rope_type", rope.get("type"))


def llama3_rope_factors(config: dict) -> np.ndarray:
    """Llama 3.1+ frequency-dependent RoPE scaling, as llama.cpp reads it from the `rope_freqs` tensor."""
    rope = config["rope_scaling"]
    dim = head_dim(config)
    freqs = 1.0 / (config.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from HF's half-split RoPE order to llama.cpp's interleaved pairs."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def rotary_heads(layer: str, config: dict, spec: ArchSpec) -> int | None:
    """The head count to permute a q/k projection's output rows by (or its LoRA B), None for other layers."""
    layer = layer.removesuffix(".weight")
    if spec.permute_qk and layer.endswith("self_attn.q_proj"):
        return config["num_attention_heads"]
    if spec.permute_qk and layer.endswith("self_attn.k_proj"):
        return config.get("num_key_value_heads", config["num_attention_heads"])
    return None


def transform_tensor(name: str, array: np.ndarray, config: dict, spec: ArchSpec) -> np.ndarray:
    """HF/MLX tensor → the values llama.cpp expects under the same (mapped) name."""
    heads = rotary_heads(name, config, spec)
    if heads:
        return permute_rotary(array, heads)
    if spec.norm_plus_one and name.endswith("norm.weight"):
        return array + 1
    return array


def _tensor_type(gguf_name: str, array: np.ndarray, outtype: str):
    import gguf

    if outtype == "f32" or array.ndim <= 1 or gguf_name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32  # norms and biases stay exact, as llama.cpp's converter keeps them
    if outtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16  # q8_0 needs rows in blocks of 32; others fall back to f16


def _encode(array: np.ndarray, qtype) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def _numpy(value: mx.array) -> np.ndarray:
    return np.array(value.astype(mx.float32)) if mx.issubdtype(value.dtype, mx.floating) else np.array(value)


def write_hparams(writer, config: dict, spec: ArchSpec, n_vocab: int) -> None:
    """The keys llama.cpp's converter writes for this architecture (and nothing it would not)."""
    heads = config["num_attention_heads"]
    head_size = head_dim(config)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    if spec.gguf_arch != "GEMMA":  # llama.cpp's Gemma uses its fixed base of 10000
        writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    if "head_dim" in config or spec.gguf_arch == "GEMMA":
        writer.add_key_length(head_size)
        writer.add_value_length(head_size)
    if spec.gguf_arch == "LLAMA":
        writer.add_vocab_size(n_vocab)
        writer.add_rope_dimension_count(head_size)
    if spec.gguf_arch == "PHI3":
        writer.add_rope_dimension_count(int(config.get("partial_rotary_factor", 1.0) * config["hidden_size"]) // heads)
        writer.add_rope_scaling_orig_ctx_len(config.get("original_max_position_embeddings",
                                                        config.get("max_position_embeddings", 4096)))
        writer.add_sliding_window(config.get("sliding_window") or 0)
    if rope_type(config) == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config["rope_scaling"]["factor"])


# ------------------------------------------------------------------------------------------- tokenizer


# llama.cpp picks a BPE pre-tokenizer by name; its converter finds the name by hashing the tokenization of a fixed
# text. We name it by model family (the families mlx-lm users train) or by a plain GPT-2 byte-level pre-tokenizer,
# and refuse to guess otherwise: a wrong name tokenizes text differently from the model's own tokenizer.
def bpe_pre_tokenizer(config: dict, n_vocab: int, tokenizer_json: dict | None = None) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, None when we can't tell."""
    model_type = config.get("model_type")
    if model_type in ("qwen2", "qwen3"):
        return "qwen2"
    if model_type == "llama" and n_vocab >= 128000:
        return "llama-bpe"  # Llama 3.x
    if model_type == "llama" and n_vocab == 49152:
        return "smollm"  # SmolLM / SmolLM2
    pre = (tokenizer_json or {}).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's own regex, nothing else
    return None


def _components(tokenizer_json: dict, key: str) -> list[dict]:
    """The normalizers or pre-tokenizers of tokenizer.json, with Sequences flattened."""
    out, todo = [], [tokenizer_json.get(key)]
    while todo:
        item = todo.pop(0)
        if not item:
            continue
        if item.get("type") == "Sequence":
            todo[:0] = item.get("normalizers") or item.get("pretokenizers") or []
        else:
            out.append(item)
    return out


def _marks_spaces_with_metaspace(tokenizer_json: dict) -> bool:
    """SentencePiece style: spaces become '▁' (a Metaspace pre-tokenizer or a Replace normalizer)."""
    return (any(p.get("type") == "Metaspace" for p in _components(tokenizer_json, "pre_tokenizer"))
            or any(n.get("type") == "Replace" and n.get("content") == "▁"
                   for n in _components(tokenizer_json, "normalizer")))


def _adds_space_prefix(tokenizer_json: dict) -> bool:
    """Does the tokenizer put '▁' before the text (SentencePiece's add_dummy_prefix)?"""
    for n in _components(tokenizer_json, "normalizer"):
        if n.get("type") == "Prepend" and n.get("prepend") == "▁":
            return True
    for p in _components(tokenizer_json, "pre_tokenizer"):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") != "never"
    return False


def tokenizer_kind(path: Path) -> str:
    """The vocabulary llama.cpp must use, read from the tokenizer itself (not from which files exist):
    'sentencepiece' (llama.cpp's SPM: '▁' for spaces, byte fallback) or 'bpe' (GPT-2 style byte-level BPE)."""
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        if (path / "tokenizer.model").is_file():
            return "sentencepiece"  # a slow-tokenizer-only model: the SentencePiece model is the tokenizer
        raise UsageError(f"{path}: no tokenizer.json or tokenizer.model", "the model directory needs its tokenizer")
    tokenizer_json = _json(tokenizer_file)
    model_type = (tokenizer_json.get("model") or {}).get("type")
    if model_type == "BPE" and _marks_spaces_with_metaspace(tokenizer_json):
        return "sentencepiece"
    if model_type == "BPE" and any(p.get("type") == "ByteLevel"
                                   for p in _components(tokenizer_json, "pre_tokenizer")):
        return "bpe"
    raise UsageError(f"{tokenizer_file}: a {model_type} tokenizer that is neither SentencePiece-style nor "
                     "byte-level BPE; GGUF export can't tell which llama.cpp vocabulary matches it",
                     "export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")


def vocabulary(path: Path, config: dict) -> tuple[str, str]:
    """(llama.cpp tokenizer model, pre-tokenizer name) for the tokenizer in `path`; refuses what it can't tell.

    Called before any work is done (a run's export checks its base before fusing)."""
    config = text_config(config)
    if tokenizer_kind(path) == "sentencepiece":
        return "llama", "default"
    pre = bpe_pre_tokenizer(config, config["vocab_size"], _json(path / "tokenizer.json"))
    if pre is None:
        raise UsageError(f"{path / 'tokenizer.json'}: a byte-level BPE tokenizer of an unknown family "
                         f"({config.get('model_type')}, vocabulary {config['vocab_size']}); llama.cpp would split "
                         "text differently from the model's own tokenizer",
                         "export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    return "gpt2", pre


def write_tokenizer(writer, source: ExportSource, n_vocab: int) -> None:
    import gguf

    path = source.path
    config = source.config
    tokenizer_json = _json(path / "tokenizer.json")
    model, pre = vocabulary(path, config)
    if model == "llama":
        if (path / "tokenizer.model").is_file():
            tokens, scores, types = _sentencepiece_vocab(path, n_vocab)
        else:
            tokens, scores, types = _sentencepiece_vocab_from_json(path, tokenizer_json, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types([int(t) for t in types])
        if tokenizer_json:
            writer.add_add_space_prefix(_adds_space_prefix(tokenizer_json))
        special = gguf.SpecialVocab(path, n_vocab=len(tokens))
    else:
        tokens, types = _bpe_vocab(tokenizer_json, n_vocab)
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([int(t) for t in types])
        special = gguf.SpecialVocab(path, load_merges=True, n_vocab=len(tokens))
    if config.get("model_type") == "phi3" and "<|end|>" not in {text for text, _ in _added_tokens(path).values()}:
        raise UsageError(f"{path}: llama.cpp's phi3 needs Phi-3's <|end|> chat token, which this tokenizer lacks",
                         "export --format hf and convert with llama.cpp's convert_hf_to_gguf.py")
    special.add_to_gguf(writer, quiet=True)
    if source.chat_template:
        writer.add_chat_template(source.chat_template)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _sentencepiece_vocab(path: Path, n_vocab: int):
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path / "tokenizer.model"))
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for i in range(min(sp.vocab_size(), n_vocab)):
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), kind
    added = _added_tokens(path)
    for token_id, (text, special) in added.items():
        if token_id < n_vocab:
            tokens[token_id] = text.encode("utf-8")
            types[token_id] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
            scores[token_id] = -1000.0
    return tokens, scores, types


def _sentencepiece_vocab_from_json(path: Path, tokenizer_json: dict, n_vocab: int):
    """SentencePiece-style vocabulary from tokenizer.json alone (no tokenizer.model): llama.cpp merges the pair whose
    merged piece scores highest, so a piece scores minus the rank of the first BPE merge that makes it."""
    import gguf

    model = tokenizer_json["model"]
    merges = model.get("merges") or []
    rank = {}
    for position, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, position)
    unknown = {model.get("unk_token"), _json(path / "tokenizer_config.json").get("unk_token")}
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, token_id in model["vocab"].items():
        if token_id >= n_vocab:
            continue
        kind = gguf.TokenType.NORMAL
        if text in unknown:
            kind = gguf.TokenType.UNKNOWN
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = gguf.TokenType.BYTE
        tokens[token_id], types[token_id] = text.encode("utf-8"), kind
        scores[token_id] = -float(rank.get(text, len(merges)))  # pieces no merge makes are never merge results
    for token_id, (text, special) in _added_tokens(path).items():
        if token_id < n_vocab:
            tokens[token_id] = text.encode("utf-8")
            types[token_id] = (gguf.TokenType.UNKNOWN if text in unknown
                               else gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            scores[token_id] = 0.0
    return tokens, scores, types


def _added_tokens(path: Path) -> dict[int, tuple[str, bool]]:
    added = {}
    for token_id, info in _json(path / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        added[int(token_id)] = (info["content"], bool(info.get("special")))
    for info in _json(path / "tokenizer.json").get("added_tokens", []):
        added.setdefault(int(info["id"]), (info["content"], bool(info.get("special"))))
    return added


def _bpe_vocab(tokenizer_json: dict, n_vocab: int):
    import gguf

    vocab = dict(tokenizer_json["model"]["vocab"])
    added = {int(t["id"]): (t["content"], bool(t.get("special"))) for t in tokenizer_json.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            text, special = added[i]
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, types


# ------------------------------------------------------------------------------------------------ write


def export_gguf(source: ExportSource, out_file: Path, outtype: str = "f16", name: str | None = None,
                warnings: list[str] | None = None) -> Path:
    """Write `out_file`, a complete GGUF model llama.cpp loads; returns its path. Notes go to `warnings`."""
    import logging

    import gguf

    logging.getLogger("gguf").setLevel(logging.ERROR)  # its "Unknown separator token" chatter is not for users
    warnings = warnings if warnings is not None else []
    if outtype not in OUTTYPES:
        raise UsageError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}",
                         "f16 keeps the weights as trained; q8_0 halves the file")
    config = text_config(source.config)
    spec = arch_spec(source.config)
    arch = getattr(gguf.MODEL_ARCH, spec.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    n_vocab = config["vocab_size"]

    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or source.path.name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(writer, config, spec, n_vocab)
    write_tokenizer(writer, source, n_vocab)
    if rope_type(config) == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))

    for hf_name, value in sorted(source.weights.items()):
        if spec.gguf_arch == "GEMMA" and hf_name.startswith("lm_head."):
            continue  # Gemma's head is its embedding; llama.cpp's Gemma has no output tensor
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UsageError(f"GGUF export: no llama.cpp name for tensor {hf_name}",
                             "this model variant is not supported by the GGUF exporter; export --format hf")
        array = transform_tensor(hf_name, _numpy(value), config, spec)
        qtype = _tensor_type(gguf_name, array, outtype)
        writer.add_tensor(gguf_name, _encode(array, qtype), raw_dtype=qtype)
    return finish(writer, partial, out_file)


def finish(writer, partial: Path, out_file: Path) -> Path:
    """Write everything added to `writer` into `partial`, then move it into place: no half-written .gguf."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    partial.replace(out_file)
    return out_file
