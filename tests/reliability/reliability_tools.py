"""What the reliability tests share: one small real training setup, the CLI with extra environment, and checks that
a run directory holds no corrupt file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np

from conftest import MLXTUNE, MODEL, WIKISQL
from mlxtune.settings import LoraSettings, load_run_settings
from mlxtune.train.checkpoint import latest_checkpoint, verify_checkpoint

# Eight steps of the bundled model; checkpoints every 2, evaluations every 2, dropout on (so the RNG matters).
TRAIN = dict(iters=8, batch_size=2, max_seq_length=96, learning_rate=3e-3, dropout=0.1, eval_every=2,
             val_batches=1, save_every=2, report_every=1)


def settings(out: Path, data: Path = WIKISQL, **extra) -> LoraSettings:
    return LoraSettings(model=str(MODEL), data=str(data), out=str(out), **{**TRAIN, **extra})


def lora_args(out: Path, data: Path = WIKISQL, **extra) -> list[str]:
    args = ["lora", "--model", MODEL, "--data", data, "--out", out]
    for key, value in {**TRAIN, **extra}.items():
        args += [f"--{key.replace('_', '-')}", value]
    return [str(a) for a in args]


def env_with(**extra) -> dict:
    return dict(os.environ, COLUMNS="120", **{k: str(v) for k, v in extra.items()})


def cli(*args, fault: str | None = None, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess; `fault` sets MLXTUNE_FAULT (mlxtune/faults.py)."""
    extra = {"MLXTUNE_FAULT": fault} if fault else {}
    return subprocess.run([*MLXTUNE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env_with(**extra, **env))


def adapter(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-6) -> None:
    first, second = adapter(a), adapter(b)
    assert first.keys() == second.keys()
    worst = max(float(np.abs(first[k] - second[k]).max()) for k in first)
    assert worst <= atol, f"{a} and {b} differ by {worst:.3g}"


def assert_run_intact(run_dir: Path) -> None:
    """No file in the run is corrupt: every visible checkpoint verifies, `latest` names a verified one, the adapter
    and JSON files load, config.yaml is whole. (Hidden staging leftovers of a killed save are allowed.)"""
    checkpoints = run_dir / "checkpoints"
    for checkpoint in sorted(checkpoints.glob("step-*")) if checkpoints.is_dir() else []:
        assert verify_checkpoint(checkpoint) is None, f"{checkpoint}: {verify_checkpoint(checkpoint)}"
    pointer = checkpoints / "latest"
    if pointer.exists():
        named = latest_checkpoint(run_dir)
        assert named is not None and verify_checkpoint(named) is None, f"latest names {pointer.read_text()!r}"
    for file in run_dir.rglob("*.safetensors"):
        if not any(part.startswith(".") for part in file.relative_to(run_dir).parts):
            mx.load(str(file))
    for file in run_dir.rglob("*.json"):
        if not any(part.startswith(".") for part in file.relative_to(run_dir).parts):
            json.loads(file.read_text(encoding="utf-8"))
    if (run_dir / "config.yaml").exists():
        load_run_settings(run_dir / "config.yaml")
