#!/usr/bin/env python
"""mlxtune's GRPO vs mlx-lm-lora's GRPO on the same model, prompts, reward, group size, completion length and LoRA.

Both tools train the same MLX model folder on the same arithmetic prompts ("What is 17 + 25? …", the `answer`
field holding the sum), written once by this script: as mlxtune's prompt-only JSONL (`{"prompt", "answer"}`) and,
for mlx-lm-lora, as the (prompt ids, answer ids, prompt text, answer text) tuples its `train_grpo` takes, the prompt
ids rendered by mlxtune's template code so both tools sample from exactly the same tokens. One reward function, one
file (`arith` below: 1 for the right number, 0.2 for a wrong one, 0 for none), used by mlxtune as `FILE.py:arith`
and handed to mlx-lm-lora as its reward function (its call passes `answer=` and `types=`; TRL's convention takes
both). Same group size G, prompts per step P, completion limit N, temperature (top-p 1, no top-k), stop at the
model's eos only, LoRA rank 8 / scale 2 on every linear layer of every block, Adam, learning rate, β (KL to the
reference), the GRPO (sequence-mean) loss, one update per rollout, same steps and seed.

mlx-lm-lora is run as its `train.py` runs GRPO (`train_grpo`, a second copy of the model loaded as the reference),
called from Python because its CLI tokenizes prompts with its own system prompt and chat template (stories260K has
none). Its rollout (`generate_grpo`) is timed by wrapping that function in its module; nothing else is changed.

Each tool runs in its own child process, rounds interleaved (A B, B A, …) so the machine's noise hits both; per
tool the median over rounds. Reported per tool: rollout tok/s (generated tokens, eos included / rollout wall time,
prefill included), seconds per step (after the first two, which compile), peak MLX memory (`mx.get_peak_memory`)
and the child's peak RSS (`wait4`), the mean reward over the last half of the steps (the tools' own on-policy
rollouts), and the ratios mlxtune / mlx-lm-lora.

mlxtune side: the `mlxtune grpo` command when this checkout has it (`--mlxtune-side cli`, the default when
available), else `components`: a minimal loop over the landed parts (grpo/rollout.py's `generate_group`,
grpo/losses.py's `grpo_loss`, adapters switched off for the reference) — a check of the timing method, not the
command's figures.

mlx-lm-lora runs from its own virtual environment (`--competitor-python`, default /work/venv-mlxlora/bin/python):
    python -m venv /work/venv-mlxlora
    /work/venv-mlxlora/bin/pip install "mlx[cpu]==0.32.4" "mlx-lm==0.32.2" "mlx-lm-lora==5.10.2"

Usage: .venv/bin/python scripts/bench_grpo.py [--models stories,smollm,MODEL_FOLDER] [--tokenizer SMOLLM2_FOLDER]
       [--iters 8] [--rounds 2] [--group 8] [--prompts-per-step 2] [--max-completion-tokens 32]
       [--mlxtune-side auto|cli|components|none] [--accumulation-row]
Figures and what they mean: docs/BENCHMARKS.md, "Reinforcement learning (GRPO) vs mlx-lm-lora".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 2
COMPETITOR_PYTHON = "/work/venv-mlxlora/bin/python"

REWARD_SOURCE = '''"""The benchmark's reward, one file for both tools (TRL's convention; mlx-lm-lora also passes `types=`)."""
import re


def arith(prompts, completions, answer, **kwargs):
    """1 if the number after the last '####' (else the last number) is the answer, 0.2 for a wrong number, 0 for
    no number."""
    scores = []
    for completion, expected in zip(completions, answer):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        numbers = re.findall(r"####\\s*(-?\\d+)", text) or re.findall(r"-?\\d+", text)
        scores.append(0.0 if not numbers else 1.0 if numbers[-1] == str(expected).strip() else 0.2)
    return scores
'''


# ------------------------------------------------------------------------------------------- shared inputs

def write_prompts(out: Path, count: int, seed: int = 0) -> Path:
    """Small sums with their answer, as mlxtune's prompt-only JSONL (train and valid)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", count), ("valid", max(4, count // 8))):
        rows = []
        for _ in range(n):
            a, b = rng.randint(2, 49), rng.randint(2, 49)
            rows.append({"prompt": f"What is {a} + {b}? Think briefly, then give the answer on the last line as "
                                   f"#### N.", "answer": str(a + b)})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def prompt_tokens(model_dir: Path, data: Path) -> list[dict]:
    """Every train prompt as mlxtune renders it (the model's template, else mlxtune's fallback) → token ids."""
    from mlx_lm.utils import load_tokenizer

    from mlxtune.data.prompts import parse_prompt_record, prompt_ids
    from mlxtune.data.template import choose_template

    tokenizer = load_tokenizer(model_dir)
    template = choose_template(tokenizer, "chat").template
    rows = []
    for number, line in enumerate((data / "train.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        record = parse_prompt_record(row, f"train.jsonl:{number}")
        rows.append({"ids": prompt_ids(record, tokenizer, template), "prompt": row["prompt"], "answer": row["answer"]})
    return rows


# ------------------------------------------------------------------------------------------- children

def child_mlx_lm_lora(spec: dict) -> dict:
    import importlib.util

    sys.path.insert(0, str(ROOT))
    import mlxtune  # noqa: F401  (first: binds MLX to the same system BLAS as mlxtune's child; nothing else of it runs)
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer import grpo_trainer
    from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo

    loaded = importlib.util.spec_from_file_location("bench_reward", spec["reward_file"])
    reward_module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(reward_module)

    rollouts = []  # (seconds, generated tokens) per step
    generate = grpo_trainer.generate_grpo

    def timed_generate(*args, **kwargs):
        tic = time.perf_counter()
        completions, texts, indices = generate(*args, **kwargs)
        rollouts.append((time.perf_counter() - tic, int(sum(c.size for c in completions))))
        return completions, texts, indices

    grpo_trainer.generate_grpo = timed_generate  # train_grpo looks it up in its module at each step

    mx.random.seed(spec["seed"])
    np.random.seed(spec["seed"])
    model, tokenizer = load(spec["model"])
    reference, _ = load(spec["model"])  # as its train.py does for grpo: a second copy as the reference
    reference.freeze()
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": spec["rank"], "scale": spec["scale"], "dropout": 0.0})
    dataset = [(row["ids"], list(tokenizer.encode(row["answer"])), row["prompt"], row["answer"], None)
               for row in spec["prompts"]]

    class Report(TrainingCallback):  # one report per step (steps_per_report=1): its time and its info
        stamps = [time.perf_counter()]
        infos = []

        def on_train_loss_report(self, info):
            self.stamps.append(time.perf_counter())
            self.infos.append(info)

    report = Report()
    adapter = Path(spec["out"]) / "adapters.safetensors"
    args = GRPOTrainingArgs(
        batch_size=spec["prompts_per_step"], iters=spec["iters"], steps_per_report=1, steps_per_eval=10**9,
        steps_per_save=10**9, max_seq_length=4096, adapter_file=str(adapter), group_size=spec["group"],
        max_completion_length=spec["max_completion_tokens"], beta=spec["beta"], epsilon=0.2, epsilon_high=0.2,
        temperature=spec["temperature"], top_p=1.0, top_k=0, min_p=0.0, grpo_loss_type="grpo")
    peak_before = mx.get_peak_memory()
    train_grpo(model, reference if spec["beta"] else None, tokenizer, optim.Adam(learning_rate=spec["learning_rate"]),
               dataset, None, reward_funcs=[reward_module.arith], args=args, training_callback=report,
               end_answer_token="")
    return {"step_seconds": [b - a for a, b in zip(report.stamps, report.stamps[1:])],
            "rewards": [info["train_total_rewards_mean"] for info in report.infos],
            "rollout_seconds": [r[0] for r in rollouts], "rollout_tokens": [r[1] for r in rollouts],
            "peak_memory_gb": max(mx.get_peak_memory(), peak_before) / 1e9}


def child_mlxtune_components(spec: dict) -> dict:
    """A minimal GRPO loop over mlxtune's landed parts: a check of the timing method until `mlxtune grpo` lands."""
    import mlxtune  # noqa: F401  (BLAS first)
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.utils import load

    from mlxtune.settings import LoraSettings
    from mlxtune.train.adapters import attach_adapters
    from mlxtune.train.grpo.losses import group_advantages, grpo_loss, preset, selected_log_probs
    from mlxtune.train.grpo.rewards import parse_rewards, score
    from mlxtune.train.grpo.rollout import generate_group, sample_keys
    from mlxtune.train.preference.objective import adapters_off

    model, tokenizer = load(spec["model"])
    mx.random.seed(spec["seed"])
    attach_adapters(model, LoraSettings(rank=spec["rank"], alpha=spec["scale"] * spec["rank"], dropout=0.0))
    rewards = parse_rewards([f"{spec['reward_file']}:arith"])
    config = preset("grpo", beta=spec["beta"])
    optimizer = optim.Adam(learning_rate=spec["learning_rate"])
    rng = np.random.default_rng(spec["seed"])
    key = mx.random.key(spec["seed"])
    group, per_step = spec["group"], spec["prompts_per_step"]

    def loss_fn(inputs, targets, take, mask, advantages, reference):
        """The completion's log-probs (read at its positions of prompt + completion) under the GRPO loss."""
        log_probs = mx.take_along_axis(selected_log_probs(model(inputs), targets), take, axis=1)
        return grpo_loss(log_probs, advantages, mask, config, reference_log_probs=reference)[0]

    value_and_grad = nn.value_and_grad(model, loss_fn)
    steps, rollouts, rewards_seen = [], [], []
    for _ in range(spec["iters"]):
        tic = time.perf_counter()
        chosen = [spec["prompts"][i] for i in rng.choice(len(spec["prompts"]), per_step, replace=False)]
        prompts = [row["ids"] for row in chosen]
        key, step_key = mx.random.split(key)
        model.eval()
        rollout = generate_group(model, prompts, sample_keys(step_key, per_step, group),
                                 max_tokens=spec["max_completion_tokens"], eos_token_ids=tokenizer.eos_token_ids,
                                 temperature=spec["temperature"])
        rollouts.append((rollout.seconds, rollout.generated_tokens))
        rows = rollout.prompt_index
        texts = [tokenizer.decode([t for t in rollout.completion(r) if t not in tokenizer.eos_token_ids])
                 for r in range(len(rows))]
        scores = score(rewards, [chosen[p]["prompt"] for p in rows], texts,
                       [{"answer": chosen[p]["answer"]} for p in rows], [f"train:{p}" for p in rows])
        rewards_seen.append(float(scores.total.mean()))
        advantages = group_advantages(mx.array(scores.total, dtype=mx.float32), group)
        # prompt + completion per row, right-padded
        length = rollout.tokens.shape[1]
        completion = np.array(rollout.tokens)
        sequences = np.zeros((len(rows), max(len(p) for p in prompts) + length), np.int32)
        for row, p in enumerate(rows):
            sequences[row, : len(prompts[p]) + length] = list(prompts[p]) + completion[row].tolist()
        take = mx.array(np.stack([np.arange(len(prompts[p]) - 1, len(prompts[p]) - 1 + length) for p in rows]))
        inputs, targets = mx.array(sequences[:, :-1]), mx.array(sequences[:, 1:])
        reference = None
        if spec["beta"]:
            with adapters_off(model):
                reference = mx.stop_gradient(mx.take_along_axis(selected_log_probs(model(inputs), targets), take,
                                                                axis=1))
        model.train()
        loss, grads = value_and_grad(inputs, targets, take, rollout.mask, advantages, reference)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss)
        steps.append(time.perf_counter() - tic)
    return {"step_seconds": steps, "rewards": rewards_seen, "rollout_seconds": [r[0] for r in rollouts],
            "rollout_tokens": [r[1] for r in rollouts], "peak_memory_gb": mx.get_peak_memory() / 1e9}


def child_mlxtune_cli(spec: dict, accumulate: bool = False) -> dict:
    """`mlxtune grpo` as a user runs it, one metrics line per step (`--report-every 1`). Seconds per step: the time
    between consecutive lines, from each line's own `time` (when mlxtune wrote it; the same measure as mlx-lm-lora's
    per-step report, taken in its process). Not by watching the file: a watcher polling it every 20 ms on these 2
    cores slowed mlxtune's steps by ≈10% (docs/BENCHMARKS.md). Rollout tok/s, reward and MLX peak from the lines
    themselves. `accumulate`: the step's P prompts as P micro-batches of one prompt (`--batch-size 1
    --grad-accumulation P`): G rows per rollout and per update."""
    prompts, micro = (1, spec["prompts_per_step"]) if accumulate else (spec["prompts_per_step"], 1)
    out = Path(spec["out"]) / "run"
    command = [sys.executable, "-m", "mlxtune", "grpo", "--model", spec["model"], "--data", spec["data"],
               "--reward", f"{spec['reward_file']}:arith", "--group-size", str(spec["group"]),
               "--batch-size", str(prompts), "--grad-accumulation", str(micro),
               "--max-completion-tokens", str(spec["max_completion_tokens"]),
               "--temperature", str(spec["temperature"]), "--iters", str(spec["iters"]), "--rank", str(spec["rank"]),
               "--alpha", str(spec["scale"] * spec["rank"]), "--learning-rate", str(spec["learning_rate"]),
               "--schedule", "constant", "--warmup-steps", "0", "--beta", str(spec["beta"]),
               "--seed", str(spec["seed"]), "--report-every", "1", "--sample-every", "0", "--out", str(out), "--json"]
    metrics = out / "metrics.jsonl"
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0 or not metrics.is_file():
        tail = (done.stdout.strip().splitlines() or ["no output"])[-1]
        return {"error": f"mlxtune grpo exit {done.returncode}: {tail}"}
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "train_reward" in r]
    stamps = [r["time"] for r in train]
    return {"step_seconds": [None] + [b - a for a, b in zip(stamps, stamps[1:])],  # step 1's start is not logged
            "rewards": [r["train_reward"] for r in train],
            "rollout_seconds": [r["train_completion_length"] * r["train_completions"]
                                / r["train_rollout_tokens_per_second"] for r in train],
            "rollout_tokens": [r["train_completion_length"] * r["train_completions"] for r in train],
            "peak_memory_gb": max(r.get("peak_memory_gb") or 0.0 for r in train)}


