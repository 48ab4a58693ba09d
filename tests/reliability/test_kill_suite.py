"""The kill suite: SIGKILL at randomized points — inside checkpoint writes, in evaluations, mid-step, in a fuse and
in an export — then resume or rerun. Each of two chains kills the run once at every kind of point (each of the five
checkpoint stages, a validation batch, a random moment after a step), in a random order at a random save, batch or
moment. After every kill no file of the run is corrupt; at the end the adapter (and best/) equal an uninterrupted
run's to 1e-6, and the fuse and export finish without leftovers.

The points are drawn from MLXTUNE_KILL_SEED (random when unset; printed on failure to reproduce a draw):
    MLXTUNE_KILL_SEED=1234 pytest tests/reliability/test_kill_suite.py
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import MLXTUNE
from mlxtune.train.checkpoint import resumable_checkpoint
from mlxtune.train.loop import finetune
from mlxtune.ui import make_console
from reliability_tools import assert_run_intact, assert_same_adapter, cli, env_with, lora_args, settings

SEED = int(os.environ.get("MLXTUNE_KILL_SEED") or random.SystemRandom().randrange(1 << 30))
RUN = dict(iters=10)  # the default 3e-3: a larger rate amplifies last-bit float differences past 1e-6
CHECKPOINT_POINTS = ["checkpoint.adapter", "checkpoint.optimizer", "checkpoint.manifest", "checkpoint.rename",
                     "checkpoint.latest"]
# Every chain kills once at each: two chains side by side give 14 training kills, every kind twice (20 kills drawn
# at random left one of the checkpoint stages out of one run in three), plus one kill in a fuse and one in an export.
KINDS = CHECKPOINT_POINTS + ["eval", "step"]


def _step(run_dir: Path) -> int:
    checkpoint, _ = resumable_checkpoint(run_dir)
    return int(checkpoint.name.split("-")[1]) if checkpoint else 0


def _launch(run_dir: Path, rng: random.Random, kind: str) -> tuple[str, int]:
    """Start (or resume) the run with one kill of `kind` (a checkpoint stage at a random save, a random validation
    batch, or a random moment after a step); returns what was drawn and the exit code."""
    if (run_dir / "config.yaml").is_file():
        args = ["lora", "--resume", str(run_dir)]
    else:  # killed before the run wrote its settings: the user reruns the same command
        args = lora_args(run_dir, **RUN)
    step = _step(run_dir)
    saves_left = (RUN["iters"] - step) // 2
    evals_left = saves_left + (1 if step == 0 else 0)
    fault = None
    if kind in CHECKPOINT_POINTS:
        fault = f"{kind}:{rng.randint(1, max(1, saves_left))}"
    elif kind == "eval":
        fault = f"eval.batch:{rng.randint(1, max(1, evals_left))}"
    metrics = run_dir / "metrics.jsonl"
    lines_before = metrics.read_text().count("\n") if metrics.exists() else 0
    process = subprocess.Popen([*MLXTUNE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=env_with(**({"MLXTUNE_FAULT": fault} if fault else {})))
    if kind == "step":  # a random moment once training runs: wait for a new metrics line, then a random delay
        deadline = time.time() + 120
        while process.poll() is None and time.time() < deadline:
            if metrics.exists() and metrics.read_text().count("\n") > lines_before:
                time.sleep(rng.uniform(0.0, 0.6))
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode in (0, -signal.SIGKILL), f"{args} {fault}: {stderr[-2000:]}"
    return f"{fault or 'step:random moment'}@step{step}", process.returncode


def _chain(run_dir: Path, seed: int) -> list[str]:
    """Kill the run once at each of KINDS, in a random order (starting over if it completes first), then let it
    finish."""
    rng = random.Random(seed)
    todo = rng.sample(KINDS, len(KINDS))
    kills = []
    while todo:
        assert len(kills) < 3 * len(KINDS), f"seed {seed}: no kill at {todo[0]} in {kills}"
        if _step(run_dir) == RUN["iters"]:  # killed after its last checkpoint: finished, start the run again
            kills.append("(finished at its last checkpoint)")
            shutil.rmtree(run_dir)
        drawn, code = _launch(run_dir, rng, todo[0])
        if code == 0:  # finished before its kill point: extend nothing, start the chain's run again, same kind
            kills.append(f"(finished: {drawn})")
            shutil.rmtree(run_dir)
            continue
        kills.append(drawn)
        todo.pop(0)
        assert_run_intact(run_dir)
    if _step(run_dir) < RUN["iters"]:
        final = subprocess.run([*MLXTUNE, *(["lora", "--resume", str(run_dir)] if (run_dir / "config.yaml").is_file()
                                            else lora_args(run_dir, **RUN))],
                               capture_output=True, text=True, env=env_with(), timeout=300)
        assert final.returncode == 0, final.stderr[-2000:]
    return kills


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = finetune(settings(out, **RUN), console=make_console(quiet=True))
    return out, result


def test_randomized_kills_during_training_fuse_and_export(reference, tmp_path):
    chains = [tmp_path / "a", tmp_path / "b"]
    with ThreadPoolExecutor(2) as pool:
        drawn = list(pool.map(_chain, chains, [SEED, SEED + 1]))
    real_kills = [k for kills in drawn for k in kills if not k.startswith("(finished")]
    report = f"MLXTUNE_KILL_SEED={SEED}: " + "; ".join(k for kills in drawn for k in kills)
    assert len(real_kills) == 2 * len(KINDS), report
    for kind in KINDS:  # each kind killed the run in both chains
        prefix = {"eval": "eval.batch:", "step": "step:"}.get(kind, f"{kind}:")
        assert sum(k.startswith(prefix) for k in real_kills) == 2, (kind, report)
    ref_dir, ref = reference
    for run in chains:
        assert_run_intact(run)
        assert not list((run / "checkpoints").glob(".*")), f"staging left in {run}: {report}"
        assert_same_adapter(run / "adapters.safetensors", ref_dir / "adapters.safetensors")
        assert_same_adapter(run / "best" / "adapters.safetensors", ref_dir / "best" / "adapters.safetensors")
        # the last checkpoint's progress (result.json is missing when a kill came after the last checkpoint)
        result = json.loads((resumable_checkpoint(run)[0] / "state.json").read_text())
        assert result["initial_val_loss"] == pytest.approx(ref.initial_val_loss, abs=1e-6), report
        assert result["best_step"] == ref.best_step, report
        train_steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                       if '"train_loss"' in line]
        assert train_steps == list(range(1, RUN["iters"] + 1)), report

    # A fuse killed after writing its model, before the check: a hidden copy; the rerun removes it and finishes.
    run, fused = chains[0], tmp_path / "fused"
    killed_fuse = cli("fuse", run, "--out", fused, fault="fuse.saved")
    assert killed_fuse.returncode == -signal.SIGKILL
    assert [p.name for p in tmp_path.glob(".fused.partial-*")], "the killed fuse left no staging copy to clean"
    assert not fused.exists()
    # An export killed with its output written but not yet in place: hidden output + a fused copy in the temp dir.
    exported = tmp_path / "hf"
    temp_before = set(Path(tempfile.gettempdir()).glob("mlxtune-export-*"))
    killed_export = cli("export", run, "--format", "hf", "--out", exported, fault="export.written")
    assert killed_export.returncode == -signal.SIGKILL
    assert not exported.exists() and list(tmp_path.glob(".hf.partial-*"))
    assert set(Path(tempfile.gettempdir()).glob("mlxtune-export-*")) - temp_before, "no temp copy to clean"

    refused = cli("fuse", run, "--out", fused)
    assert refused.returncode == 0, refused.stderr
    assert not list(tmp_path.glob(".fused.partial-*")) and (fused / "config.json").is_file()
    rerun = cli("export", run, "--format", "hf", "--out", exported)
    assert rerun.returncode == 0, rerun.stderr
    assert not list(tmp_path.glob(".hf.partial-*")) and (exported / "model.safetensors").is_file()
    assert not set(Path(tempfile.gettempdir()).glob("mlxtune-export-*")) - temp_before, "killed export's temp copy"
