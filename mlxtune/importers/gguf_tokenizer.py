"""A GGUF file's vocabulary (`tokenizer.ggml.*`) as a Hugging Face `tokenizer.json` + `tokenizer_config.json` that
transformers and mlx-lm load, splitting text the way llama.cpp does for that file.

Byte-level BPE (`gpt2`): llama.cpp picks its pre-tokenizer regex by the `tokenizer.ggml.pre` name; each name we
accept maps to the Hugging Face pre-tokenizer of the same family (the one llama.cpp's converter hashed to find the
name). SentencePiece (`llama`): pieces and scores become a byte-fallback BPE whose merges follow the scores, as
transformers builds it for the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxtune.errors import UsageError

# Token types in `tokenizer.ggml.token_type` (gguf.TokenType): what llama.cpp matches as a whole in raw text.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTES_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}, _BYTES_ONLY]}


# tokenizer.ggml.pre → (Hugging Face pre-tokenizer, ignore_merges): the same splits as llama.cpp's regexes.
PRE_TOKENIZERS = {
    "gpt-2": (_GPT2_SPLIT, False),
    "smollm": ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2_SPLIT]},
               False),
    "starcoder": ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                         _GPT2_SPLIT]}, False),
    "qwen2": (_split(_QWEN2_REGEX), False),
    "deepseek-r1-qwen": (_split(_QWEN2_REGEX), False),
    "llama-bpe": (_split(_LLAMA3_REGEX), True),  # llama.cpp takes a whole word that is in the vocabulary as is
}


def build_tokenizer(metadata: dict, out: Path) -> dict:
    """Write tokenizer.json and tokenizer_config.json into `out`; returns the ids config.json needs
    (bos_token_id, eos_token_id as a list with the end-of-turn token, pad_token_id)."""
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UsageError("the GGUF file has no vocabulary (tokenizer.ggml.tokens)",
                         "it is not a complete model file; use the GGUF your app runs")
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if model == "gpt2":
        tokenizer = _byte_level_bpe(metadata, tokens)
    elif model == "llama":
        tokenizer = _sentencepiece(metadata, tokens, types)
    else:
        raise UsageError(f"the GGUF vocabulary type {model!r} is not supported",
                         "supported: gpt2 (byte-level BPE) and llama (SentencePiece)")

    ids = {key: metadata.get(f"tokenizer.ggml.{key}_token_id") for key in
           ("bos", "eos", "eot", "eom", "padding", "unknown")}
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    special_ids = {i for i in ids.values() if i is not None}
    added = [i for i, kind in enumerate(types) if kind in (CONTROL, USER_DEFINED) or i in special_ids]
    tokenizer["added_tokens"] = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": types[i] != USER_DEFINED} for i in added]
    tokenizer["post_processor"] = _post_processor(tokens, ids["bos"] if add_bos else None,
                                                  ids["eos"] if add_eos else None, model)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")

    def text(token_id):
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(ids["bos"]), "eos_token": text(ids["eos"]),
        "pad_token": text(ids["padding"]), "unk_token": text(ids["unknown"]),
        "add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
        "model_max_length": int(metadata.get("context_length") or 2048),
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                 for t in tokenizer["added_tokens"]},
    }
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = metadata["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    stops = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
    return {"bos_token_id": ids["bos"], "eos_token_id": list(dict.fromkeys(stops)) or None,
            "pad_token_id": ids["padding"]}


def _byte_level_bpe(metadata: dict, tokens: list[str]) -> dict:
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UsageError(f"the GGUF's byte-level BPE pre-tokenizer {pre!r} is not supported yet",
                         f"supported: {', '.join(PRE_TOKENIZERS)}; without it text would be split differently "
                         "from llama.cpp")
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
    merges = metadata.get("tokenizer.ggml.merges") or []
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }


def _sentencepiece(metadata: dict, tokens: list[str], types: list[int]) -> dict:
    """llama.cpp's SPM merges the adjacent pair whose merged piece has the highest score: BPE merges ranked by the
    merged piece's score give the same result."""
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t for t, i in vocab.items() if types[i] in (NORMAL, UNKNOWN)}
    merges = []
    for piece, piece_id in vocab.items():
        if types[piece_id] != NORMAL or len(piece) < 2:
            continue
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in mergeable and piece[k:] in mergeable]
        merges += [(-scores[piece_id], vocab[left], vocab[right], left, right) for left, right in pairs]
    merges.sort()
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    normalizers = ([{"type": "Prepend", "prepend": "▁"}] if add_prefix else []) + [
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if add_prefix else [])
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk] if unk is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                  "merges": [[left, right] for *_, left, right in merges]},
    }


def _post_processor(tokens: list[str], bos: int | None, eos: int | None, model: str) -> dict | None:
    if bos is None and eos is None:
        return ({"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
                if model == "gpt2" else None)
    single = ([{"SpecialToken": {"id": tokens[bos], "type_id": 0}}] if bos is not None else []) + [
        {"Sequence": {"id": "A", "type_id": 0}}] + (
        [{"SpecialToken": {"id": tokens[eos], "type_id": 0}}] if eos is not None else [])
    pair = single + [item if "SpecialToken" in item else {"Sequence": {"id": "B", "type_id": 1}} for item in single]
    special = {tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]} for i in (bos, eos) if i is not None}
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}
