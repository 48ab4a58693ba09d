#!/usr/bin/env python
"""mlx-lm-lora's DPO vs mlxtune's DPO on the same model, pairs, LoRA layers and batch, side by side.

Both tools train the same random-weight model with a real architecture shape (real vocabulary size: that is where
the output head's memory goes) on the same token ids: WikiSQL questions (prompt) with their SQL (chosen) and a
word-order corruption of it (rejected), rendered and tokenized once by mlxtune, then handed to both. Same LoRA
(every linear layer of every block, rank 8, scale 2, no dropout), Adam at a constant learning rate, beta 0.1,
same batch size and number of steps; each tool runs in its own child process (peak MLX memory from MLX), and the
runs are interleaved (A B A B …) so machine noise hits both alike.

mlx-lm-lora as shipped: a second copy of the model as the reference, full `[batch, seq, vocab]` logits for the
chosen and the rejected rows. mlxtune: the reference is the same weights with the adapters switched off, log-probs
through the head for answer positions only; and with `--precompute-reference` the reference pass leaves the step.

Reported: answer tokens per second (chosen + rejected answer tokens, steps after the first two, which compile),
peak memory, and the DPO loss of both adapters after the same steps, measured by one evaluator (mlxtune's, with
the base model as reference) on the same held-out pairs.

mlx-lm-lora needs packages that mlxtune's environment doesn't pin (datasets, pandas, pyarrow): it runs from its own
virtual environment, `--competitor-python` (default /work/venv-mlxlmlora/bin/python, else this interpreter):
    python -m venv /work/venv-mlxlmlora
    /work/venv-mlxlmlora/bin/pip install "mlx[cpu]==0.32.4" "mlx-lm==0.32.2" "mlx-lm-lora==5.10.2"

Usage: .venv/bin/python scripts/bench_preference.py [--cases smollm,qwen] [--iters 8] [--repeats 2]
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
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKISQL = ROOT / "examples" / "data" / "wikisql"
CASES = {"smollm": ("smollm-135m", 4), "qwen": ("qwen2.5-0.5b", 2)}  # shape, blocks kept (time on 2 cores)
WARMUP_STEPS = 2
SETTINGS = {"rank": 8, "scale": 2.0, "learning_rate": 1e-4, "beta": 0.1, "batch_size": 4}


# ------------------------------------------------------------------------------------------- shared data

def write_pairs(out: Path, split: str, count: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from mlxtune.synthetic import corrupt_answer  # the pairs the tests train on too

    rng = random.Random(0)
    rows = []
    for line in (WIKISQL / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        head, answer = json.loads(line)["text"].rsplit("\nA: ", 1)
        if len(answer.split()) > 3:
            rejected = corrupt_answer(answer, len(rows), rng)
            if rejected != answer:
                rows.append({"prompt": head.rsplit("\nQ: ", 1)[1].strip(), "chosen": answer, "rejected": rejected})
        if len(rows) == count:
            break
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def token_pairs(model_dir: Path, data: Path, max_seq_length: int) -> dict:
    """Both sides of every pair as token ids + where the answer starts, cut after the last answer token."""
    from mlx_lm.utils import load_tokenizer

    from mlxtune.data.preference import load_preference_sets

    sets = load_preference_sets(data, load_tokenizer(model_dir), max_seq_length=max_seq_length)

    def side(example):
        scored = [i for i, s in enumerate(example.supervised.tolist()) if s]
        return [int(t) for t in example.ids[: scored[-1] + 1]], scored[0]

    out = {}
    for split in ("train", "valid"):
        rows = []
        for pair in getattr(sets, split):
            (chosen, chosen_start), (rejected, rejected_start) = side(pair.chosen), side(pair.rejected)
            rows.append({"chosen": chosen, "rejected": rejected, "chosen_prompt_length": chosen_start,
                         "rejected_prompt_length": rejected_start})
        out[split] = rows
    return out


# ------------------------------------------------------------------------------------------- children

def child_mlxtune(spec: dict) -> dict:
    import time

    import mlxtune  # noqa: F401  (BLAS first)
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from mlxtune.data.preference import PreferenceExample
    from mlxtune.data.template import TokenizedExample
    from mlxtune.models import load_model
    from mlxtune.train.adapters import attach_adapters
    from mlxtune.train.preference.objective import PreferenceObjective, answer_logps, make_pair_batch
    from mlxtune.train.preference.run import PreferenceSettings, PreferenceStep

    def example(ids, start, source):
        supervised = np.zeros(len(ids), bool)
        supervised[start:] = True
        return TokenizedExample(np.asarray(ids, np.int32), supervised, source)

    pairs = [PreferenceExample(example(p["chosen"], p["chosen_prompt_length"], str(i)),
                               example(p["rejected"], p["rejected_prompt_length"], str(i)), str(i))
             for i, p in enumerate(spec["train"])]
    model, _, _ = load_model(Path(spec["model"]))
    settings = PreferenceSettings(rank=spec["rank"], alpha=spec["scale"] * spec["rank"], dropout=0.0)
    mx.random.seed(0)
    attach_adapters(model, settings)
    objective = PreferenceObjective(model, "dpo", beta=spec["beta"])
    references = None
    if spec["precompute"]:
        from mlxtune.train.preference.objective import adapters_off

        with adapters_off(model):
            values = answer_logps(model, pairs, spec["batch_size"])
        references = {p.fingerprint: (float(v[0]), float(v[1])) for p, v in zip(pairs, values)}
    optimizer = optim.Adam(learning_rate=spec["learning_rate"])
    trainer = PreferenceStep(model, optimizer, 0.0, objective)
    model.train()
    rng = np.random.default_rng(spec["seed"])
    times, tokens, losses = [], [], []
    for step in range(spec["iters"]):
        chosen = [pairs[i] for i in rng.choice(len(pairs), spec["batch_size"], replace=False)]
        tic = time.perf_counter()
        batch = make_pair_batch(chosen, references)
        loss_sum, count, _, grads = trainer.accumulate([batch])
        trainer.update(grads, count)
        mx.eval(trainer.state)
        times.append(time.perf_counter() - tic)
        tokens.append(int(batch.weights.sum()))
        losses.append(loss_sum.item() / count.item())
    adapter = Path(spec["out"]) / "adapters.safetensors"
    from mlx.utils import tree_flatten

    mx.save_safetensors(str(adapter), dict(tree_flatten(model.trainable_parameters())))
    return {"times": times, "tokens": tokens, "losses": losses, "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "adapter": str(adapter)}


def child_mlx_lm_lora(spec: dict) -> dict:
    import time

    sys.path.insert(0, str(ROOT))
    import mlxtune  # noqa: F401  (the same BLAS as mlxtune's child)
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.trainer import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    if "max_recommended_working_set_size" not in mx.device_info():
        # train_dpo wires memory to Metal's recommended working set; the CPU backend reports none (and wiring is a
        # no-op there), so give it the value that wires nothing.
        info = mx.device_info

        mx.device_info = lambda: {**info(), "max_recommended_working_set_size": 0}
    model, _ = load(spec["model"])
    reference, _ = load(spec["model"])  # as mlx-lm-lora's train.py does: a second copy as the reference
    reference.freeze()
    model.freeze()
    mx.random.seed(0)
    linear_to_lora_layers(model, len(model.layers), {"rank": spec["rank"], "scale": spec["scale"], "dropout": 0.0})
    np.random.seed(spec["seed"])

    class Report(TrainingCallback):
        def __init__(self):
            self.rows = []
            self.last = time.perf_counter()

        def on_train_loss_report(self, info):
            now = time.perf_counter()
            self.rows.append((now - self.last, info["tokens_per_second"] * (now - self.last), info["train_loss"]))
            self.last = now

    report = Report()
    adapter = Path(spec["out"]) / "adapters.safetensors"
    args = DPOTrainingArgs(batch_size=spec["batch_size"], iters=spec["iters"], steps_per_report=1,
                           steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=4096,
                           adapter_file=str(adapter), beta=spec["beta"])
    try:
        train_dpo(model, reference, optim.Adam(learning_rate=spec["learning_rate"]), spec["train"], [], args,
                  training_callback=report)
    except Exception as exc:  # noqa: BLE001  (report what broke, e.g. a wired-limit call without Metal)
        return {"error": f"{type(exc).__name__}: {exc}"}
    mx.save_safetensors(str(adapter), dict(tree_flatten(model.trainable_parameters())))
    return {"times": [r[0] for r in report.rows], "tokens": [r[1] for r in report.rows],
            "losses": [r[2] for r in report.rows], "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "adapter": str(adapter)}


def evaluate(model_dir: Path, adapter: Path, valid: list[dict], spec: dict) -> float:
    """DPO loss of an adapter on the held-out pairs, reference = the base model (one evaluator for both tools)."""
    import mlx.core as mx
    import numpy as np

    from mlxtune.data.preference import PreferenceExample
    from mlxtune.data.template import TokenizedExample
    from mlxtune.models import load_model
    from mlxtune.train.adapters import attach_adapters
    from mlxtune.train.preference.objective import PreferenceObjective, evaluate_pairs
    from mlxtune.train.preference.run import PreferenceSettings

    def example(ids, start):
        supervised = np.zeros(len(ids), bool)
        supervised[start:] = True
        return TokenizedExample(np.asarray(ids, np.int32), supervised, "")

    pairs = [PreferenceExample(example(p["chosen"], p["chosen_prompt_length"]),
                               example(p["rejected"], p["rejected_prompt_length"]), str(i))
             for i, p in enumerate(valid)]
    model, _, _ = load_model(model_dir)
    attach_adapters(model, PreferenceSettings(rank=spec["rank"], alpha=spec["scale"] * spec["rank"]))
    model.load_weights(str(adapter), strict=False)
    mx.eval(model.parameters())
    return evaluate_pairs(model, PreferenceObjective(model, "dpo", beta=spec["beta"]), pairs, 4)["loss"]


# ------------------------------------------------------------------------------------------- driver

def run_child(python: str, tool: str, spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([python, __file__, "--child", tool, handle.name], capture_output=True, text=True, env=env)
    os.unlink(handle.name)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(lines[-1][len("RESULT "):])


def speed(result: dict) -> float:
    times, tokens = result["times"][WARMUP_STEPS:], result["tokens"][WARMUP_STEPS:]
    return sum(tokens) / sum(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="smollm,qwen")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--competitor-python", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tool, spec_path = args.child
        spec = json.loads(Path(spec_path).read_text())
        result = child_mlxtune(spec) if tool.startswith("mlxtune") else child_mlx_lm_lora(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return

    sys.path.insert(0, str(ROOT))
    import mlxtune  # noqa: F401
    from mlxtune.synthetic import build_random_model

    competitor = args.competitor_python or (
        "/work/venv-mlxlmlora/bin/python" if Path("/work/venv-mlxlmlora/bin/python").is_file() else sys.executable)
    work = Path(tempfile.mkdtemp(prefix="bench-preference-"))
    data = write_pairs(work / "pairs", "train", 64)
    write_pairs(data, "valid", 16)
    rows = []
    for case in args.cases.split(","):
        shape, layers = CASES[case]
        model_dir = build_random_model(shape, work / case, layers=layers)
        pairs = token_pairs(model_dir, data, args.max_seq_length)
        runs: dict[str, list[dict]] = {"mlx-lm-lora": [], "mlxtune": [], "mlxtune --precompute-reference": []}
        for repeat in range(args.repeats):
            for tool in runs:
                out = work / f"{case}-{tool.split()[0]}-{'pre' if 'pre' in tool else 'on'}-{repeat}"
                out.mkdir(parents=True, exist_ok=True)
                spec = {**SETTINGS, "model": str(model_dir), "train": pairs["train"], "iters": args.iters,
                        "seed": repeat, "out": str(out), "precompute": "precompute" in tool}
                python = competitor if tool == "mlx-lm-lora" else sys.executable
                result = run_child(python, tool, spec)
                if "error" not in result:
                    result["valid_loss"] = evaluate(model_dir, Path(result["adapter"]), pairs["valid"], spec)
                runs[tool].append(result)
                print(f"{case} {tool} #{repeat}: " + (str(result["error"]) if "error" in result else
                      f"{speed(result):.0f} answer tok/s, peak {result['peak_memory_gb']:.3f} GB, "
                      f"held-out DPO loss {result['valid_loss']:.4f}"), flush=True)
        rows.append((case, shape, layers, runs))

    print(f"\n{platform.platform()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
          f"{date.today()}; {args.iters} steps × {SETTINGS['batch_size']} pairs, repeats {args.repeats}")
    print("| model | tool | answer tok/s | peak memory | speed ratio | memory ratio | held-out DPO loss |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for case, shape, layers, runs in rows:
        base = [r for r in runs["mlx-lm-lora"] if "error" not in r]
        if not base:
            print(f"| {shape} ({layers} blocks) | mlx-lm-lora | failed: {runs['mlx-lm-lora'][0]['error']} |")
            continue
        base_speed = statistics.median(speed(r) for r in base)
        base_memory = statistics.median(r["peak_memory_gb"] for r in base)
        for tool, results in runs.items():
            good = [r for r in results if "error" not in r]
            if not good:
                continue
            tool_speed = statistics.median(speed(r) for r in good)
            memory = statistics.median(r["peak_memory_gb"] for r in good)
            loss = statistics.mean(r["valid_loss"] for r in good)
            print(f"| {shape} ({layers} blocks) | {tool} | {tool_speed:.0f} | {memory:.3f} GB | "
                  f"{tool_speed / base_speed:.2f}× | {memory / base_memory:.2f}× | {loss:.4f} |")


if __name__ == "__main__":
    main()
