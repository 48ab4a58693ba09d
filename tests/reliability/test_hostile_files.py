"""Hostile and careless files (issue 23, items 1-3 and the bad run files): each attack exactly as a user or another
local user would make it. The issue's own commands run through the real CLI; their variants call the same library
function the CLI calls (in-process: each CLI start imports mlx-lm, ~10 s on a loaded machine). Every one must end in
a one-line error (exit 2, a UsageError) or a correct run, and the file the attack aims at must be byte for byte what
it was.

One real run (4 steps of the bundled model, on a copy of the model in a temporary folder so that an attack on the
base model can't touch the repository's) is trained once; each test works on its own copy of it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import MLXTUNE, MODEL, WIKISQL
from mlxtune.errors import UsageError
from mlxtune.export import export
from mlxtune.fuse import fuse_run
from mlxtune.library import remove_model
from mlxtune.runs import RUN_MARKER, check_output, explain_disk_full, open_run
from mlxtune.storage import atomic_write_text, check_writable, clean_stale_temp, create_file, disk_full_error
from mlxtune.train.loop import resume_settings
from mlxtune.train.metrics import MetricsLog, read_metrics
from mlxtune.train.recovery import claim_run_dir, unlock_run_dir
from reliability_tools import env_with

THESIS = "Chapter 1. Four years of work that exists in one copy.\n"
TRAIN = ["--iters", "4", "--batch-size", "2", "--max-seq-length", "64", "--eval-every", "2", "--save-every", "2",
         "--val-batches", "1", "--report-every", "1", "--lr", "3e-3", "--dropout", "0.1"]


def cli(*args, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*MLXTUNE, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env_with())


def refused(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2 with our one-line `error:` (plus its hint), never a traceback or `internal error`."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "internal error" not in result.stderr and "Traceback" not in result.stderr, lines
    for word in words:
        assert word in errors[0], errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (not following links) with its bytes: what an attack must leave unchanged."""
    return {str(p.relative_to(folder)): (b"->" + os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, Path]:
    """(base model copy, a trained run on it)."""
    root = tmp_path_factory.mktemp("hostile")
    base = root / "base"
    shutil.copytree(MODEL, base)
    run = root / "trained"
    result = cli("lora", "--model", base, "--data", WIKISQL, "--out", run, *TRAIN)
    assert result.returncode == 0, result.stderr
    return base, run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A private copy of the trained run in runs/demo (links copied as links)."""
    copy = tmp_path / "runs" / "demo"
    shutil.copytree(base_run[1], copy, symlinks=True)
    return copy


@pytest.fixture
def thesis(tmp_path) -> Path:
    path = tmp_path / "thesis.txt"
    path.write_text(THESIS)
    return path


# ------------------------------------------------------------------------ 1. a .lock that is not mlxtune's


@pytest.mark.parametrize("resume", [False, True], ids=["new-run", "resume"])
def test_a_lock_linked_to_a_file_is_refused_and_the_file_untouched(run, thesis, resume):
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(thesis)  # ln -s ~/thesis.txt run/.lock
    if resume:
        result = cli("lora", "--resume", run, "--iters", "6")
    else:
        result = cli("lora", "--model", MODEL, "--data", WIKISQL, "--out", run, *TRAIN)
    refused(result, "symbolic link")
    assert thesis.read_text() == THESIS
    assert (run / ".lock").is_symlink()  # refused, not "repaired": the user decides


@pytest.mark.parametrize("resume", [False, True], ids=["new-run", "resume"])
@pytest.mark.parametrize("plant", ["symlink-in-fresh-folder", "hard-link", "folder", "other-user"])
def test_a_lock_that_is_not_mlxtunes_is_refused(tmp_path, run, thesis, plant, resume):
    """What `lora` calls first (claim_run_dir), on each kind of planted .lock."""
    target = tmp_path / "shared-tmp" / "run" if plant == "symlink-in-fresh-folder" else run
    target.mkdir(parents=True, exist_ok=True)
    (target / ".lock").unlink(missing_ok=True)
    if plant == "symlink-in-fresh-folder":
        (target / ".lock").symlink_to(thesis)
        words = "symbolic link"
    elif plant == "hard-link":
        os.link(thesis, target / ".lock")  # ln ~/thesis.txt run/.lock
        words = "hard link"
    elif plant == "folder":
        (target / ".lock").mkdir()
        (target / ".lock" / "keep").write_text(THESIS)
        thesis = target / ".lock" / "keep"
        words = "a folder"
    else:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            pytest.skip("needs root to give a file away")
        shutil.copy(thesis, target / ".lock")
        os.chown(target / ".lock", 65534, 65534)
        thesis = target / ".lock"
        words = "another user"
    with pytest.raises(UsageError, match=words):
        claim_run_dir(target, resume)
    assert thesis.read_text() == THESIS


def test_files_mlxtune_creates_never_follow_a_planted_link(tmp_path, thesis):
    # create_file: a link (or anything) under the name is an error, never opened
    (tmp_path / "new").symlink_to(thesis)
    with pytest.raises(FileExistsError):
        create_file(tmp_path / "new", "overwritten")
    # atomic_write_text: a link planted at its temporary name is replaced, not written through
    (tmp_path / ".config.yaml.tmp").symlink_to(thesis)
    atomic_write_text(tmp_path / "config.yaml", "seed: 1\n")
    assert (tmp_path / "config.yaml").read_text() == "seed: 1\n"
    # the write probe: a link at the old fixed probe name is never opened
    (tmp_path / f".mlxtune-write-probe-{os.getpid()}").symlink_to(thesis)
    check_writable(tmp_path)
    assert thesis.read_text() == THESIS


def test_metrics_log_linked_out_of_the_run_is_refused(run, thesis):
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(thesis)
    with pytest.raises(UsageError, match="metrics.jsonl is a link"):
        MetricsLog(run / "metrics.jsonl")  # what training opens its log with, before any write
    assert thesis.read_text() == THESIS


# ------------------------------------------------------------------ 2. --overwrite never deletes its own input


def test_fuse_into_its_own_run_with_overwrite_is_refused(run):
    before = snapshot(run)
    refused(cli("fuse", run, "--out", run, "--overwrite"), "--out")  # removed the run, exit 0, before
    assert snapshot(run) == before


@pytest.mark.parametrize("command", [
    ("export", "{run}", "hf", "{run}"),
    ("export", "{run}", "gguf-adapter", "{run}/adapters.safetensors"),
    ("export", "{run}", "lmstudio", "{runs}"),
    ("fuse", "{run}", None, "{runs}"),
    ("fuse", "{run}", None, "{base}"),
    ("export", "{run}", "hf", "{base}"),
    ("export", "{base}", "hf", "{base}"),
    ("export", "{base}", "gguf", "{base}/model.gguf"),
], ids=["export-into-run", "export-inside-run", "export-into-runs", "fuse-into-runs", "fuse-into-base",
        "export-into-base", "export-model-into-itself", "export-model-inside-itself"])
def test_an_output_that_is_or_holds_the_input_is_refused(run, base_run, command):
    """`fuse RUN --out ... --overwrite` / `export ... --overwrite`, through the functions those commands call."""
    base = base_run[0]
    sibling = run.parent / "other"
    shutil.copytree(run, sibling, symlinks=True)
    before = {path: snapshot(path) for path in (run, sibling, base)}
    action, source, fmt, out = (part.format(run=run, runs=run.parent, base=base) if part else part
                                for part in command)
    with pytest.raises(UsageError, match="--out"):
        if action == "fuse":
            fuse_run(source, out, overwrite=True)
        else:
            export(source, fmt, out, overwrite=True)
    assert {path: snapshot(path) for path in before} == before


def test_check_output_protects_library_entries(tmp_path):
    library = tmp_path / "models"
    (library / "kept").mkdir(parents=True)
    for out in (library, library / "kept", library / "kept" / "sub"):
        with pytest.raises(UsageError, match="library model"):
            check_output(out, library_entries=[library / "kept"])
    check_output(tmp_path / "fused" / "demo", library_entries=[library / "kept"])  # beside it: fine


# ------------------------------------------------------------- 3. a folder mlxtune did not create is not reset


def test_a_folder_with_run_like_names_is_not_emptied(tmp_path):
    folder = tmp_path / "my-project"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "best").mkdir()
    (folder / "config.yaml").write_text("my: own config\n")
    (folder / "metrics.jsonl").write_text('{"my": "measurements"}\n')
    (folder / "checkpoints" / "notes.txt").write_text("mine")
    (folder / "best" / "photo.jpg").write_bytes(b"\xff\xd8 mine")
    before = snapshot(folder)
    refused(cli("lora", "--model", MODEL, "--data", WIKISQL, "--out", folder, *TRAIN), "did not create")
    assert snapshot(folder) == before
    assert not (folder / ".lock").exists()


def test_a_marked_run_stopped_before_its_first_checkpoint_is_reset_of_its_own_files_only(tmp_path):
    folder = tmp_path / "run"
    (folder / "best").mkdir(parents=True)
    (folder / RUN_MARKER).write_text("created by mlxtune\n")
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / "metrics.jsonl").write_text('{"step": 1, "train_loss": 9.0}\n')
    (folder / "best" / "adapters.safetensors").write_bytes(b"half-written")
    (folder / "best" / "mine.txt").write_text("the user's")
    try:
        notes = claim_run_dir(folder, resume=False)  # what `lora --out run` does first
    finally:
        unlock_run_dir(folder)
    assert any("starting it afresh" in note for note in notes)
    assert sorted(p.name for p in folder.rglob("*")) == [".lock", RUN_MARKER, "best", "mine.txt"]
    assert (folder / "best" / "mine.txt").read_text() == "the user's"


def test_an_older_run_with_bad_metrics_lines_still_resumes_and_fuses(run, tmp_path):
    """A run of an older mlxtune (no marker) whose metrics.jsonl got a bad byte, a null step, text for a loss."""
    (run / RUN_MARKER).unlink()
    with open(run / "metrics.jsonl", "ab") as handle:
        handle.write(b'{"step": 3, "train_loss": 1.\xff}\n{"step": null}\n{"step": 2, "val_loss": "high"}\n[1]\n')
    records = read_metrics(run / "metrics.jsonl")
    assert records and all(isinstance(r["step"], int) for r in records)
    assert fuse_run(run, tmp_path / "fused").max_abs_diff < 1e-3  # fuse's model card reads the metrics
    result = cli("lora", "--resume", run, "--iters", "6")
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "checkpoints" / "step-0000006" / "state.json").read_text())["step"] == 6


def test_metrics_log_as_a_folder_is_one_line_on_resume(run):
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    refused(cli("lora", "--resume", run, "--iters", "6"), "metrics.jsonl")


@pytest.mark.parametrize("damage, words", [
    ("metrics-folder", "metrics.jsonl"),
    ("checkpoints-file", "checkpoints"),
    ("latest-folder", "latest"),
    ("config-not-utf8", "config.yaml"),
    ("run-json-not-utf8", "run.json"),
], ids=["metrics.jsonl-is-a-folder", "checkpoints-is-a-file", "latest-is-a-folder", "config.yaml-invalid-utf8",
        "run.json-invalid-utf8"])
def test_a_damaged_run_layout_is_one_line(run, damage, words):
    """What `lora --resume` (resume_settings, then claim_run_dir) and fuse/eval/export (open_run) call first."""
    if damage == "metrics-folder":
        (run / "metrics.jsonl").unlink()
        (run / "metrics.jsonl").mkdir()
    elif damage == "checkpoints-file":
        shutil.rmtree(run / "checkpoints")
        (run / "checkpoints").write_text("not a folder")
    elif damage == "latest-folder":
        (run / "checkpoints" / "latest").unlink()
        (run / "checkpoints" / "latest").mkdir()
    elif damage == "config-not-utf8":
        (run / "config.yaml").write_bytes(b"seed: \xff\xfe\n" + (run / "config.yaml").read_bytes())
    else:
        (run / "run.json").write_bytes(b"\xff" + (run / "run.json").read_bytes())
    with pytest.raises(UsageError, match=words):
        open_run(run)
    if damage == "run-json-not-utf8":
        return  # resume rewrites run.json (the data facts) and never needed it whole
    with pytest.raises(UsageError, match=words):
        if damage == "config-not-utf8":
            resume_settings(run, {})
        else:
            try:
                claim_run_dir(run, resume=True)
            finally:
                unlock_run_dir(run)


def test_an_edited_seed_is_refused_on_resume(run):
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("\nseed: 0\n", "\nseed: 7\n"))
    refused(cli("lora", "--resume", run, "--iters", "6"), "seed", "changed since")
    assert not (run / "checkpoints" / "step-0000006").exists()


@pytest.mark.parametrize("key, value", [("dropout", "0.3"), ("rank", "4"), ("max_seq_length", "32")])
def test_an_edited_adapter_setting_is_refused_on_resume(run, key, value):
    config = (run / "config.yaml").read_text()
    edited = "\n".join(f"{key}: {value}" if line.startswith(f"{key}:") else line for line in config.splitlines())
    (run / "config.yaml").write_text(edited + "\n")
    with pytest.raises(UsageError, match=f"{key} .* changed since|changed since .*{key}"):
        resume_settings(run, {})


# --------------------------------------------------------------------------- models rm, disk full, temp


def test_models_rm_refuses_a_model_runs_use_or_one_in_training(tmp_path):
    home = Path(os.environ["MLXTUNE_HOME"])
    entry = home / "models" / "hostile-rm"
    shutil.copytree(MODEL, entry)
    (entry / "mlxtune.json").write_text(json.dumps({
        "name": "hostile-rm", "path": str(entry), "architecture": "llama", "parameters": 1, "quantization": None,
        "dtype": "float32", "size_bytes": 1, "source": "test"}))
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "run.json").write_text(json.dumps({"base_model": str(entry)}))
    refused(cli("models", "rm", "hostile-rm", cwd=tmp_path), "runs")
    assert (entry / "config.json").is_file()

    endless = ["--iters", "100000", "--save-every", "100000", "--eval-every", "100000", "--batch-size", "2",
               "--max-seq-length", "64", "--val-batches", "1"]
    holder = subprocess.Popen([*MLXTUNE, *map(str, ["lora", "--model", "hostile-rm", "--data", WIKISQL, "--out",
                                                    tmp_path / "training", *endless])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_with())
    try:
        deadline = time.time() + 120
        while not (tmp_path / "training" / "config.yaml").exists():  # written after the model is held
            assert holder.poll() is None and time.time() < deadline, "the training run did not start"
            time.sleep(0.2)
        refused(cli("models", "rm", "hostile-rm", "--force"), "in use by a training run")
        assert (entry / "config.json").is_file()
    finally:
        holder.kill()
        holder.wait()
    remove_model("hostile-rm", force=True)
    assert not entry.exists()


def test_disk_full_in_a_run_points_to_resume(run):
    error = explain_disk_full(disk_full_error(run / "checkpoints" / ".step-0000006.tmp"))
    assert f"mlxtune lora --resume {run}" in error.hint


def test_a_killed_launchers_temp_folder_is_removed():
    import tempfile

    stale = Path(tempfile.gettempdir()) / "mlxtune-launch-999999999-abc"
    stale.mkdir(exist_ok=True)
    clean_stale_temp("mlxtune-launch-")
    assert not stale.exists()


def test_models_rm_lock_is_shared_between_trainers(tmp_path):
    """Two runs on one model hold the lock together (shared), `models rm` takes it alone (exclusive)."""
    from mlxtune.library import _in_training

    folder = tmp_path / "model"
    folder.mkdir()
    first = os.open(folder, os.O_RDONLY)
    second = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(first, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(second, fcntl.LOCK_SH | fcntl.LOCK_NB)
        assert _in_training(folder)
    finally:
        os.close(first)
        os.close(second)
    assert not _in_training(folder)
