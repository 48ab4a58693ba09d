#!/usr/bin/env python
"""GRPO rollout speed: a group decoded as one batch after one shared prefill, vs one sample at a time.

Both paths are mlxtune's `generate_group` (the one-at-a-time path calls it with one key per call, prefilling the
prompt each time, as a sampler without group batching does); same prompt, same per-sample keys, same number of
new tokens (no early stop, so both generate exactly G × new-tokens tokens). Rounds alternate the order so a busy
machine slows both alike; the ratio is taken within each round, then the median.
Rollout tok/s = generated tokens / wall time including the prefill(s).

Models: the bundled stories260K, and a SmolLM-135M-shaped model with random weights (mlxtune/synthetic.py; fewer
layers to fit a small machine, the borrowed 512-token vocabulary).

Usage: .venv/bin/python scripts/bench_rollout.py [--group 8] [--prompt-tokens 128] [--new-tokens 64]
       [--rounds 3] [--smollm-layers 8] [--models stories,smollm]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlxtune  # noqa: E402,F401  (first: binds MLX to the system BLAS)

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
         "friends. One day, she saw a big red ball under a tree. ")


def measure(model_dir: Path, args) -> tuple[float, float, float]:
    import mlx.core as mx
    from mlx_lm.utils import load

    from mlxtune.train.grpo.rollout import generate_group, sample_keys

    model, tokenizer = load(str(model_dir))
    prompt = list(tokenizer.encode(STORY * 40))[: args.prompt_tokens]
    options = dict(max_tokens=args.new_tokens, eos_token_ids=[], temperature=1.0)
    generate_group(model, [prompt], sample_keys(mx.random.key(0), 1, 2), **options)  # warm-up
    grouped, alone, ratios = [], [], []
    for round_number in range(args.rounds):
        keys = sample_keys(mx.random.key(round_number), 1, args.group)
        speeds = {}
        for path in (("group", "alone") if round_number % 2 == 0 else ("alone", "group")):
            if path == "group":
                rollout = generate_group(model, [prompt], keys, **options)
                speeds[path] = rollout.generated_tokens / rollout.seconds
            else:
                runs = [generate_group(model, [prompt], keys[i:i + 1], **options) for i in range(args.group)]
                speeds[path] = sum(r.generated_tokens for r in runs) / sum(r.seconds for r in runs)
        grouped.append(speeds["group"])
        alone.append(speeds["alone"])
        ratios.append(speeds["group"] / speeds["alone"])
    return statistics.median(grouped), statistics.median(alone), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smollm-layers", type=int, default=8)
    parser.add_argument("--models", default="stories,smollm")
    args = parser.parse_args()
    import mlx.core as mx

    print(f"device {mx.default_device()}, group {args.group}, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens per sample, {args.rounds} rounds")
    print(f"{'model':42} {'group tok/s':>12} {'alone tok/s':>12} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            if name == "stories":
                model_dir, label = ROOT / "examples" / "models" / "stories260K", "stories260K"
            else:
                from mlxtune.synthetic import build_random_model

                # the borrowed tokenizer has 512 tokens: a larger vocabulary would generate ids it cannot decode
                model_dir = build_random_model("smollm-135m", Path(work) / "smollm", layers=args.smollm_layers,
                                               vocab_size=512)
                label = f"SmolLM-135M shape, {args.smollm_layers} layers, 512 vocab"
            group, alone, ratio = measure(model_dir, args)
            print(f"{label:42} {group:12.0f} {alone:12.0f} {ratio:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
