"""Checkpoints: exact resume, and a SIGKILL mid-run leaves a resumable run with no corrupt files."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx_lm import load

from conftest import MLXTUNE, MODEL, WIKISQL, run_cli
from mlxtune import LoraSettings, UsageError
from mlxtune.data import load_datasets
from mlxtune.settings import save_settings
from mlxtune.train.validation import validation_loss
from mlxtune.train.checkpoint import latest_checkpoint
from mlxtune.train.loop import finetune, resume_settings
from mlxtune.ui import make_console


def _settings(out, **extra):
    values = dict(model=str(MODEL), data=str(WIKISQL), out=str(out), iters=6, batch_size=2, max_seq_length=96,
                  learning_rate=3e-3, dropout=0.1, eval_every=100, val_batches=1, save_every=3, report_every=1)
    values.update(extra)
    return LoraSettings(**values)


def _command(*extra):
    """A long CLI training run (stopped by the test long before it ends)."""
    args = ["lora", "--model", MODEL, "--data", WIKISQL, "--iters", 400, "--batch-size", 2, "--max-seq-length", 96,
            "--eval-every", 1000, "--val-batches", 1, *extra]
    return [*MLXTUNE, *map(str, args)]


def test_resume_from_a_middle_checkpoint_matches_the_uninterrupted_run(tmp_path):
    quiet = make_console(quiet=True)
    settings = _settings(tmp_path / "full", data=f"{WIKISQL}/../{WIKISQL.name}")  # resolved by the run
    given = settings.to_dict()
    full = finetune(settings, console=quiet)
    assert settings.to_dict() == given  # the caller's settings are not changed (the run saves its resolved copy)
    # Roll a copy back to its step-3 checkpoint and let it finish again.
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "full", copy)
    (copy / "checkpoints" / "latest").write_text("step-0000003")
    resumed = finetune(resume_settings(copy, {}), resume=True, console=quiet)
    assert resumed.steps == full.steps == 6
    assert abs(resumed.final_train_loss - full.final_train_loss) <= 1e-6
    expected = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    actual = mx.load(str(copy / "adapters.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_allclose(np.array(actual[name]), np.array(expected[name]), atol=1e-6, rtol=0)
    # the metrics log of the resumed run has each step once
    steps = [line for line in (copy / "metrics.jsonl").read_text().splitlines() if '"train_loss"' in line]
    assert len(steps) == 6


def _assert_every_visible_file_is_whole(run_dir):
    """What a SIGKILL may leave: hidden temporaries; every file under its real name must read back whole."""
    for path in run_dir.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(run_dir).parts) or not path.is_file():
            continue
        if path.suffix == ".safetensors":
            mx.load(str(path))
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            assert isinstance(yaml.safe_load(path.read_text()), dict), path
        elif path.name == "latest":
            assert (path.parent / path.read_text().strip()).is_dir(), path


def test_sigkill_mid_training_then_resume(tmp_path):
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        _command("--out", run_dir, "--save-every", 2),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            checkpoint = latest_checkpoint(run_dir)
            if checkpoint is not None and checkpoint.name >= "step-0000004":
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None
    step = int(checkpoint.name.split("-")[1])
    mx.load(str(checkpoint / "adapters.safetensors"))  # readable, not truncated
    mx.load(str(run_dir / "adapters.safetensors"))
    _assert_every_visible_file_is_whole(run_dir)
    result = run_cli("lora", "--resume", run_dir, "--iters", step + 2, "--json")
    assert result.returncode == 0, result.stderr
    assert f"resuming from step-{step:07d}" in result.stderr


def test_sigterm_saves_a_checkpoint_and_exits_130(tmp_path):
    run_dir = tmp_path / "stopped"
    process = subprocess.Popen(
        _command("--out", run_dir, "--save-every", 1000, "--report-every", 1),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("train_loss") >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None and int(checkpoint.name.split("-")[1]) >= 2
    assert "mlxtune lora --resume" in output


def test_early_stopping_keeps_the_best_adapter(tmp_path):
    # A learning rate far too high makes validation worse after the first evaluation: patience 1 stops there.
    result = finetune(_settings(tmp_path / "early", iters=40, learning_rate=0.5, dropout=0.0, eval_every=2,
                                patience=1, val_batches=2), console=make_console(quiet=True))
    assert result.stopped == "early-stopped" and result.steps < 40
    assert result.best_val_loss <= result.final_val_loss
    # best/ holds the adapter that scored best_val_loss, not a later (worse) one
    assert result.best_val_loss < result.final_val_loss and result.best_step < result.steps
    model, tokenizer = load(str(MODEL), adapter_path=str(tmp_path / "early" / "best"))
    valid = load_datasets(WIKISQL, tokenizer, **_settings(tmp_path).dataset_options()).valid
    assert validation_loss(model, valid, 2, 2) == pytest.approx(result.best_val_loss, abs=1e-5)
    assert (tmp_path / "early" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_line_cut_short_by_a_crash_is_skipped_on_resume(tmp_path):
    from mlxtune.train.metrics import MetricsLog, read_metrics
    from mlxtune.train.plot import plot_losses

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 2.5}\n{"step": 2, "train_loss": 2.4}\n{"step": 3, "train_lo',
                    encoding="utf-8")
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert plot_losses(path, tmp_path / "loss.png") == tmp_path / "loss.png"
    MetricsLog(path).trim(after_step=1)
    assert path.read_text(encoding="utf-8") == '{"step": 1, "train_loss": 2.5}\n'


def test_resume_takes_safe_flags_and_refuses_the_others(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_settings(_settings(run_dir).validate(), run_dir / "config.yaml")
    changed = resume_settings(run_dir, {"iters": 9, "learning_rate": 1e-3, "patience": 2, "rank": None})
    assert (changed.iters, changed.learning_rate, changed.patience, changed.rank) == (9, 1e-3, 2, 8)
    # the run's own values may be repeated (paths compared resolved)
    assert resume_settings(run_dir, {"rank": 8, "data": str(WIKISQL), "dropout": 0.1}).rank == 8
    with pytest.raises(UsageError) as refused:
        resume_settings(run_dir, {"rank": 16, "batch_size": 2, "seed": 3, "learning_rate": 1e-3})
    assert "--rank (the run has 8)" in refused.value.message and "--seed (the run has 0)" in refused.value.message
    assert "--batch-size" not in refused.value.message  # unchanged: not refused
    assert "--learning-rate" in refused.value.hint  # the hint lists what may change
