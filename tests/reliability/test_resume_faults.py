"""Resume after real faults: damaged checkpoints, a run killed before its first checkpoint, two writers, a finished
run, changed data, a cut-short config, Ctrl-C in the first validation. The bundled model, real MLX, the real CLI."""

from __future__ import annotations

import io
import shutil
import signal
import subprocess
import time

import pytest
from rich.console import Console

from conftest import MLXTUNE, MODEL, WIKISQL, make_pairs
from mlxtune.errors import UsageError
from mlxtune.train.checkpoint import resumable_checkpoint, verify_checkpoint
from mlxtune.train.loop import finetune, resume_settings
from mlxtune.ui import make_console
from reliability_tools import assert_run_intact, assert_same_adapter, cli, env_with, lora_args, settings


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every resumed one must equal (a high learning rate: validation gets worse after its
    best step, so a resume that forgets the best-so-far is caught)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = finetune(settings(out, min_delta=1.0, patience=4), console=make_console(quiet=True))
    assert result.steps == 8
    return out, result


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The same run through the CLI, SIGKILLed right after its step-6 checkpoint is complete."""
    out = tmp_path_factory.mktemp("killed") / "run"
    result = cli(*lora_args(out, min_delta=1.0, patience=4), fault="checkpoint.latest:3")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step-0000006"
    assert_run_intact(out)
    return out


def _resume(run_dir, **overrides):
    buffer = io.StringIO()
    console = Console(file=buffer, width=200)
    result = finetune(resume_settings(run_dir, overrides), resume=True, console=console)
    return result, buffer.getvalue()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) - 5] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated adapter": (lambda c: _truncate(c / "adapters.safetensors"), "truncated or half-written"),
    "bit-flipped optimizer state": (lambda c: _flip_a_bit(c / "optimizer.safetensors"), "does not match its checksum"),
    "half-written (no manifest)": (lambda c: (c / "manifest.json").unlink(), "no manifest"),
    "state.json missing": (lambda c: (c / "state.json").unlink(), "state.json is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_skipped_for_the_previous_good_one(killed, reference, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    harm, reason = DAMAGE[damage]
    harm(run / "checkpoints" / "step-0000006")
    assert verify_checkpoint(run / "checkpoints" / "step-0000006") is not None
    result, output = _resume(run)
    assert f"skipping checkpoint step-0000006: " in output and reason in output, output
    assert "resuming from step-0000004" in output
    assert result.steps == 8
    assert_same_adapter(run / "adapters.safetensors", reference[0] / "adapters.safetensors")
    assert_run_intact(run)


def test_resume_keeps_best_patience_and_starting_loss(killed, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    ref_dir, ref = reference
    assert ref.best_step not in (None, 6, 8), "the reference must have its best before the resumed evaluations"
    resumed = cli("lora", "--resume", run, "--json")
    assert resumed.returncode == 0, resumed.stderr
    import json

    result = json.loads(resumed.stdout)
    for key in ("initial_val_loss", "best_val_loss", "best_step", "final_val_loss", "steps", "stopped"):
        assert result[key] == pytest.approx(getattr(ref, key), abs=1e-6), key
    assert_same_adapter(run / "best" / "adapters.safetensors", ref_dir / "best" / "adapters.safetensors")
    assert f"{ref.initial_val_loss:.3f} →" in resumed.stderr + resumed.stdout  # the summary keeps the starting loss


def test_finished_and_overshot_runs_say_what_works(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    with pytest.raises(UsageError, match="is finished \\(8 of 8 steps\\)") as finished:
        finetune(resume_settings(run, {}), resume=True, console=make_console(quiet=True))
    assert f"mlxtune lora --resume {run} --iters 16" in finished.value.hint
    with pytest.raises(UsageError, match="at step 8, beyond this run's 4 steps") as beyond:
        finetune(resume_settings(run, {"iters": 4}), resume=True, console=make_console(quiet=True))
    assert "--iters 9 or more" in beyond.value.hint
    extended, _ = _resume(run, iters=10)
    assert extended.steps == 10 and extended.initial_val_loss == reference[1].initial_val_loss


def test_changed_data_is_noticed_on_resume(killed, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(WIKISQL, data)
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(WIKISQL.resolve()), str(data)))
    with (data / "train.jsonl").open("a") as handle:
        handle.write('{"text": "one more record"}\n')
    with pytest.raises(UsageError, match="the data changed since .* step 6: train.jsonl changed") as changed:
        finetune(resume_settings(run, {}), resume=True, console=make_console(quiet=True))
    assert "--out NEW_RUN" in changed.value.hint


def test_a_cut_short_config_is_refused_not_filled_with_defaults(killed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    config = run / "config.yaml"
    text = config.read_text()
    config.write_text(text[: text.index("learning_rate:")])
    with pytest.raises(UsageError, match="config.yaml is incomplete \\(no learning_rate") as refused:
        resume_settings(run, {})
    assert "start a new run" in refused.value.hint


def test_killed_before_the_first_checkpoint_is_resumable_and_reusable(reference, tmp_path):
    run = tmp_path / "run"
    first = cli(*lora_args(run, min_delta=1.0, patience=4), fault="eval.batch:1")  # dies in the first validation
    assert first.returncode == -signal.SIGKILL
    assert (run / "config.yaml").is_file() and not (run / "checkpoints").exists()
    again = cli(*lora_args(run, min_delta=1.0, patience=4, iters=2))  # the same command again is not refused
    assert again.returncode == 0, again.stderr
    assert "stopped before its first checkpoint: starting it afresh" in again.stdout
    (run / "checkpoints").rename(tmp_path / "gone")  # and a resume of a run with no checkpoint starts at step 0
    result, output = _resume(run, iters=8)
    assert "no checkpoint yet" in output and "starting at step 0" in output and result.steps == 8
    assert_same_adapter(run / "adapters.safetensors", reference[0] / "adapters.safetensors")


def test_one_writer_per_run_and_a_dead_writers_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    writer = subprocess.Popen([*MLXTUNE, *lora_args(run, iters=2000, eval_every=1000, save_every=1)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_with())
    try:
        deadline = time.time() + 120
        while time.time() < deadline and resumable_checkpoint(run)[0] is None:
            time.sleep(0.2)
        assert (run / ".lock").read_text().strip() == str(writer.pid)
        second = cli("lora", "--resume", run)
        assert second.returncode == 2
        assert f"run {run} is in use by process {writer.pid}" in second.stderr and f"kill {writer.pid}" in second.stderr
    finally:
        writer.kill()
        writer.wait(timeout=60)
    step = int(resumable_checkpoint(run)[0].name.split("-")[1])
    taken_over = cli("lora", "--resume", run, "--iters", step + 1)
    assert taken_over.returncode == 0, taken_over.stderr
    assert (run / ".lock").read_text().strip() != str(writer.pid)
    assert_run_intact(run)


def test_ctrl_c_during_the_first_validation_saves_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = cli(*lora_args(run), fault="eval.batch:1:INT")
    assert result.returncode == 130, result.stderr
    assert "checkpoint saved at step 0" in result.stdout and f"mlxtune lora --resume {run}" in result.stdout
    checkpoint, warnings = resumable_checkpoint(run)
    assert checkpoint is not None and checkpoint.name == "step-0000000" and not warnings


# min_delta 1: no evaluation beats the starting one, so a resume that forgot the best-so-far would move best/.
PAIRS_RUN = dict(iters=6, batch_size=2, learning_rate=3e-3, dropout=0.1, eval_every=2, val_batches=1, save_every=2,
                 report_every=1, min_delta=1.0, patience=4)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_a_preference_run_killed_inside_a_checkpoint_resumes_to_the_uninterrupted_adapter(objective, tmp_path):
    """The engine's exact resume for preference runs too: SIGKILL while the step-4 checkpoint's optimizer state is
    written; the resume skips the half-written checkpoint, continues from step 2 and ends with the uninterrupted
    run's adapter and best/ (dropout on, so the per-step RNG matters)."""
    from mlxtune.train.preference.run import PreferenceSettings, resume_preference_settings, train_preference

    pairs = make_pairs(tmp_path / "pairs", train=12, valid=4)
    whole = tmp_path / "whole"
    reference = train_preference(PreferenceSettings(model=str(MODEL), data=str(pairs), out=str(whole),
                                                    objective=objective, **PAIRS_RUN), console=make_console(quiet=True))
    killed = tmp_path / "killed"
    flags = [str(x) for key, value in PAIRS_RUN.items() for x in (f"--{key.replace('_', '-')}", value)]
    first = cli(objective, "--model", MODEL, "--data", pairs, "--out", killed, *flags,
                fault="checkpoint.optimizer:2")
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert_run_intact(killed)
    buffer = io.StringIO()
    result = train_preference(resume_preference_settings(killed, {}), resume=True,
                              console=Console(file=buffer, width=200))
    assert result.steps == 6 and "resuming from step-0000002" in buffer.getvalue(), buffer.getvalue()
    assert (result.best_step, result.best_val, result.initial_val) == (
        reference.best_step, reference.best_val, reference.initial_val)
    assert_same_adapter(killed / "adapters.safetensors", whole / "adapters.safetensors")
    assert_same_adapter(killed / "best" / "adapters.safetensors", whole / "best" / "adapters.safetensors")
