#!/usr/bin/env python
"""mlxtune vs PyTorch + PEFT: the same LoRA finetune on the same CPU, side by side.

Same model (a SmolLM-135M-shaped Llama with random weights, fewer layers to fit 2 cores, written once and loaded
by both), same data (wwdc25 tokenized by mlxtune's pipeline, prompt masked), same LoRA (rank 8, alpha 16, every
linear layer of every block), same optimizer (AdamW, lr 2e-4, constant), same examples per step, same dtype.
Each framework trains in its own child process. Reported: real (non-padding) tokens/s over the steps after the
first two, peak RSS of the child, final training loss, and mlxtune's model-FLOPs utilisation against the
float32 matmul speed measured on this machine (`mlxtune doctor`).

Needs the interop extra (torch, transformers) and peft: pip install -e '.[interop]' peft
Usage: .venv/bin/python scripts/bench_frameworks.py [--layers 4] [--iters 12] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "fixtures" / "wwdc25"
WARMUP_STEPS = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(model_dir: Path, batch_size: int, iters: int, max_seq_length: int) -> list[list]:
    """The examples each step sees, in order: [[(ids, supervised), ...], ...] (the same for both frameworks)."""
    from mlx_lm.utils import load_tokenizer

    from mlxtune.data import load_datasets

    train = load_datasets(str(DATA), load_tokenizer(model_dir), max_seq_length=max_seq_length).train
    out = []
    for step in range(iters):
        picked = [train[(step * batch_size + k) % len(train)] for k in range(batch_size)]
        out.append([(e.ids.tolist(), e.supervised.tolist()) for e in picked])
    return out


def child_torch(spec: dict) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf_model"], torch_dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"],
                                  weight_decay=0.0)
    times, tokens, losses = [], [], []
    for step_examples in spec["batches"]:
        tic = time.perf_counter()
        length = max(len(ids) for ids, _ in step_examples)
        inputs = torch.zeros((len(step_examples), length - 1), dtype=torch.long)
        labels = torch.full((len(step_examples), length - 1), -100, dtype=torch.long)
        attention = torch.zeros((len(step_examples), length - 1), dtype=torch.long)
        for row, (ids, supervised) in enumerate(step_examples):
            n = len(ids) - 1
            inputs[row, :n] = torch.tensor(ids[:-1])
            attention[row, :n] = 1
            targets = torch.tensor(ids[1:])
            mask = torch.tensor(supervised[1:], dtype=torch.bool)
            labels[row, :n] = torch.where(mask, targets, torch.tensor(-100))
        logits = model(input_ids=inputs, attention_mask=attention).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - tic)
        tokens.append(int(attention.sum()))
    timed = slice(WARMUP_STEPS, None)
    print(json.dumps({"tokens_per_second": sum(tokens[timed]) / sum(times[timed]), "final_loss": losses[-1]}))


def run_child(command: list[str]) -> tuple[dict, float]:
    """(the child's JSON result, its peak RSS in GB)."""
    wrapper = ("import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
               "sys.stderr.write(p.stderr[-3000:]) if p.returncode else None;"
               "print(json.dumps({'rc': p.returncode, 'out': p.stdout,"
               " 'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True)
    report = json.loads(done.stdout)
    if report["rc"]:
        raise SystemExit(f"{command[:4]} failed:\n{done.stderr}")
    try:  # mlxtune --json: stdout is exactly the result
        result = json.loads(report["out"])
    except json.JSONDecodeError:  # the PyTorch child: one JSON line at the end
        result = json.loads(report["out"].strip().splitlines()[-1])
    return result, report["rss_kb"] / 1e6


def mlxtune_run(model_dir: Path, work: Path, args, dtype: str) -> tuple[dict, float]:
    out = work / f"mlxtune-{dtype}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    result, rss = run_child([
        sys.executable, "-m", "mlxtune", "lora", "--model", str(model_dir), "--data", str(DATA), "--out", str(out),
        "--iters", str(args.iters), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--rank", "8",
        "--alpha", "16", "--schedule", "constant", "--warmup-steps", "0", "--max-seq-length",
        str(args.max_seq_length), "--report-every", "1", "--eval-every", "100000", "--val-batches", "1",
        "--save-every", "100000", "--json"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "train_loss" in r][WARMUP_STEPS:]
    seconds = sum(r["supervised_tokens"] / r["supervised_tokens_per_second"] for r in timed)
    tokens = sum(r["tokens_per_second"] * r["supervised_tokens"] / r["supervised_tokens_per_second"]
                 for r in timed)
    return {"tokens_per_second": tokens / seconds, "final_loss": result["final_train_loss"]}, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/mlxtune-bench-frameworks")
    parser.add_argument("--child-torch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_torch:
        child_torch(json.loads(Path(args.child_torch).read_text()))
        return
    sys.path.insert(0, str(ROOT))
    import mlxtune  # noqa: F401  (binds MLX to the system BLAS)
    from mlxtune.doctor import measure_matmul_gflops
    from mlxtune.export import export
    from mlxtune.synthetic import SHAPES, build_random_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    peak_gflops = measure_matmul_gflops()
    shape = dict(SHAPES["smollm-135m"], num_hidden_layers=args.layers)
    for dtype in args.dtypes.split(","):
        model_dir = work / f"smollm-{args.layers}l-{dtype}"
        if not (model_dir / "config.json").is_file():
            build_random_model(shape, model_dir, torch_dtype=dtype)
            if dtype != "float32":
                _cast(model_dir, dtype)
        hf_dir = work / f"hf-{args.layers}l-{dtype}"
        if not (hf_dir / "config.json").is_file():
            export(model_dir, "hf", hf_dir)
        spec_file = work / f"spec-{dtype}.json"
        spec_file.write_text(json.dumps({"hf_model": str(hf_dir), "dtype": dtype, "lr": args.lr,
                                         "threads": args.threads,
                                         "batches": batches(model_dir, args.batch_size, args.iters,
                                                            args.max_seq_length)}))
        torch_result, torch_rss = run_child([sys.executable, __file__, "--child-torch", str(spec_file)])
        ours, ours_rss = mlxtune_run(model_dir, work, args, dtype)
        # LoRA FLOPs per token: forward 2N, backward through activations 2N (frozen weights get no gradient).
        params = _parameters(shape)
        mfu = ours["tokens_per_second"] * 4 * params / (peak_gflops * 1e9)
        rows.append((dtype, torch_result, torch_rss, ours, ours_rss, mfu))

    print(f"\nmachine: {platform.machine()} {platform.system()}, date {date.today()}, SmolLM-135M shape "
          f"({args.layers} layers), LoRA r8 alpha16 all linear, batch {args.batch_size}, {args.iters} steps, "
          f"matmul peak {peak_gflops:.0f} GFLOP/s (float32)")
    print("| dtype | framework | tokens/s | peak RSS (GB) | final train loss | MFU |\n|---|---|---|---|---|---|")
    for dtype, theirs, theirs_rss, ours, ours_rss, mfu in rows:
        print(f"| {dtype} | PyTorch + PEFT | {theirs['tokens_per_second']:.0f} | {theirs_rss:.2f} | "
              f"{theirs['final_loss']:.3f} | |")
        print(f"| {dtype} | mlxtune | {ours['tokens_per_second']:.0f} | {ours_rss:.2f} | {ours['final_loss']:.3f} | "
              f"{100 * mfu:.1f}% |")
        print(f"| {dtype} | **ratio mlxtune/PyTorch** | **{ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}×** "
              f"| {ours_rss / theirs_rss:.2f}× | | |")


def _parameters(config: dict) -> int:
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    block = hidden * hidden * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter
    return layers * block + config["vocab_size"] * hidden  # + the (tied) output head


def _cast(model_dir: Path, dtype: str) -> None:
    import mlx.core as mx

    path = model_dir / "model.safetensors"
    weights = mx.load(str(path))
    mx.save_safetensors(str(path), {k: v.astype(getattr(mx, dtype)) for k, v in weights.items()},
                        metadata={"format": "mlx"})


if __name__ == "__main__":
    main()
