"""The imported SmolLM2 GGUF splits text and predicts the next token as llama.cpp does on the same file."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from smollm import imported_smollm2, smollm2_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="interop suite: pip install -e '.[interop]'")

# ASCII, whitespace runs, digits, accents, emoji, CJK, code, the chat special tokens.
TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "  two leading spaces", "Hello\nworld  with  spaces",
    "tabs\tand\n\nnewlines\t", "digits 1234567890 and 3.14159", "émigré naïve café Größe", "emoji 😀 and 🚀!",
    "中文 日本語 한국어", "def f(x):\n    return x ** 2  # square", "don't, won't, I'll, we've",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "SELECT name FROM users WHERE id = 42;",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "How many legs does a spider have?"}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    [{"role": "user", "content": "Give me three tips for learning to code."}],
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
    text = tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is the capital" in text
    assert "<|im_end|>" in {tokenizer.decode([i]) for i in tokenizer.eos_token_ids}


def test_dequantized_model_computes_the_imported_one(mlx_model, float_model):
    model, tokenizer = mlx_model
    ids = mx.array(tokenizer.encode("The capital of France is"))[None]
    quantized, dequantized = _float32(model)(ids), float_model(ids)
    model.set_dtype(mx.float16)
    assert mx.allclose(quantized, dequantized, atol=1e-3).item(), mx.abs(quantized - dequantized).max()


def test_next_token_agrees_with_llama_cpp(llama, mlx_model, float_model):
    """Teacher-forced on chat prompts and llama.cpp's own continuations: llama.cpp quantizes activations to 8 bits
    in its Q4/Q8 dot products, so near-ties may part; the argmax agrees at ≥95% of positions."""
    _, tokenizer = mlx_model
    model = float_model
    agree = total = 0
    deltas = []
    for chat in CHATS:
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        ids = llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        llama.reset()
        continuation = []
        for token in llama.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if len(continuation) == 24 or token == llama.token_eos():
                break
            continuation.append(token)
        sequence = ids + continuation
        llama.reset()
        llama.eval(sequence)
        theirs = np.array(llama.scores[:len(sequence)], dtype=np.float32)
        ours = np.array(model(mx.array(sequence)[None])[0].astype(mx.float32))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(sequence)
        deltas.append(np.abs(ours - theirs).mean())
    print(f"argmax agreement {agree}/{total}, mean |Δlogit| {np.mean(deltas):.3f}")
    assert agree >= 0.95 * total, f"argmax agreement {agree}/{total}"
    assert np.mean(deltas) < 0.5
