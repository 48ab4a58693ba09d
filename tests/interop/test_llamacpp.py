"""Exports checked by the real clients, through text as users use them: llama.cpp (through llama-cpp-python) splits
text into the same tokens as MLX and continues a text prompt with the same text, for the base model, a run (fused
GGUF, base GGUF + our LoRA GGUF, the Ollama folder's GGUF)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlx_lm.utils import load

from conftest import MODEL, mlx_greedy, run_cli
from mlxtune.errors import UsageError
from mlxtune.export import export
from mlxtune.export.source import open_source
from mlxtune.export.gguf import export_gguf
from mlxtune.synthetic import build_random_model

llama_cpp = pytest.importorskip("llama_cpp", reason="interop suite: pip install -e '.[interop]'")

PROMPTS = ["Once upon a time", "The little dog was", "Tom and Lily went to the park. They", "table: players Q:"]
# What users type: ASCII, runs of spaces and newlines, digits, accents, emoji, CJK (byte fallback for the last two).
TEXTS = PROMPTS + ["Hello\nworld  with  spaces", "  two leading spaces", "émigré 123 4567 naïve café",
                   "emoji 😀 and 🚀!", "中文 日本語 한국어", "tabs\tand\n\nnewlines\t"]
TOKENS = 32


def _llama(path: Path, lora: Path | None = None):
    kwargs = {"lora_path": str(lora), "lora_scale": 1.0} if lora else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, seed=0, verbose=False, **kwargs)


def llama_greedy(llm, ids: list[int], n: int = TOKENS) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if len(out) == n or token == llm.token_eos():
            break
        out.append(token)
    return out


def llama_text(llm, prompt: str, n: int = TOKENS) -> str:
    """llama.cpp's own text completion of a text prompt, greedy."""
    llm.reset()
    result = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                   repeat_penalty=1.0)
    return prompt + result["choices"][0]["text"]


def mlx_text(model, tokenizer, prompt: str, n: int = TOKENS) -> str:
    """The prompt and MLX's greedy continuation of it, as the MLX tokenizer decodes them."""
    ids = tokenizer.encode(prompt)
    continuation = mlx_greedy(model, ids, n, eos=tokenizer.eos_token_id)
    assert len(continuation) >= 8, "the check needs a real continuation"
    return tokenizer.decode(ids + continuation, skip_special_tokens=True)


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    run_dir, _ = trained_run
    out = tmp_path_factory.mktemp("gguf")
    ollama = export(run_dir, "ollama", out / "ollama")
    files = {
        "base": export(MODEL, "gguf", out / "base-f16.gguf").path,
        "fused": export(run_dir, "gguf", out / "fused-f16.gguf").path,
        "adapter": export(run_dir, "gguf-adapter", out / "adapter.gguf").path,
        "ollama": next(f for f in ollama.files if f.endswith(".gguf")),
        "fused-mlx": str(out / "fused-mlx"),
    }
    assert run_cli("fuse", run_dir, "--out", files["fused-mlx"]).returncode == 0
    files["fused-q8"] = export(files["fused-mlx"], "gguf", out / "fused-q8_0.gguf", outtype="q8_0").path
    return {k: Path(v) for k, v in files.items()}


def test_llamacpp_tokenizes_text_like_mlx(exported):
    _, tokenizer = load(str(MODEL))
    for key in ("base", "fused", "ollama"):
        llm = llama_cpp.Llama(model_path=str(exported[key]), vocab_only=True, verbose=False)
        for text in TEXTS:
            ids = tokenizer.encode(text)
            assert llm.tokenize(text.encode(), add_bos=True) == ids, f"{key}: {text!r}"
            assert llm.detokenize(ids).decode() == tokenizer.decode(ids, skip_special_tokens=True), f"{key}: {text!r}"


def test_gguf_continues_text_like_mlx(exported):
    """Base, fused run, base + LoRA GGUF and the Ollama folder's GGUF: the same text from the same text prompt."""
    base = load(str(MODEL))
    tuned = load(str(exported["fused-mlx"]))
    cases = {"base": (_llama(exported["base"]), base), "fused": (_llama(exported["fused"]), tuned),
             "base+adapter": (_llama(exported["base"], lora=exported["adapter"]), tuned),
             "ollama": (_llama(exported["ollama"]), tuned)}
    tuned_differs = 0
    for prompt in PROMPTS:
        expected = {id(pair): mlx_text(*pair, prompt) for pair in (base, tuned)}
        for key, (llm, pair) in cases.items():
            assert llama_text(llm, prompt) == expected[id(pair)], f"{key}: {prompt!r}"
        tuned_differs += expected[id(base)] != expected[id(tuned)]
    assert tuned_differs, "the adapter must change what the model writes"


def test_full_gguf_continues_token_ids_like_mlx(exported):
    _, tokenizer = load(str(MODEL))
    eos = tokenizer.eos_token_id
    for key, mlx_path in (("base", MODEL), ("fused", exported["fused-mlx"])):
        model, _ = load(str(mlx_path))
        llm = _llama(exported[key])
        for prompt in PROMPTS[:2]:
            ids = tokenizer.encode(prompt)
            assert llama_greedy(llm, ids) == mlx_greedy(model, ids, eos=eos), f"{key}: {prompt!r}"


