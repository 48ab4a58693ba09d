#!/usr/bin/env python
"""The GRPO update alone, full prompt + completion rows against the shared prompt (train/grpo/prefix.py), in one
process, interleaved (A B B A …), on one real rollout of the bench's arithmetic prompts.

Every layout runs the run's own code on the same rows: `update_chunks` (full rows: `shared=False`, the update before
the shared prompt; shared: the default), `GrpoObjective.frozen` (the reference, adapters off, β > 0) and the
compiled forward + backward, `UPDATE_ROWS` rows a piece, evaluated: `GrpoStep.accumulate_groups` (the run's: one
prompt pass per group, train/grpo/update.py) or `PreferenceStep.accumulate` over the pieces ("a prompt pass per
piece": the update before it; full rows always run so). Per layout:
the median seconds per update over the rounds (wall, and the process's CPU seconds: steadier on a shared machine) (after one untimed call of each, which compiles) and the MLX peak
during the update (`mx.reset_peak_memory` before it; the weights included). LoRA rank 8, scale 2, every linear
layer; β 0.04; G and prompts as bench_grpo.py's.

Usage: .venv/bin/python scripts/bench_grpo_update.py --model ~/.cache/mlxtune/models/smollm2-f32 [--rounds 3]
       [--group 8] [--prompts 2] [--max-completion-tokens 32] [--beta 0.04] [--seed 0] [--rows 4,3]
       [--no-full-rows] [--per-piece]
(`--rows`: the shared-prompt layout at each of these completions per gradient piece; full rows at UPDATE_ROWS;
`--per-piece`: each shared layout also with a prompt pass per piece; `--no-full-rows`: leave the full rows out.)
Figures: docs/BENCHMARKS.md, "The update shares the prompt".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import mlxtune  # noqa: E402,F401  (the fast BLAS bound first, as in the CLI)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-completion-tokens", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default="", help="completions per gradient piece to compare (default UPDATE_ROWS)")
    parser.add_argument("--no-full-rows", action="store_true", help="leave the full-row layout out")
    parser.add_argument("--per-piece", action="store_true", help="also a prompt pass per piece (the update before)")
    args = parser.parse_args()

    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.utils import load

    from bench_grpo import prompt_tokens, write_prompts
    from mlxtune.settings import LoraSettings
    from mlxtune.train.adapters import attach_adapters
    from mlxtune.train.grpo.losses import preset
    from mlxtune.memory.grpo import UPDATE_ROWS
    from mlxtune.train.grpo.objective import GrpoLoss, GrpoObjective, gradient_batches, update_chunks
    from mlxtune.train.grpo.rollout import generate_group, sample_keys
    from mlxtune.train.grpo.update import GrpoStep

    model, tokenizer = load(args.model)
    data = write_prompts(Path(tempfile.mkdtemp(prefix="bench-grpo-update-")), 16, args.seed)
    ids = [row["ids"] for row in prompt_tokens(Path(args.model), data)[: args.prompts]]
    attach_adapters(model, LoraSettings(rank=8, alpha=16.0, dropout=0.0, seed=args.seed))
    model.eval()
    rollout = generate_group(model, ids, sample_keys(mx.random.key(args.seed), len(ids), args.group),
                             max_tokens=args.max_completion_tokens, eos_token_ids=tokenizer.eos_token_ids)
    advantages = np.random.default_rng(args.seed).normal(size=len(rollout.prompt_index)).astype(np.float32)
    model.train()
    loss = GrpoLoss(model, preset("grpo", beta=args.beta))
    step = GrpoStep(model, optim.Adam(learning_rate=0.0), 0.0, loss)
    objective = GrpoObjective(model, None, step, loss, None, [], [], [], set())

    def update(layout: tuple[bool, int, bool]) -> tuple[float, float, float]:
        shared, rows, one_pass = layout
        mx.clear_cache()
        mx.reset_peak_memory()
        tic, cpu = time.perf_counter(), time.process_time()
        groups = update_chunks(ids, rollout, advantages, rows, shared=shared)
        objective.frozen(groups)
        out = step.accumulate_groups(groups) if one_pass else step.accumulate(gradient_batches(groups))
        mx.eval(out)
        return time.perf_counter() - tic, time.process_time() - cpu, mx.get_peak_memory() / 1e9

    layouts = {} if args.no_full_rows else {"full rows": (False, UPDATE_ROWS, False)}
    for rows in [int(r) for r in args.rows.split(",") if r] or [UPDATE_ROWS]:
        name = "shared prompt" if rows == UPDATE_ROWS else f"shared prompt, {rows} rows"
        layouts[name] = (True, rows, True)
        if args.per_piece:
            layouts[f"{name}, a prompt pass per piece"] = (True, rows, False)
    for layout in layouts.values():
        update(layout)  # compiles
    seconds = {name: [] for name in layouts}
    cpu_seconds = {name: [] for name in layouts}
    peaks = {name: [] for name in layouts}
    for number in range(args.rounds):
        order = list(layouts) if number % 2 == 0 else list(reversed(list(layouts)))
        for name in order:
            s, cpu, peak = update(layouts[name])
            seconds[name].append(s)
            cpu_seconds[name].append(cpu)
            peaks[name].append(peak)
    out = {"prompt_tokens": [len(p) for p in ids], "completion_lengths": rollout.lengths,
           "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_gb": peaks,
           "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
           "median_cpu_seconds": {k: statistics.median(v) for k, v in cpu_seconds.items()},
           "peak_gb_max": {k: max(v) for k, v in peaks.items()}}
    base = next(iter(layouts))  # the ratios' base: the first layout (full rows unless left out)
    out["speedup"] = {k: out["median_seconds"][base] / v for k, v in out["median_seconds"].items()}
    out["peak_ratio"] = {k: v / out["peak_gb_max"][base] for k, v in out["peak_gb_max"].items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
