"""The imported SmolLM2 GGUF splits text and predicts the next token as llama.cpp does on the same file."""

from __future__ import annotations

import mlx.core as mx
import pytest

from smollm import CHATS, imported_smollm2, smollm2_gguf, teacher_forced_agreement

llama_cpp = pytest.importorskip("llama_cpp", reason="interop suite: pip install -e '.[interop]'")

# ASCII, whitespace runs, digits, accents, emoji, CJK, code, the chat special tokens.
TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "  two leading spaces", "Hello\nworld  with  spaces",
    "tabs\tand\n\nnewlines\t", "digits 1234567890 and 3.14159", "émigré naïve café Größe", "emoji 😀 and 🚀!",
    "中文 日本語 한국어", "def f(x):\n    return x ** 2  # square", "don't, won't, I'll, we've",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "SELECT name FROM users WHERE id = 42;",
]
@pytest.fixture(scope="module")
def llama():
    return llama_cpp.Llama(model_path=str(smollm2_gguf()), n_ctx=512, n_threads=2, seed=0, verbose=False,
                           logits_all=True)


@pytest.fixture(scope="module")
def mlx_model():
    from mlx_lm.utils import load

    return load(imported_smollm2().path)


def _float32(model):
    model.set_dtype(mx.float32)  # activations in float32, as llama.cpp computes them (scales/biases exact)
    return model


@pytest.fixture(scope="module")
def float_model():
    """The imported model with its quantized layers dequantized: the same numbers within float32 rounding (checked
    on a short prompt below), ~35x faster than MLX's quantized matmul on the CPU backend."""
    from mlx_lm.utils import dequantize_model, load

    model, _ = load(imported_smollm2().path)
    return dequantize_model(_float32(model))


def test_tokens_equal_llama_cpp(llama, mlx_model):
    _, tokenizer = mlx_model
    for text in TEXTS:
        theirs = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        ours = tokenizer.encode(text, add_special_tokens=False)
        assert ours == theirs, text
        assert tokenizer.decode(ours) == text


def test_chat_template_and_stop_come_from_the_gguf(mlx_model):
    _, tokenizer = mlx_model
    text = tokenizer.apply_chat_template(CHATS[0][:1], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is the capital" in text
    assert "<|im_end|>" in {tokenizer.decode([i]) for i in tokenizer.eos_token_ids}


def test_dequantized_model_computes_the_imported_one(mlx_model, float_model):
    model, tokenizer = mlx_model
    ids = mx.array(tokenizer.encode("The capital of France is"))[None]
    quantized, dequantized = _float32(model)(ids), float_model(ids)
    model.set_dtype(mx.float16)
    assert mx.allclose(quantized, dequantized, atol=1e-3).item(), mx.abs(quantized - dequantized).max()


def test_next_token_agrees_with_llama_cpp(llama, mlx_model, float_model):
    """Teacher-forced on the chats (~500 distinct contexts): llama.cpp quantizes activations to 8 bits in its Q4/Q8
    dot products, so near-ties may part; the argmax agrees at ≥95% of them (measured 95.9%, docs/MODELS.md)."""
    _, tokenizer = mlx_model
    agree, total, delta, misses = teacher_forced_agreement(llama, float_model, tokenizer)
    print(f"argmax agreement {agree}/{total} distinct contexts, mean |Δlogit| {delta:.3f}, misses' gaps {misses}")
    assert agree >= 0.95 * total, f"argmax agreement {agree}/{total}"
    assert delta < 0.5