# ------------------------------------------------------------------------------------------- driver

def run_child(python: str, tool: str, spec: dict, work: Path) -> dict:
    """The tool in its own process; its peak RSS (descendants included) from wait4."""
    spec_file = work / f"spec-{tool.split()[0]}-{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    log = spec_file.with_suffix(".log")  # the child's own output (its progress bar), to follow a long run
    with tempfile.TemporaryFile("w+") as stdout, open(log, "w+") as stderr:
        child = subprocess.Popen([python, __file__, "--child", tool, str(spec_file)], stdout=stdout, stderr=stderr,
                                 env=env, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not lines:
        return {"error": ((err or out).strip().splitlines() or ["no output"])[-1]}
    result = json.loads(lines[-1][len("RESULT "):])
    result["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9  # Linux: kilobytes
    return result


def summarize(result: dict) -> dict:
    """Per-run figures: rollout tok/s and s/step after the warm-up steps, reward over the last half."""
    pairs = [(s, t) for s, t in zip(result["rollout_seconds"][WARMUP_STEPS:], result["rollout_tokens"][WARMUP_STEPS:])
             if s and t]
    steps = [s for s in result["step_seconds"][WARMUP_STEPS:] if s]
    rewards = [r for r in result["rewards"] if r is not None]
    half = rewards[len(rewards) // 2:] or rewards
    return {"rollout": sum(t for _, t in pairs) / sum(s for s, _ in pairs) if pairs else float("nan"),
            "step": statistics.median(steps) if steps else float("nan"),
            "mlx_peak": result["peak_memory_gb"], "rss": result.get("peak_rss_gb", float("nan")),
            "reward": statistics.mean(half) if half else float("nan"),
            "tokens": statistics.mean(result["rollout_tokens"]) if result["rollout_tokens"] else float("nan")}


def mlxtune_has_grpo() -> bool:
    done = subprocess.run([sys.executable, "-m", "mlxtune", "grpo", "--help"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return done.returncode == 0


def versions(python: str) -> str:
    code = ("import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in "
            "('mlx', 'mlx-lm', 'mlx-lm-lora') if __import__('importlib.util').util.find_spec(p.replace('-', '_'))))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="stories,smollm",
                        help="comma-separated: stories (bundled stories260K), smollm (SmolLM-135M shape, random "
                             "weights), or a path to an MLX model folder")
    parser.add_argument("--smollm-layers", type=int, default=4)
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder for the random SmolLM-shaped model (e.g. an imported SmolLM2's): "
                             "its real 49k vocabulary; default the bundled 512-token one")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--max-completion-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--mlxtune-side", choices=("auto", "cli", "components", "none"), default="auto")
    parser.add_argument("--accumulation-row", action="store_true",
                        help="also run mlxtune with the step's prompts as one-prompt micro-batches (less memory)")
    parser.add_argument("--competitor-python", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("iters", "rounds", "group", "prompts_per_step", "max_completion_tokens", "rank", "prompts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.iters <= WARMUP_STEPS:
        parser.error(f"--iters must exceed the {WARMUP_STEPS} warm-up steps that are not timed")
    if args.prompts < args.prompts_per_step:
        parser.error("--prompts must be at least --prompts-per-step")
    return args


CHILDREN = {"mlx-lm-lora": child_mlx_lm_lora, "mlxtune-components": child_mlxtune_components,
            "mlxtune": child_mlxtune_cli,
            "mlxtune --batch-size 1 --grad-accumulation P": lambda spec: child_mlxtune_cli(spec, accumulate=True)}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        tool, spec_path = args.child
        result = CHILDREN[tool](json.loads(Path(spec_path).read_text()))
        print("RESULT " + json.dumps(result), flush=True)
        return

    sys.path.insert(0, str(ROOT))
    import mlxtune  # noqa: F401

    competitor = args.competitor_python or (COMPETITOR_PYTHON if Path(COMPETITOR_PYTHON).is_file() else sys.executable)
    side = args.mlxtune_side
    if side == "auto":
        side = "cli" if mlxtune_has_grpo() else "components"
    ours = {"cli": "mlxtune", "components": "mlxtune-components", "none": None}[side]
    tools = ["mlx-lm-lora"] + ([ours] if ours else [])
    if args.accumulation_row and ours == "mlxtune":
        tools.append("mlxtune --batch-size 1 --grad-accumulation P")
    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    data = write_prompts(work / "prompts", args.prompts)
    reward_file = work / "bench_reward.py"
    reward_file.write_text(REWARD_SOURCE, encoding="utf-8")
    settings = {"group": args.group, "prompts_per_step": args.prompts_per_step,
                "max_completion_tokens": args.max_completion_tokens, "temperature": args.temperature,
                "beta": args.beta, "rank": args.rank, "scale": 2.0, "learning_rate": args.learning_rate,
                "iters": args.iters, "reward_file": str(reward_file), "data": str(data)}
    started = datetime.now(timezone.utc)
    table = []
    for name in args.models.split(","):
        if name == "stories":
            model_dir, label = ROOT / "examples" / "models" / "stories260K", "stories260K"
        elif name == "smollm":
            from mlxtune.synthetic import build_random_model

            if args.tokenizer:  # a real tokenizer: the shape's real vocabulary (where the head's memory goes)
                model_dir = build_random_model("smollm-135m", work / "smollm", layers=args.smollm_layers,
                                               tokenizer_dir=args.tokenizer)
                label = f"SmolLM-135M shape, {args.smollm_layers} blocks, 49k vocab, random weights"
            else:  # the bundled tokenizer has 512 tokens: a larger vocabulary would sample ids it cannot decode
                model_dir = build_random_model("smollm-135m", work / "smollm", layers=args.smollm_layers,
                                               vocab_size=512)
                label = f"SmolLM-135M shape, {args.smollm_layers} blocks, 512 vocab, random weights"
        else:
            model_dir, label = Path(name), Path(name).name
        prompts = prompt_tokens(model_dir, data)
        runs: dict[str, list[dict]] = {tool: [] for tool in tools}
        for round_number in range(args.rounds):
            for tool in (tools if round_number % 2 == 0 else tools[::-1]):
                out = work / f"{name.replace('/', '_')}-{tool.split()[0]}{len(tool)}-{round_number}"
                out.mkdir(parents=True, exist_ok=True)
                spec = {**settings, "model": str(model_dir), "prompts": prompts, "seed": round_number, "out": str(out)}
                result = run_child(competitor if tool == "mlx-lm-lora" else sys.executable, tool, spec, work)
                runs[tool].append(result)
                if "error" in result:
                    print(f"{label} {tool} #{round_number}: {result['error']}", flush=True)
                    continue
                s = summarize(result)
                print(f"{label} {tool} #{round_number}: rollout {s['rollout']:.0f} tok/s, {s['step']:.2f} s/step, "
                      f"MLX peak {s['mlx_peak']:.3f} GB, RSS {s['rss']:.3f} GB, reward {s['reward']:.3f}, "
                      f"{s['tokens']:.0f} tokens per rollout", flush=True)
        table.append((label, runs))

    print(f"\n{platform.platform()} · {os.cpu_count()} cores (shared with other jobs: ratios count, not absolutes) · "
          f"{started:%Y-%m-%d %H:%M} UTC")
    print(f"mlxtune: {versions(sys.executable)}; competitor: {versions(competitor)}")
    print(f"G={args.group}, {args.prompts_per_step} prompts/step, ≤{args.max_completion_tokens} new tokens, "
          f"T={args.temperature}, beta={args.beta}, LoRA r{args.rank} scale 2 all linear layers, lr "
          f"{args.learning_rate}, {args.iters} steps (first {WARMUP_STEPS} untimed), {args.rounds} rounds, medians")
    print("| model | tool | rollout tok/s | s/step | MLX peak | peak RSS | mean reward (last half) |"
          " speed × (rollout / step) | memory × (MLX / RSS) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, runs in table:
        medians = {}
        for tool, results in runs.items():
            good = [summarize(r) for r in results if "error" not in r]
            if good:
                medians[tool] = {k: statistics.median(g[k] for g in good) for k in good[0]}
                medians[tool]["reward"] = statistics.mean(g["reward"] for g in good)
        base = medians.get("mlx-lm-lora")
        for tool, m in medians.items():
            ratios = " — | — |"
            if base and tool != "mlx-lm-lora":
                ratios = (f" {m['rollout'] / base['rollout']:.2f}× / {base['step'] / m['step']:.2f}× |"
                          f" {m['mlx_peak'] / base['mlx_peak']:.2f}× / {m['rss'] / base['rss']:.2f}× |")
            print(f"| {label} | {tool} | {m['rollout']:.0f} | {m['step']:.2f} | {m['mlx_peak']:.3f} GB | "
                  f"{m['rss']:.3f} GB | {m['reward']:.3f} |{ratios}")
        for tool, results in runs.items():
            if tool not in medians:
                print(f"| {label} | {tool} | failed: {results[0]['error']} |")


if __name__ == "__main__":
    main()
