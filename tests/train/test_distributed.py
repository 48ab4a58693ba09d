"""Data-parallel training over MLX's ring backend: 2 real ranks on 127.0.0.1 started by mlx.launch, on the real
stories260K model and WikiSQL data.

- 2 ranks × budget B train exactly like 1 rank × budget 2B (per-step loss and final adapter within 1e-5);
- a rank killed mid-run stops every rank within 60 s with an error naming it, and `--resume --nproc 2` finishes
  with the adapter of the uninterrupted 2-rank run;
- a rank given different data refuses at start-up, naming the host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import MLXTUNE, MODEL, WIKISQL, make_pairs, run_cli
from mlxtune import LoraSettings
from mlxtune.train.checkpoint import latest_checkpoint
from mlxtune.train.distributed import MARKER, _free_port_range, _mlx_launch_command
from mlxtune.train.loop import finetune
from mlxtune.ui import make_console

BUDGET = 128  # tokens per rank and micro-batch: with --max-seq-length 96, one example row per rank
# A constant schedule: a run stopped early and resumed with --iters 6 follows the same learning rates.
COMMON = dict(iters=6, max_seq_length=96, val_batches=2, eval_every=3, report_every=1, save_every=2,
              schedule="constant", warmup_steps=0, learning_rate=3e-3)


def _flags(values: dict) -> list[str]:
    return [str(x) for key, value in values.items() for x in (f"--{key.replace('_', '-')}", value)]


def _two_ranks(out: Path, **overrides) -> list[str]:
    values = {**COMMON, "batch_tokens": BUDGET, **overrides}
    return [*MLXTUNE, "lora", "--model", str(MODEL), "--data", str(WIKISQL), "--out", str(out), "--nproc", "2",
            *_flags(values)]


def _losses(run_dir: Path) -> list[tuple[int, str, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], key, r[key]) for r in records for key in ("train_loss", "val_loss") if key in r]


def _supervised_tokens(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["supervised_tokens"] for r in records if "train_loss" in r]


def _adapters(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run_dir / "adapters.safetensors")).items()}


def _assert_same_adapters(actual: Path, expected: Path, atol: float) -> None:
    a, b = _adapters(actual), _adapters(expected)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=atol, rtol=0, err_msg=name)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run (shared by the equivalence and the resume tests)."""
    out = tmp_path_factory.mktemp("dist") / "two"
    done = subprocess.run(_two_ranks(out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 over ring (127.0.0.1 ×2)" in done.stdout  # the run header names ranks, backend and hosts
    return out


def test_two_ranks_with_budget_b_train_like_one_rank_with_budget_2b(two_rank_run, tmp_path):
    single = tmp_path / "one"
    settings = LoraSettings(model=str(MODEL), data=str(WIKISQL), out=str(single), batch_tokens=2 * BUDGET, **COMMON)
    finetune(settings, console=make_console(quiet=True))
    expected, actual = _losses(single), _losses(two_rank_run)
    assert [(s, k) for s, k, _ in actual] == [(s, k) for s, k, _ in expected]
    assert len([k for _, k, _ in actual if k == "train_loss"]) == COMMON["iters"]
    for (step, key, got), (_, _, want) in zip(actual, expected):
        assert abs(got - want) <= 1e-5, (step, key, got, want)
    # the batch summed in another order: Adam moves an entry whose gradient is near zero by its rounding's sign
    # (measured: one entry of 1,376 3.1e-5 off with the CPU's exp-form SwiGLU, cpu_activations.py; the rest ≤ 1e-5)
    _assert_same_adapters(two_rank_run, single, atol=5e-5)
    # each rank computed its own half: the world's supervised tokens per step are the single run's, not twice them
    assert _supervised_tokens(two_rank_run) == _supervised_tokens(single)
    # rank 0 alone wrote the run: one metrics line per step, one result
    assert json.loads((two_rank_run / "result.json").read_text())["steps"] == COMMON["iters"]
    assert json.loads((two_rank_run / "run.json").read_text())["ranks"] == 2


def test_two_ranks_with_uneven_token_counts_train_like_one_rank(tmp_path):
    """Rows of different lengths (WikiSQL untruncated: 150-250 tokens) give the ranks different supervised-token
    counts in a step: only per-token sums over the world (not the mean of per-rank means) match one rank."""
    uneven = {**COMMON, "iters": 3, "eval_every": 3, "save_every": 3, "max_seq_length": 512}
    two = tmp_path / "two"
    done = subprocess.run(_two_ranks(two, **uneven, batch_tokens=512), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single = tmp_path / "one"
    finetune(LoraSettings(model=str(MODEL), data=str(WIKISQL), out=str(single), batch_tokens=1024, **uneven),
             console=make_console(quiet=True))
    for (step, key, got), (_, _, want) in zip(_losses(two), _losses(single), strict=True):
        assert abs(got - want) <= 1e-5, (step, key, got, want)
    _assert_same_adapters(two, single, atol=5e-5)  # longer rows: summation order moves the 5th digit


def _rank_pid(rank: int, out: Path) -> int | None:
    """The process of `rank` among the ranks mlx.launch started for the run writing `out`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"rank-worker" in cmdline and str(out).encode() in b" ".join(cmdline) \
                and f"MLX_RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_killed_rank_stops_all_and_the_run_resumes_to_the_same_adapter(two_rank_run, tmp_path):
    out = tmp_path / "killed"
    launch = subprocess.Popen(_two_ranks(out, iters=400), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while latest_checkpoint(out) is None and time.time() < deadline and launch.poll() is None:
            time.sleep(0.05)
        pid = _rank_pid(1, out)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = launch.communicate(timeout=120)
        stopped_after = time.monotonic() - killed_at
    finally:
        if launch.poll() is None:
            launch.kill()
    assert stopped_after < 60, stopped_after
    assert launch.returncode == 1, stderr[-2000:]
    assert "error: rank 1 (127.0.0.1) died without finishing" in stderr
    assert f"mlxtune lora --resume {out} --nproc 2" in stderr
    assert _rank_pid(0, out) is None  # no rank left behind
    step = int(latest_checkpoint(out).name.split("-")[1])
    assert 2 <= step < COMMON["iters"]

    # A 2-rank run resumes on 2 ranks only (its batches depend on the world size) ...
    refused = run_cli("lora", "--resume", out, "--iters", COMMON["iters"], "--nproc", 3)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "trained on 2 rank(s), this resume has 3" in refused.stderr
    # ... and with them finishes exactly as the uninterrupted run did.
    resumed = run_cli("lora", "--resume", out, "--iters", COMMON["iters"], "--nproc", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step-{step:07d}" in resumed.stdout
    _assert_same_adapters(out, two_rank_run, atol=1e-6)


def test_a_rank_with_different_data_refuses_at_start_up(tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(WIKISQL, changed)
    lines = (changed / "train.jsonl").read_text().splitlines(keepends=True)
    (changed / "train.jsonl").write_text("".join(lines[:-1]))  # one example fewer on rank 1
    settings = LoraSettings(model=str(MODEL), data=str(WIKISQL), out=str(tmp_path / "run"), **COMMON).to_dict()
    for rank, data in ((0, WIKISQL), (1, changed)):
        spec = {"settings": {**settings, "data": str(data)}, "resume": False, "world_size": 2, "backend": "ring",
                "hosts": ["127.0.0.1", "127.0.0.1"], "timeout": 60, "resume_hint": "", "json": True}
        (tmp_path / f"spec{rank}.json").write_text(json.dumps(spec))
    # mlx.launch starts the same command on every rank; this one hands each rank its own spec (its own data).
    rank_command = ["bash", "-c", f'exec {sys.executable} -m mlxtune rank-worker "$(cat {tmp_path}/spec$MLX_RANK.json)"']
    done = subprocess.run([*_mlx_launch_command(), "--hosts", "127.0.0.1", "-n", "2", "--backend", "ring",
                           "--starting-port", str(_free_port_range(2)), "--", *rank_command],
                          capture_output=True, text=True, timeout=300)
    markers = [json.loads(line[len(MARKER):]) for line in done.stderr.splitlines() if line.startswith(MARKER)]
    assert sorted(m["rank"] for m in markers) == [0, 1], done.stderr[-3000:]
    for marker in markers:
        assert marker["status"] == "failed"
        assert "start-up check failed: rank 1 on 127.0.0.1 has different data than rank 0 on 127.0.0.1" \
            in marker["message"]
    assert not (tmp_path / "run" / "adapters.safetensors").exists()


def test_check_forms_the_world_and_refuses_unknown_hosts():
    done = run_cli("lora", "--model", MODEL, "--data", WIKISQL, "--nproc", 2, "--check", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ok"] and report["world_size"] == 2 and report["formed"] == 2 and report["backend"] == "ring"
    assert report["hosts"][0]["info"]["paths"] == {str(MODEL): True, str(WIKISQL): True}
    # JACCL needs Thunderbolt RDMA between Macs: here it falls back to ring, saying why
    done = run_cli("lora", "--model", MODEL, "--data", WIKISQL, "--nproc", 2, "--backend", "jaccl", "--check", "--json")
    assert "the jaccl backend is not usable" in json.loads(done.stdout)["notes"][0]
    unknown = run_cli("lora", "--model", MODEL, "--data", WIKISQL, "--hosts", "127.0.0.1,no-such-host.invalid")
    assert unknown.returncode == 2
    assert "can't resolve the address of no-such-host.invalid" in unknown.stderr


def _pairs_per_step(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["pairs"] for r in records if "train_loss" in r]


def test_dpo_on_two_ranks_trains_like_one_rank_with_twice_the_batch(tmp_path):
    """`mlxtune dpo --nproc 2 --batch-size 2` = one rank with --batch-size 4: the same launcher and per-pair sums as
    lora. 15 pairs: the epoch's last batch has 3, split 2/1 between the ranks, so a mean of per-rank means (or a rank
    training on the whole batch) would differ from one rank."""
    from mlxtune.train.preference.run import PreferenceSettings, train_preference

    pairs = make_pairs(tmp_path / "pairs", train=15, valid=4)
    common = dict(iters=4, val_batches=-1, eval_every=4, report_every=1, save_every=4, schedule="constant",
                  warmup_steps=0, learning_rate=1e-2)
    two = tmp_path / "two"
    done = subprocess.run([*MLXTUNE, "dpo", "--model", str(MODEL), "--data", str(pairs), "--out", str(two),
                           "--nproc", "2", "--batch-size", "2", *_flags(common)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 over ring (127.0.0.1 ×2)" in done.stdout
    single = tmp_path / "one"
    train_preference(PreferenceSettings(model=str(MODEL), data=str(pairs), out=str(single), objective="dpo",
                                        batch_size=4, **common), console=make_console(quiet=True))
    assert _pairs_per_step(two) == _pairs_per_step(single) == [4, 4, 4, 3]
    for (step, key, got), (_, _, want) in zip(_losses(two), _losses(single), strict=True):
        assert abs(got - want) <= 1e-5, (step, key, got, want)
    # Adam divides by the root of tiny second moments: summation order moves single elements in the 4th digit
    _assert_same_adapters(two, single, atol=1e-3)
    assert json.loads((two / "run.json").read_text())["ranks"] == 2


def test_grpo_on_two_ranks_trains_like_one_rank_with_twice_the_batch(tmp_path):
    """`mlxtune grpo --nproc 2 --batch-size 1` = one rank with --batch-size 2: each rank rolls out its prompt with
    the keys one rank would use for it, and the rollout statistics, loss sums and gradients are the world's (before
    each of μ 2 updates). --val-batches 2 of the world's batch: 4 of the 5 validation prompts, split between the
    ranks one per batch, with the same fixed keys as one rank's."""
    from test_grpo_run import make_prompts

    from mlxtune.settings import GrpoSettings
    from mlxtune.train.grpo.run import train_grpo

    prompts = make_prompts(tmp_path / "prompts", train=12, valid=5)
    common = dict(reward="contains", group_size=4, max_completion_tokens=8, iters=2, val_batches=2, eval_every=2,
                  report_every=1, save_every=2, schedule="constant", warmup_steps=0, learning_rate=1e-2,
                  sample_every=0, memory="64GB", updates_per_batch=2)  # μ 2: the first update is summed too
    two = tmp_path / "two"
    done = subprocess.run([*MLXTUNE, "grpo", "--model", str(MODEL), "--data", str(prompts), "--out", str(two),
                           "--nproc", "2", "--batch-size", "1", *_flags(common)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 over ring (127.0.0.1 ×2)" in done.stdout and "2 prompts × G 4 per step" in done.stdout
    single = tmp_path / "one"
    train_grpo(GrpoSettings(model=str(MODEL), data=str(prompts), out=str(single), batch_size=2,
                            **{**common, "reward": ["contains"]}), console=make_console(quiet=True))

    def rows(run_dir):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "train_loss" in r], [r for r in records if "val_reward" in r]

    (train_two, val_two), (train_one, val_one) = rows(two), rows(single)
    assert [r["train_completions"] for r in train_two] == [8, 8]  # both ranks' samples counted
    for got, want in zip(train_two, train_one, strict=True):
        for key in ("train_reward", "train_completion_length", "train_zero_std_groups"):
            assert got[key] == want[key], (got["step"], key, got[key], want[key])
        assert abs(got["train_loss"] - want["train_loss"]) <= 1e-5, (got["step"], got["train_loss"], want["train_loss"])
    assert [r["val_reward"] for r in val_two] == [r["val_reward"] for r in val_one] and len(val_two) == 2
    _assert_same_adapters(two, single, atol=1e-3)
    assert json.loads((two / "run.json").read_text())["ranks"] == 2


def test_grpo_with_a_bad_reward_fails_before_any_rank_starts(tmp_path):
    from test_grpo_run import make_prompts

    prompts = make_prompts(tmp_path / "prompts", train=4, valid=1)
    done = run_cli("grpo", "--model", MODEL, "--data", prompts, "--out", tmp_path / "run", "--nproc", 2,
                   "--reward", tmp_path / "missing.py:score")
    assert done.returncode == 2 and "no file" in done.stderr and "rank" not in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["dpo", "grpo"])
def test_from_a_supervised_run_is_refused_with_ranks_before_any_starts(command, tmp_path):
    done = run_cli(command, "--from", tmp_path / "sft", "--data", tmp_path, "--nproc", 2,
                   *(["--reward", "number"] if command == "grpo" else []))
    assert done.returncode == 2 and "--from is not available with --nproc/--hosts" in done.stderr, done.stderr
    assert f"mlxtune fuse {tmp_path / 'sft'} --out MODEL_DIR" in done.stderr and "rank" not in done.stderr
