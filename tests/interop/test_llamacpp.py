"""Exports checked by the real clients: llama.cpp (through llama-cpp-python) loads our GGUF files and continues
prompts exactly as MLX does; base GGUF + our LoRA GGUF equals the fused GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlx_lm.utils import load

from conftest import MODEL, mlx_greedy, run_cli
from mlxtune.export import export
from mlxtune.export.source import open_source
from mlxtune.export.gguf import export_gguf
from mlxtune.synthetic import build_random_model

llama_cpp = pytest.importorskip("llama_cpp", reason="interop suite: pip install -e '.[interop]'")

PROMPTS = ["Once upon a time", "The little dog was", "Tom and Lily went to the park. They", "table: players Q:"]
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


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    run_dir, _ = trained_run
    out = tmp_path_factory.mktemp("gguf")
    files = {
        "base": export(MODEL, "gguf", out / "base-f16.gguf").path,
        "fused": export(run_dir, "gguf", out / "fused-f16.gguf").path,
        "fused-q8": export(run_dir, "gguf", out / "fused-q8_0.gguf", outtype="q8_0").path,
        "adapter": export(run_dir, "gguf-adapter", out / "adapter.gguf").path,
        "fused-mlx": str(out / "fused-mlx"),
    }
    assert run_cli("fuse", run_dir, "--out", files["fused-mlx"]).returncode == 0
    return {k: Path(v) for k, v in files.items()}


def test_llamacpp_tokenizes_like_mlx(exported):
    _, tokenizer = load(str(MODEL))
    llm = llama_cpp.Llama(model_path=str(exported["base"]), vocab_only=True, verbose=False)
    for text in PROMPTS + ["Hello\nworld  with  spaces", "émigré 123"]:
        assert llm.tokenize(text.encode(), add_bos=True) == tokenizer.encode(text)


def test_full_gguf_continues_like_mlx(exported):
    _, tokenizer = load(str(MODEL))
    eos = tokenizer.eos_token_id
    for key, mlx_path in (("base", MODEL), ("fused", exported["fused-mlx"])):
        model, _ = load(str(mlx_path))
        llm = _llama(exported[key])
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            expected = mlx_greedy(model, ids, eos=eos)
            assert len(expected) >= 8, "the check needs a real continuation"
            assert llama_greedy(llm, ids) == expected, f"{key}: {prompt!r}"


def test_adapter_gguf_on_base_equals_fused_gguf(exported):
    _, tokenizer = load(str(MODEL))
    fused = _llama(exported["fused"])
    with_adapter = _llama(exported["base"], lora=exported["adapter"])
    base = _llama(exported["base"])
    differs = 0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        tuned = llama_greedy(fused, ids)
        assert llama_greedy(with_adapter, ids) == tuned, prompt
        differs += llama_greedy(base, ids) != tuned
    assert differs, "the adapter must change what the model writes"


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
