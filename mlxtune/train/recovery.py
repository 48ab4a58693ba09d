"""A run directory's safety: one writer at a time, no dead ends, and resume that restores everything it should.

- One writer: `.lock` in the run directory holds the writer's PID under an advisory lock (flock). The kernel drops
  the lock when its process dies, however it dies, so a lock left by a killed run is simply taken over.
- No dead ends: a directory with nothing trained yet (killed before its first checkpoint) can be reused by a new
  run or resumed from step 0; a finished run says how to extend it.
- Resume: the newest intact checkpoint (see checkpoint.py) plus the progress saved with it — best validation loss
  and step, the patience counter, the starting validation loss — and the fingerprint of the data it was trained on.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mlxtune.errors import UsageError
from mlxtune.runs import BEST_DIR, CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, PLOT_FILE, RUN_FILE, TEMPLATE_FILE
from mlxtune.train.checkpoint import checkpoint_step, resumable_checkpoint

LOCK_FILE = ".lock"  # in the run directory: the PID of the process writing it
# What a run writes before its first checkpoint: a directory holding only these has nothing trained in it.
UNTRAINED_FILES = {CONFIG_FILE, RUN_FILE, METRICS_FILE, PLOT_FILE, BEST_DIR, CHECKPOINTS_DIR, TEMPLATE_FILE, LOCK_FILE}
DATA_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".txt"}  # what a data directory's fingerprint covers
_held: dict[Path, int] = {}  # run directories this process holds the lock of (a failed call may leave one held)


def lock_run_dir(run_dir: Path) -> None:
    """Take the run's writer lock (creating the directory), or a UsageError naming the PID that holds it."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UsageError(f"run {run_dir} is in use by process {holder}",
                         f"wait for it to finish (or stop it: kill {holder}), then: mlxtune lora --resume {run_dir}"
                         ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd


def unlock_run_dir(run_dir: Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # the file stays: removing it would let a waiting opener lock a file nobody else sees


def has_training(run_dir: Path) -> bool:
    """Whether a run directory holds anything trained (a checkpoint or an adapter) or files a run does not write."""
    if not run_dir.is_dir():
        return False
    checkpoints = run_dir / CHECKPOINTS_DIR
    if checkpoints.is_dir() and any(checkpoint_step(p) is not None for p in checkpoints.iterdir()):
        return True
    return any(p.name not in UNTRAINED_FILES for p in run_dir.iterdir())


def claim_run_dir(run_dir: Path, resume: bool) -> list[str]:
    """Lock `run_dir` for this process and check it suits a new run (or a resume); returns notes for the user.

    A new run may reuse a directory where nothing was trained yet (its files are replaced); otherwise a UsageError
    that names the commands that work."""
    lock_run_dir(run_dir)
    notes = []
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise UsageError(f"{run_dir} is not an mlxtune run (no {CONFIG_FILE})",
                             "give the run directory to --resume, or start a new run with --out")
        return notes
    if has_training(run_dir):
        raise UsageError(f"run directory {run_dir} already exists",
                         f"continue it with: mlxtune lora --resume {run_dir}   (or pick another --out)")
    leftovers = [p for p in run_dir.iterdir() if p.name != LOCK_FILE]
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if leftovers:
        notes.append(f"{run_dir} held a run stopped before its first checkpoint: starting it afresh")
    return notes


# ------------------------------------------------------------------------------------------------ data


def data_fingerprint(data_path: Path) -> dict[str, dict]:
    """Size and SHA-256 of each data file (the file itself, or the files of a data directory)."""
    data_path = Path(data_path)
    files = [data_path] if data_path.is_file() else sorted(
        p for p in data_path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith("."))
    fingerprint = {}
    for file in files:
        with open(file, "rb") as handle:
            fingerprint[file.name] = {"bytes": file.stat().st_size,
                                      "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}
    return fingerprint


def data_changes(saved: dict, current: dict) -> list[str]:
    changes = [f"{name} was removed" for name in saved if name not in current]
    changes += [f"{name} is new" for name in current if name not in saved]
    changes += [f"{name} changed" for name in saved if name in current and saved[name] != current[name]]
    return changes


# ---------------------------------------------------------------------------------------------- resume


@dataclass
class ResumePoint:
    checkpoint: Path | None  # None: nothing saved yet, start at step 0
    warnings: list[str] = field(default_factory=list)


def find_resume_point(run_dir: Path, total_steps: int) -> ResumePoint:
    """The checkpoint to resume from (the newest intact one), or step 0 when there is none."""
    checkpoint, warnings = resumable_checkpoint(run_dir)
    if checkpoint is None:
        what = "no intact checkpoint" if warnings else "no checkpoint yet"
        warnings.append(f"{what} in {run_dir}: starting at step 0")
    return ResumePoint(checkpoint, warnings)


def check_resume_state(run_dir: Path, state: dict, total_steps: int, data: dict | None) -> None:
    """Refuse a resume that can't continue: finished, early-stopped, past this run's steps, or other data."""
    step, saved_total = state["step"], state.get("total_steps", total_steps)
    if step > total_steps:
        raise UsageError(f"the checkpoint of {run_dir} is at step {step}, beyond this run's {total_steps} steps",
                         f"continue with --iters {step + 1} or more, or use it as it is: mlxtune fuse {run_dir} "
                         "--out fused/NAME")
    if step == total_steps:
        raise UsageError(f"run {run_dir} is finished ({step} of {saved_total} steps)",
                         f"train it further with: mlxtune lora --resume {run_dir} --iters {step + max(step, 1)}"
                         "   (any number above " + str(step) + ")")
    if state.get("stopped") == "early-stopped":
        raise UsageError(f"run {run_dir} stopped early at step {step} (no validation gain); nothing to resume",
                         f"use its best adapter: mlxtune fuse {run_dir} --checkpoint best --out fused/NAME")
    saved = state.get("data")
    if data is not None and saved is not None and data_changes(saved, data):
        raise UsageError(f"the data changed since {run_dir} was saved at step {step}: "
                         + ", ".join(data_changes(saved, data)[:3]),
                         "put the original files back to resume, or start a new run on the new data: "
                         f"mlxtune lora --config {run_dir / CONFIG_FILE} --out NEW_RUN")


def progress_state(result, evals_without_gain: int, total_steps: int, data: dict | None) -> dict:
    """What a checkpoint saves beside the weights so that resume continues the same run."""
    return {"total_steps": total_steps, "initial_val_loss": result.initial_val_loss,
            "best_val_loss": result.best_val_loss, "best_step": result.best_step,
            "evals_without_gain": evals_without_gain, "stopped": result.stopped, "data": data}


def restore_progress(state: dict, result) -> int:
    """Put the saved progress back into `result`; returns the patience counter."""
    result.initial_val_loss = state.get("initial_val_loss")
    result.best_val_loss = state.get("best_val_loss")
    result.best_step = state.get("best_step")
    return int(state.get("evals_without_gain") or 0)
