#!/usr/bin/env python
"""The memory estimate against MLX's measured peak, case by case (the calibration table of docs/MEMORY.md).

Each case trains for a few steps in its own child process (a fresh peak; gradient checkpointing patches classes
process-wide) through mlxtune's own `finetune`, then reads `mx.get_peak_memory()` and asks the planner for its
estimate of the same settings over the same batches. Models: the bundled stories260K and random-weight models with
the published SmolLM-135M and Qwen2.5-0.5B shapes (fewer layers, to fit 2 cores), bfloat16 and 4-bit.

The `*-default-600` cases are what a user gets: no batch/length flag at all, on prompt/completion records of about
600 tokens (the defaults make batches of 4 × 608 with 384 supervised tokens per record).

The `*-dpo`/`*-orpo` cases train through `train_preference` and compare with the preference planner's estimate
(mlxtune/memory/preference.py).

4-bit cases on the CPU backend compute through dequantized weights (mlxtune/cpu_quantized.py); the path follows the
budget, and `MLXTUNE_DEQUANTIZE=load|call` forces one for a whole bench run (the children inherit it).

Usage: .venv/bin/python scripts/bench_memory.py [--cases NAME,NAME] [--iters 2] [--json]
Exit code 1 when an estimate is more than 5% below the measured peak (the dangerous side: a run that doesn't fit)
or more than 15% above it (issue 24's bounds).
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
from mlxtune.synthetic import SHAPES  # noqa: E402  (the published shapes; imports no MLX)
STORIES = ROOT / "examples" / "models" / "stories260K"
UNDER = 0.05  # the estimate may be at most this much below the measured peak (issue 24)
TOLERANCE = 0.15  # and at most this much above it,
# or this many bytes above it, whichever is larger: below ~0.1 GB the peak moves by a few MB between machines with the
# allocator's and BLAS's own buffers (stories-lora-short: 0.072 GB here, 0.069 GB on CI, one estimate of 0.079 GB)
OVER_SLACK = 16 * 10**6
MODELS = {  # name: (shape, layers kept, stored dtype, bits)
    "smollm-bf16": ("smollm-135m", 4, "bfloat16", None),
    "smollm-q4": ("smollm-135m", 4, "bfloat16", 4),
    "qwen-bf16": ("qwen2.5-0.5b", 2, "bfloat16", None),
    "qwen-q4": ("qwen2.5-0.5b", 2, "bfloat16", 4),
    # small enough for the test suite, its weights large against its activations: the float weights of a 4-bit
    # base on the CPU backend (MLXTUNE_DEQUANTIZE=load|call) are most of its peak
    "tiny-q4": ({**SHAPES["smollm-135m"], "hidden_size": 2048, "intermediate_size": 512, "num_attention_heads": 16,
                 "num_key_value_heads": 4, "vocab_size": 8192}, 1, "bfloat16", 4),
}
# name: (model, data, settings). "short": WikiSQL text (≈100-300 tokens); "long": WWDC25 prompt/completion.
CASES = {
    "stories-lora-short": ("stories", "short", {}),
    "stories-dora-long-fullloss": ("stories", "long", {"method": "dora", "selective_loss": False,
                                                        "max_seq_length": 1024}),
    "smollm-lora-short": ("smollm-bf16", "short", {"batch_tokens": 1024}),
    "smollm-full-short-ckpt": ("smollm-bf16", "short", {"method": "full", "grad_checkpoint": True,
                                                        "batch_tokens": 1024}),
    "smollm-q4-lora-long-ckpt": ("smollm-q4", "long", {"grad_checkpoint": True, "max_seq_length": 512,
                                                       "batch_tokens": 512}),
    "smollm-q4-dora-pack": ("smollm-q4", "short", {"method": "dora", "pack": True, "batch_tokens": 1024}),
    "qwen-lora-short-fullloss": ("qwen-bf16", "short", {"selective_loss": False, "batch_tokens": 512}),
    "qwen-q4-lora-short": ("qwen-q4", "short", {"batch_tokens": 512}),
    "qwen-lora-short": ("qwen-bf16", "short", {"batch_tokens": 512}),  # qwen-q4-lora-short's bfloat16 twin
    "qwen-lora-long-pack-ckpt": ("qwen-bf16", "long", {"pack": True, "grad_checkpoint": True,
                                                       "max_seq_length": 512, "batch_tokens": 1024}),
    # The defaults (no batch/length setting) on ≈600-token prompt/completion records, both shapes.
    "smollm-lora-default-600": ("smollm-bf16", "600", {}),
    "qwen-lora-default-600": ("qwen-bf16", "600", {}),
    "qwen-full-default-600": ("qwen-bf16", "600", {"method": "full"}),
    "qwen-q4-lora-default-600": ("qwen-q4", "600", {}),
    "tiny-q4-lora-short": ("tiny-q4", "short", {"batch_tokens": 512}),
    # Preference runs (`mlxtune dpo`/`orpo`, memory/preference.py): WikiSQL pairs, one batch of pairs trained (the
    # whole epoch) and one validated, as a run draws them.
    "stories-dpo": ("stories", "pairs", {"objective": "dpo", "batch_size": 4}),
    "stories-orpo": ("stories", "pairs", {"objective": "orpo", "batch_size": 4}),
    "smollm-dpo": ("smollm-bf16", "pairs", {"objective": "dpo", "batch_size": 4}),
    "smollm-orpo": ("smollm-bf16", "pairs", {"objective": "orpo", "batch_size": 4}),
}
PAIRS = {"train": 4, "valid": 4}  # one batch of four pairs each
RECORD_600 = (600, 640)  # tokens per "600" record (stories260K's tokenizer, prompt + completion)


def make_data(root: Path) -> dict[str, Path]:
    """Small slices of the bundled data: enough batches for a few steps, quick to tokenize."""
    sources = {"short": (ROOT / "examples" / "data" / "wikisql", 48, 8),
               "long": (ROOT / "tests" / "fixtures" / "wwdc25", 24, 4)}
    paths = {}
    for name, (source, train, valid) in sources.items():
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        for split, count in (("train", train), ("valid", valid)):
            lines = (source / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
            (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[name] = out
    paths["600"] = make_600(root / "600")
    paths["pairs"] = make_pairs(root / "pairs")
    return paths


def make_pairs(out: Path) -> Path:
    """Preference pairs from WikiSQL: the question (prompt), its SQL (chosen) and a corruption of it (rejected),
    as the preference tests and bench_preference.py make them."""
    import random

    from mlxtune.synthetic import corrupt_answer

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, count in PAIRS.items():
        rows = []
        source = ROOT / "examples" / "data" / "wikisql" / f"{split}.jsonl"
        for line in source.read_text(encoding="utf-8").splitlines():
            head, answer = json.loads(line)["text"].rsplit("\nA: ", 1)
            rejected = corrupt_answer(answer, len(rows), rng)
            if len(answer.split()) > 3 and rejected != answer:
                rows.append({"prompt": head.rsplit("\nQ: ", 1)[1].strip(), "chosen": answer, "rejected": rejected})
            if len(rows) == count:
                break
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def make_600(out: Path, train: int = 8, valid: int = 2) -> Path:
    """WWDC25 prompt/completion records with the completion cut to RECORD_600 tokens in all (the tokenizer is
    stories260K's, which every bench model borrows): two default batches of four for training, one record to
    validate (its peak stays below training's)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(STORIES / "tokenizer.json"))
    low, high = RECORD_600
    out.mkdir(parents=True, exist_ok=True)
    source = (ROOT / "tests" / "fixtures" / "wwdc25" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    records = []
    for line in source:
        record = json.loads(line)
        words = record["completion"].split()
        while words and len(tokenizer.encode(record["prompt"] + " " + " ".join(words)).ids) > (low + high) // 2:
            words = words[:-8]
        if len(tokenizer.encode(record["prompt"] + " " + " ".join(words)).ids) >= low - 40:
            records.append({"prompt": record["prompt"], "completion": " ".join(words)})
        if len(records) == train + valid:
            break
    for split, rows in (("train", records[:train]), ("valid", records[train:])):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def model_path(name: str, cache: Path) -> Path:
    if name == "stories":
        return STORIES
    out = cache / name
    if not (out / "config.json").is_file():
        from mlxtune.synthetic import build_random_model

        shape, layers, dtype, bits = MODELS[name]
        build_random_model(shape, out, layers=layers, dtype=dtype, bits=bits)
    return out


def child(spec: dict) -> None:
    """In the child: a short real run, then the measured peak and the planner's estimate for the same batches."""
    import mlxtune  # noqa: F401  (binds the BLAS first)
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    from mlxtune.data.dataset import load_datasets
    from mlxtune.memory.budget import memory_budget
    from mlxtune.memory.estimate import ModelFacts
    from mlxtune.memory.planner import DataLengths, estimate_settings
    from mlxtune.settings import LoraSettings
    from mlxtune.train.loop import finetune
    from mlxtune.ui import make_console

    iters = spec.pop("iters")
    if "objective" in spec:
        return preference_child(spec, iters)
    settings = LoraSettings(iters=iters, val_batches=1, eval_every=10**6, save_every=10**6, report_every=1, **spec)
    settings.fit_model(settings.model)  # max_seq_length from the model, as the run resolves it
    finetune(settings, console=make_console(quiet=True))
    peak = mx.get_peak_memory()
    datasets = load_datasets(settings.data, load_tokenizer(settings.model), **settings.dataset_options())
    # The whole first epoch, as `mlxtune plan` and the run itself estimate it: the run tries its largest batch
    # before the first step (fail fast), so the measured peak covers it too.
    # Under the run's own budget, which also decides how a quantized base computes on the CPU backend.
    value = estimate_settings(ModelFacts.from_dir(settings.model), settings, DataLengths.of(datasets),
                              budget=memory_budget(settings.memory)[0])
    print(json.dumps({"peak": peak, "estimate": value.total, "parts": value.to_dict()["parts_gb"]}))


def preference_child(spec: dict, iters: int) -> None:
    """`child` for a DPO or ORPO run: trained through mlxtune's own `train_preference`, estimated by the planner
    the run itself asks (memory/preference.py)."""
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    from mlxtune.data.preference import load_preference_sets
    from mlxtune.memory.budget import memory_budget
    from mlxtune.memory.estimate import ModelFacts
    from mlxtune.memory.preference import estimate_preference
    from mlxtune.settings import PreferenceSettings
    from mlxtune.train.preference.run import train_preference
    from mlxtune.ui import make_console

    settings = PreferenceSettings(iters=iters, val_batches=1, eval_every=10**6, save_every=10**6, report_every=1,
                                  **spec)
    settings.fit_model(settings.model)
    train_preference(settings, console=make_console(quiet=True))
    peak = mx.get_peak_memory()
    sets = load_preference_sets(settings.data, load_tokenizer(settings.model), max_seq_length=settings.max_seq_length,
                                seed=settings.seed)
    value = estimate_preference(ModelFacts.from_dir(settings.model), settings, sets.train, sets.valid,
                                budget=memory_budget(settings.memory)[0])
    print(json.dumps({"peak": peak, "estimate": value.total, "parts": value.to_dict()["parts_gb"]}))


def run_case(name: str, data: dict, cache: Path, work: Path, iters: int) -> dict:
    model, data_name, settings = CASES[name]
    spec = dict(settings, model=str(model_path(model, cache)), data=str(data[data_name]), out=str(work / name),
                iters=iters)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    measured["error"] = measured["estimate"] / measured["peak"] - 1
    return {"case": name, **measured}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0

    cache = Path(os.environ.get("MLXTUNE_BENCH_CACHE", Path(tempfile.gettempdir()) / "mlxtune-bench-models"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        data = make_data(Path(tmp) / "data")
        for name in args.cases.split(","):
            row = run_case(name, data, cache, Path(tmp) / "runs", args.iters)
            rows.append(row)
            if not args.json:
                print(f"{name:32s} measured {row['peak'] / 1e9:7.3f} GB  estimated {row['estimate'] / 1e9:7.3f} GB"
                      f"  {100 * row['error']:+6.1f}%", flush=True)
    low, high = min(r["error"] for r in rows), max(r["error"] for r in rows)
    if args.json:
        print(json.dumps({"rows": rows, "lowest_error": low, "highest_error": high}, indent=2))
    else:
        print(f"\nerrors {100 * low:+.1f}% … {100 * high:+.1f}%"
              f" (allowed −{100 * UNDER:.0f}% … +{100 * TOLERANCE:.0f}% or +{OVER_SLACK / 1e6:.0f} MB)"
              f" · {platform.machine()} {platform.system()} · {os.cpu_count()} cores · {date.today()}")
    return 0 if all(within_tolerance(r) for r in rows) else 1


def within_tolerance(row: dict) -> bool:
    over = row["estimate"] - row["peak"]
    return -UNDER <= row["error"] and (row["error"] <= TOLERANCE or over <= OVER_SLACK)


if __name__ == "__main__":
    sys.exit(main())
