"""Other GGUF types of the same model, made by llama.cpp's own quantizer from the Q4_1 file: Q4_0 (kept exactly),
Q4_K_M (K-quants: dequantized and re-quantized to 8 bits, the default) and F16 (floats; greedy text equals
llama.cpp's)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import mlx.core as mx
import pytest

from smollm import smollm2_gguf, teacher_forced_agreement

llama_cpp = pytest.importorskip("llama_cpp", reason="interop suite: pip install -e '.[interop]'")

PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nGive me three tips for "
          "learning to code, one line each.<|im_end|>\n<|im_start|>assistant\n")


def llama_greedy(llama, ids: list[int], n: int) -> list[int]:
    out = []
    for token in llama.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if len(out) == n or token == llama.token_eos():
            break
        out.append(token)
    return out


def llama_quantize(source: Path, out: Path, ftype: int) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = ftype, True, 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def _import(path: Path, home: Path, monkeypatch):
    from mlx_lm.utils import dequantize_model, load

    from mlxtune.importers import pull_gguf

    monkeypatch.setenv("MLXTUNE_HOME", str(home))
    entry = pull_gguf(str(path))
    model, tokenizer = load(entry.path)
    model.set_dtype(mx.float32)  # float32 activations, as llama.cpp computes them
    return entry, dequantize_model(model), tokenizer


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_K_M"])
def test_quantized_types_agree_with_llama_cpp(tmp_path, monkeypatch, kind):
    gguf_file = llama_quantize(smollm2_gguf(), tmp_path / f"smollm2-{kind}.gguf",
                               getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}"))
    entry, model, tokenizer = _import(gguf_file, tmp_path / "home", monkeypatch)
    if kind == "Q4_0":
        assert entry.quantization["bits"] == 4 and not entry.extra["gguf"]["notes"]
    else:  # K-quants have no exact MLX form: the import says so and re-quantizes to 8 bits
        assert entry.quantization["bits"] == 8 and "re-quantized to 8-bit" in entry.extra["gguf"]["notes"][0]
    # llama.cpp keeps its attention cache in float16 by default; float32 here (type_k/type_v 0 = GGML_TYPE_F32), as
    # MLX computes it, so that what is compared is the weights (llama.cpp's float16 cache costs a few points).
    llama = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=512, n_threads=2, verbose=False, logits_all=True,
                            type_k=0, type_v=0)
    agree, total, delta, misses = teacher_forced_agreement(llama, model, tokenizer)
    print(f"{kind}: argmax agreement {agree}/{total} distinct contexts, mean |Δlogit| {delta:.3f}, "
          f"llama.cpp's top-two gap at the misses {sorted(round(m, 3) for m in misses)}")
    # Measured (f32 cache, 495 distinct contexts; 2 loaded cores): Q4_0 479/495 (96.8%), Q4_K_M re-quantized to 8
    # bits 461/495 (93.1%). On the first five chats alone (~200 contexts, one miss 0.5%) they were 210/216 and
    # 185/195, both within a miss or two of 95%; the K-quant stays under it with more chats. Every miss a near-tie in
    # llama.cpp's own logits (top two within 0.71 here; 0.94 at one of 610 contexts of a larger chat set). What is
    # left is llama.cpp's arithmetic, not the import: the Q4_0 weights are bit for bit, and llama.cpp rounds the input
    # of every Q4_0/Q5_0/Q8_0 dot product to 8 bits (Q8_0), chaotically: a 1-ulp difference in an RMSNorm flips an
    # 8-bit code, and our own model with that rounding emulated parts from itself as often (docs/MODELS.md,
    # scripts/gguf_q8_activations.py). The K-quant's floor is its measurement less ~10 contexts (2 points).
    floor = {"Q4_0": 0.95, "Q4_K_M": 0.91}[kind]
    assert agree >= floor * total and delta < 0.5, f"{kind}: argmax agreement {agree}/{total}, mean |Δlogit| {delta}"
    assert max(misses, default=0) < 1.0, f"{kind}: a miss where llama.cpp is sure: top-two gaps {misses}"


def test_f16_greedy_text_equals_llama_cpp(tmp_path, monkeypatch):
    from mlx_lm.generate import generate_step

    gguf_file = llama_quantize(smollm2_gguf(), tmp_path / "smollm2-f16.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_F16)
    entry, model, tokenizer = _import(gguf_file, tmp_path / "home", monkeypatch)
    assert entry.quantization is None
    llama = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, n_threads=2, verbose=False)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    theirs = llama_greedy(llama, ids, 32)
    ours = [int(token) for token, _ in generate_step(mx.array(ids), model, max_tokens=len(theirs))]  # greedy
    assert len(theirs) == 32 and ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
