#!/usr/bin/env python
"""Generation speed: mlxtune vs mlx_lm.generate vs llama.cpp (llama-cpp-python) on the same model and prompt.

For each model, the MLX directory is exported to GGUF by `mlxtune export` (float32, the precision MLX runs it in
here), the same prompt token ids go to all three, and each decodes greedily the same number of tokens. Rounds are
interleaved (the order rotates every round) so a busy machine slows all three alike; speeds are medians over rounds,
ratios to mlx_lm are taken within each round (then the median), which is robust to a load that changes.
Prompt tok/s = prompt tokens / time to process them; decode tok/s = generated tokens / time
generating them (mlx-lm's own counters for the MLX tools, wall clock around llama.cpp's eval calls).

Models: the bundled pretrained stories260K, and a SmolLM-135M-shaped model with random weights (fewer layers to
fit 2 cores, and the borrowed 512-token vocabulary; shapes matter for speed, not skill).

Usage: .venv/bin/python scripts/bench_generate.py [--models stories,smollm] [--rounds 3] [--prompt-tokens 128]
       [--new-tokens 64] [--smollm-layers 8] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlxtune  # noqa: E402,F401  (first: binds MLX to the system BLAS)

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
         "friends. One day, she saw a big red ball under a tree. ")


def prompt_ids(tokenizer, length: int) -> list[int]:
    ids = list(tokenizer.encode(STORY * 40))
    return ids[:length]


def mlxtune_round(loaded, ids, new_tokens):
    from mlxtune.inference import Sampling, run_reply

    reply = run_reply(loaded, ids, Sampling(max_tokens=new_tokens, temperature=0.0))
    return reply.prompt_tps, reply.generation_tps, reply.generation_tokens


def mlx_lm_round(model, tokenizer, ids, new_tokens):
    from mlx_lm.generate import stream_generate

    last = None
    for last in stream_generate(model, tokenizer, ids, max_tokens=new_tokens):
        pass
    return last.prompt_tps, last.generation_tps, last.generation_tokens


def llama_round(llm, ids, new_tokens):
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = llm.sample(temp=0.0)
        llm.eval([token])
    decode_s = time.perf_counter() - start
    return len(ids) / prompt_s, new_tokens / decode_s, new_tokens


def bench_model(name: str, model_dir: Path, work: Path, args) -> list[dict]:
    from llama_cpp import Llama
    from mlx_lm.utils import load

    from mlxtune.export import export
    from mlxtune.runs import open_for_inference
    from mlxtune.ui import quiet_stdout

    gguf = work / f"{name}-f32.gguf"
    with quiet_stdout():
        export(model_dir, "gguf", gguf, outtype="f32", overwrite=True)
        loaded = open_for_inference(model_dir)
        mlx_model, mlx_tokenizer = load(str(model_dir))
    ids = prompt_ids(loaded.tokenizer, args.prompt_tokens)
    # llama.cpp at one thread and at one per core: its threads spin-wait at every barrier, which a busy machine
    # (or an oversubscribed one) punishes hard; both figures say how much.
    cores = os.cpu_count() or 1
    llamas = {f"llama.cpp ({n} thread{'s' if n > 1 else ''})": Llama(
        model_path=str(gguf), n_ctx=max(512, len(ids) + args.new_tokens + 8), n_threads=n, n_threads_batch=n,
        n_batch=512, verbose=False) for n in sorted({1, cores})}
    # Warm-up (MLX compiles kernels on first use; llama.cpp maps the file).
    mlxtune_round(loaded, ids, 4)
    mlx_lm_round(mlx_model, mlx_tokenizer, ids, 4)
    for llm in llamas.values():
        llama_round(llm, ids, 4)
    # The MLX tools stop at end-of-sequence; llama.cpp then decodes as many tokens as they did.
    _, _, decoded = mlx_lm_round(mlx_model, mlx_tokenizer, ids, args.new_tokens)
    tools = {
        "mlxtune": lambda: mlxtune_round(loaded, ids, decoded),
        "mlx_lm": lambda: mlx_lm_round(mlx_model, mlx_tokenizer, ids, decoded),
    }
    for label, llm in llamas.items():
        tools[label] = lambda llm=llm: llama_round(llm, ids, decoded)
    results = {tool: [] for tool in tools}
    order = list(tools)
    for round_number in range(args.rounds):
        shift = round_number % len(order)
        for tool in order[shift:] + order[:shift]:
            results[tool].append(tools[tool]())
        print(f"  {name}: round {round_number + 1}/{args.rounds} done", file=sys.stderr)
    # Ratios are taken within each round (the tools ran back to back, under the same load), then the median.
    rows = []
    reference = results["mlx_lm"]
    for tool, runs in results.items():
        rows.append({"model": name, "tool": tool, "prompt_tokens": len(ids), "new_tokens": decoded,
                     "prompt_tps": statistics.median(r[0] for r in runs),
                     "decode_tps": statistics.median(r[1] for r in runs),
                     "prompt_ratio": statistics.median(r[0] / ref[0] for r, ref in zip(runs, reference)),
                     "decode_ratio": statistics.median(r[1] / ref[1] for r, ref in zip(runs, reference))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="stories,smollm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--smollm-layers", type=int, default=8)
    parser.add_argument("--markdown", action="store_true", help="Print the table as Markdown (for BENCHMARKS.md).")
    args = parser.parse_args()

    from mlxtune.synthetic import build_random_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            if name == "stories":
                model_dir = ROOT / "examples" / "models" / "stories260K"
                label = "stories260K"
            elif name == "smollm":
                # The borrowed tokenizer has 512 tokens: a larger vocabulary would generate ids it cannot decode.
                model_dir = build_random_model("smollm-135m", work / "smollm", layers=args.smollm_layers,
                                               vocab_size=512)
                label = f"SmolLM-135M shape, {args.smollm_layers} layers, 512 vocab"
            else:
                raise SystemExit(f"unknown model {name!r}: use stories, smollm")
            rows += bench_model(label, model_dir, work, args)

    import mlx.core as mx
    import mlx_lm
    import llama_cpp

    header = ("| model | tool | prompt tok/s | × mlx_lm | decode tok/s | × mlx_lm |\n"
              "|---|---|---:|---:|---:|---:|")
    lines = [f"| {r['model']} ({r['prompt_tokens']} + {r['new_tokens']} tokens) | {r['tool']} | "
             f"{r['prompt_tps']:.0f} | {r['prompt_ratio']:.2f} | {r['decode_tps']:.1f} | {r['decode_ratio']:.2f} |"
             for r in rows]
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} cores, MLX {mx.__version__} "
          f"({mx.default_device()}), mlx-lm {mlx_lm.__version__}, llama-cpp-python {llama_cpp.__version__}; "
          f"{date.today().isoformat()}; median of {args.rounds} interleaved rounds; load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print(header)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