def test_tokenizer_json_alone_gives_the_sentencepiece_vocabulary(tmp_path):
    """No tokenizer.model: the vocabulary type comes from tokenizer.json itself, and llama.cpp still splits text
    exactly as MLX does."""
    model_dir = tmp_path / "no-spm"
    shutil.copytree(MODEL, model_dir)
    (model_dir / "tokenizer.model").unlink()
    import gguf

    path = export(model_dir, "gguf", tmp_path / "no-spm.gguf").path
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.model"].contents() == "llama"
    _, tokenizer = load(str(MODEL))
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    corpus = [json.loads(line)["text"] for line in (MODEL.parents[1] / "data" / "wikisql" / "valid.jsonl")
              .read_text().splitlines()[:40]]
    for text in TEXTS + corpus:
        assert llm.tokenize(text.encode(), add_bos=True) == tokenizer.encode(text), text


def _with_tokenizer(tmp_path, name: str, tokenizer) -> Path:
    """A copy of the bundled model whose tokenizer (tokenizer.json only) is `tokenizer`, a `tokenizers.Tokenizer`."""
    model_dir = tmp_path / name
    shutil.copytree(MODEL, model_dir)
    (model_dir / "tokenizer.model").unlink()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    return model_dir


def test_gguf_refuses_a_tokenizer_it_cannot_map(tmp_path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = json.loads((MODEL / "tokenizer.json").read_text())["model"]["vocab"]
    # A byte-level BPE with its own split regex: which of llama.cpp's pre-tokenizers matches it is unknowable.
    byte_level = Tokenizer(models.BPE(vocab, []))
    byte_level.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d{1,2}| ?\p{L}+"), "isolated"), pre_tokenizers.ByteLevel(use_regex=False)])
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    # Through the CLI: a one-line error with the way out, exit 2, nothing written.
    model_dir = _with_tokenizer(tmp_path, "byte-level", byte_level)
    result = run_cli("export", model_dir, "--format", "gguf", "--out", tmp_path / "byte-level.gguf")
    assert result.returncode == 2 and "byte-level BPE tokenizer of an unknown family" in result.stderr, result.stderr
    assert "convert_hf_to_gguf.py" in result.stderr and not list(tmp_path.glob("*.gguf*"))
    with pytest.raises(UsageError, match="a WordLevel tokenizer"):
        export(_with_tokenizer(tmp_path, "word-level", word_level), "ollama", tmp_path / "word-level-ollama")
    assert not (tmp_path / "word-level-ollama").exists()


def test_q8_0_gguf_loads_and_stays_close(exported):
    import gguf

    reader = gguf.GGUFReader(str(exported["fused-q8"]))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == "F16"  # 172 columns: not a multiple of Q8_0's block of 32
    _, tokenizer = load(str(MODEL))
    q8, f16 = _llama(exported["fused-q8"]), _llama(exported["fused"])
    agree = sum(llama_greedy(q8, tokenizer.encode(p), 8) == llama_greedy(f16, tokenizer.encode(p), 8)
                for p in PROMPTS)
    assert agree >= len(PROMPTS) - 1


def test_gguf_carries_tokenizer_and_template_metadata(tmp_path):
    import gguf

    from mlxtune.data.template import FALLBACK_CHAT_TEMPLATE

    model_dir = build_random_model({**json.loads((MODEL / "config.json").read_text())}, tmp_path / "chatty",
                                   chat_template=FALLBACK_CHAT_TEMPLATE)
    path = export(model_dir, "gguf", tmp_path / "chatty.gguf").path
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.token_type"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert fields["tokenizer.chat_template"].contents() == FALLBACK_CHAT_TEMPLATE
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert _llama(Path(path)).metadata["tokenizer.chat_template"] == FALLBACK_CHAT_TEMPLATE


# Tiny random models of each architecture the exporter supports, with the bundled SentencePiece tokenizer.
ARCHITECTURES = {
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 16,
              "tie_word_embeddings": True},
    "gemma": {"model_type": "gemma", "architectures": ["GemmaForCausalLM"], "head_dim": 16},
    "phi3": {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "tie_word_embeddings": False,
             "vocab_size": 520},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "tie_word_embeddings": False},
}
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "max_position_embeddings": 512}


# llama.cpp's phi3 vocabulary needs Phi-3's chat tokens (every real Phi-3 tokenizer has them).
PHI3_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]


def _add_special_tokens(model_dir, tokens: list[str], first_id: int) -> None:
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    decoder = tokenizer_config.setdefault("added_tokens_decoder", {})
    for offset, token in enumerate(tokens):
        info = {"content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True}
        tokenizer_json["added_tokens"].append({"id": first_id + offset, **info})
        decoder[str(first_id + offset)] = info
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_each_architecture_loads_in_llamacpp_and_matches_mlx(arch, tmp_path):
    model_dir = build_random_model({**SMALL, **ARCHITECTURES[arch]}, tmp_path / arch, seed=3)
    if arch == "phi3":
        _add_special_tokens(model_dir, PHI3_TOKENS, 512)
    with open_source(model_dir) as source:
        path = export_gguf(source, tmp_path / f"{arch}.gguf", "f32")
    model, tokenizer = load(str(model_dir))
    llm = _llama(path)
    for prompt in PROMPTS[:2]:
        ids = tokenizer.encode(prompt)
        expected = mlx_greedy(model, ids, 16, eos=tokenizer.eos_token_id)
        assert llama_greedy(llm, ids, 16) == expected, f"{arch}: {prompt!r}"
