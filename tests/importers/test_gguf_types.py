"""Other GGUF types of the same model, made by llama.cpp's own quantizer from the Q4_1 file: Q4_0 (kept exactly),
Q4_K_M (K-quants: dequantized and re-quantized to 8 bits, the default; measured against llama.cpp's own agreement
with itself on the same weights) and F16 (floats; greedy text equals llama.cpp's).

Each file is made, imported and run through llama.cpp once per module (module-scoped fixtures); the tests compare
logits already computed."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from smollm import CHATS, agreement, llama_cpp_reference, llama_quantize, logits_of, per_position, smollm2_gguf

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


def _import(path: Path, name: str, **options):
    """The library entry of the GGUF at `path` (through the function `mlxtune pull` calls), and its model in float32
    (dequantized, float32 activations, as llama.cpp computes them)."""
    from mlx_lm.utils import dequantize_model, load

    from mlxtune.importers import pull_gguf

    entry = pull_gguf(str(path), name=name, **options)
    model, tokenizer = load(entry.path)
    model.set_dtype(mx.float32)
    return entry, dequantize_model(model), tokenizer


def _llama_logits(path: Path, tokenizer, chats: list | None = None) -> list:
    # llama.cpp keeps its attention cache in float16 by default; float32 here (type_k/type_v 0 = GGML_TYPE_F32), as
    # MLX computes it, so that what is compared is the weights (llama.cpp's float16 cache costs a few points).
    llama = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, logits_all=True,
                            type_k=0, type_v=0)
    return llama_cpp_reference(llama, tokenizer, chats)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder for the GGUF files and the library they are imported into, removed at the end (~1.5 GB)."""
    folder = tmp_path_factory.mktemp("gguf-types")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLXTUNE_HOME", str(folder / "home"))
        yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def q4_k_m(files):
    """The Q4_K_M file; llama.cpp's logits on the chats; ours from the default import (re-quantized to 8 bits) and
    from the exact weights (`-q none --dtype f32`), which compute as llama.cpp does without rounding activations."""
    gguf_file = llama_quantize(smollm2_gguf(), files / "smollm2-Q4_K_M.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
    entry, model, tokenizer = _import(gguf_file, "types-q4-k-m")
    theirs = _llama_logits(gguf_file, tokenizer)
    ours = logits_of(model, theirs)
    _, exact_model, _ = _import(gguf_file, "types-q4-k-m-f32", quantize="none", dtype="f32")
    return SimpleNamespace(file=gguf_file, entry=entry, tokenizer=tokenizer, theirs=theirs, ours=ours,
                           exact_model=exact_model, exact=logits_of(exact_model, theirs))


def test_q4_0_agrees_with_llama_cpp(files):
    gguf_file = llama_quantize(smollm2_gguf(), files / "smollm2-Q4_0.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)
    entry, model, tokenizer = _import(gguf_file, "types-q4-0")
    assert entry.quantization["bits"] == 4 and not entry.extra["gguf"]["notes"]  # kept exactly
    theirs = _llama_logits(gguf_file, tokenizer, CHATS[:5])  # the five chats (Q4_1 has all nine)
    agree, positions = per_position(theirs, logits_of(model, theirs))
    print(f"Q4_0: first five chats per position {agree}/{positions}")
    # Measured (f32 cache): 283/304 (93.1%) — exactly llama.cpp's own agreement between this file and its weights
    # written as float32 (scripts/gguf_q8_activations.py Q4_0: ours equals llama.cpp-F32 at 495/495 contexts of the
    # nine chats, and llama.cpp-Q4_0 at 479/495, 96.8%). The weights are bit for bit; every miss is llama.cpp's 8-bit
    # rounding of the activations of its Q4_0/Q8_0 dot products at a near-tie. Floor: the measurement less 3
    # positions. The 95% per position on these five chats is above what llama.cpp reaches against itself.
    assert agree >= 280, f"{agree}/{positions} positions"


def test_k_quant_exact_weights_compute_what_llama_cpp_computes(q4_k_m, files):
    """The K-quant import is right: without activation rounding on either side (llama.cpp on the file's weights
    written as float32 by its own quantizer, our `-q none --dtype f32` import) the logits are equal to float32
    summation order (measured on all nine chats: 495/495 argmaxes, mean |Δlogit| 1e-5, largest 1e-4; one chat here)."""
    float_file = llama_quantize(q4_k_m.file, files / "smollm2-Q4_K_M-f32.gguf", llama_cpp.LLAMA_FTYPE_ALL_F32)
    theirs = _llama_logits(float_file, q4_k_m.tokenizer, CHATS[1:2])
    float_file.unlink()  # 540 MB
    ours = logits_of(q4_k_m.exact_model, theirs)
    largest = max(float(np.abs(a - b).max()) for (_, a), (_, b) in zip(theirs, ours))
    agree, positions = per_position(theirs, ours)
    print(f"Q4_K_M exact weights vs llama.cpp F32: {agree}/{positions} positions, largest |Δlogit| {largest:.5f}")
    assert agree == positions and largest < 1e-3, (agree, positions, largest)


def test_k_quant_agrees_with_llama_cpp_as_llama_cpp_agrees_with_itself(q4_k_m):
    """llama.cpp rounds the input of every quantized dot product to 8 bits (Q8_0 for the file's Q5_0/Q8_0 matrices,
    Q8_K in blocks of 256 for its Q4_K/Q6_K ones), so on its Q4_K_M file it parts from the same weights computed
    without that rounding (our exact import, equal to llama.cpp's float32 computation: the test above) at near-ties.
    That is the floor: our default import (re-quantized to 8 bits) agrees with llama.cpp's Q4_K_M about as often."""
    entry = q4_k_m.entry
    assert entry.quantization["bits"] == 8 and "re-quantized to 8-bit" in entry.extra["gguf"]["notes"][0]
    agree, total, delta, misses = agreement(q4_k_m.theirs, q4_k_m.ours)
    own, _, own_delta, own_misses = agreement(q4_k_m.theirs, q4_k_m.exact)
    to_exact, _, _, _ = agreement(q4_k_m.exact, q4_k_m.ours)
    five, positions = per_position(q4_k_m.theirs, q4_k_m.ours, chats=5)
    print(f"Q4_K_M: ours {agree}/{total} distinct contexts (the exact weights: {own}/{total}), first five chats per "
          f"position {five}/{positions}, ours vs the exact weights {to_exact}/{total}, mean |Δlogit| {delta:.3f} (the "
          f"exact weights: {own_delta:.3f}), top-two gaps at our misses {sorted(round(m, 3) for m in misses)}, at "
          f"the exact weights' {sorted(round(m, 3) for m in own_misses)}")
    # Measured (f32 cache, the nine chats' 495 distinct contexts): the exact weights (= llama.cpp on them in float32)
    # agree with llama.cpp's Q4_K_M at 462 (93.3%): llama.cpp's own floor. Ours re-quantized to 8 bits: 461 (93.1%),
    # margin 1 point (5 contexts); the measure (first five chats, per position) 293/304 (96.4%). Ours vs the
    # exact weights: 475/495 (96.0%), what the 8-bit re-quantization costs; floor 95%.
    assert five >= 0.95 * positions, f"the issue's measure: {five}/{positions} positions of the first five chats"
    assert agree >= own - 0.01 * total, f"{agree}/{total}, llama.cpp's own floor {own}/{total}"
    assert to_exact >= 0.95 * total, f"ours vs the file's exact weights: {to_exact}/{total}"
    assert delta < 0.5 and max(misses, default=0) <= max(own_misses, default=0), (delta, misses, own_misses)


def test_f16_greedy_text_equals_llama_cpp(files):
    from mlx_lm.generate import generate_step

    gguf_file = llama_quantize(smollm2_gguf(), files / "smollm2-f16.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_F16)
    entry, model, tokenizer = _import(gguf_file, "types-f16")
    assert entry.quantization is None
    llama = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, n_threads=2, verbose=False)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    theirs = llama_greedy(llama, ids, 32)
    ours = [int(token) for token, _ in generate_step(mx.array(ids), model, max_tokens=len(theirs))]  # greedy
    assert len(theirs) == 32 and ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
