"""A run directory's safety: one writer at a time, no dead ends, and resume that restores everything it should.

- One writer: `.lock` in the run directory holds the writer's PID under an advisory lock (flock). The kernel drops
  the lock when its process dies, however it dies, so a lock left by a killed run is simply taken over.
- No dead ends: a directory with nothing trained yet (killed before its first checkpoint) can be reused by a new
  run or resumed from step 0; a finished run says how to extend it.
- Resume: the newest intact checkpoint (see checkpoint.py) plus the progress saved with it — best validation loss
  and step, the patience counter, the starting validation loss — and the fingerprint of the data it was trained on.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import math
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from mlxtune.errors import UsageError
from mlxtune.runs import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, BEST_DIR, CHECKPOINTS_DIR, CONFIG_FILE, LATEST_POINTER,
                          LOCK_FILE, METRICS_FILE, PLOT_FILE, RUN_FILE, RUN_MARKER, TEMPLATE_FILE, check_layout,
                          is_marked, mark_run_dir)
from mlxtune.train.checkpoint import checkpoint_step, resumable_checkpoint

# What a run writes before its first checkpoint: a directory holding only these has nothing trained in it.
UNTRAINED_FILES = {CONFIG_FILE, RUN_FILE, METRICS_FILE, PLOT_FILE, BEST_DIR, CHECKPOINTS_DIR, TEMPLATE_FILE, LOCK_FILE,
                   RUN_MARKER}
DATA_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".txt"}  # what a data directory's fingerprint covers
_held: dict[Path, int] = {}  # run directories this process holds the lock of (a failed call may leave one held)


def lock_run_dir(run_dir: Path) -> None:
    """Take the run's writer lock (creating the directory), or a UsageError naming the PID that holds it.

    The lock file is created new, or opened only when it is a plain file of this user with one name: a link (to a
    user's thesis, planted in a shared folder), a hard link, a folder or another user's file is refused, never
    opened for writing, so nothing outside the run is ever truncated."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _held:
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_owner(run_dir)
    if created:
        mark_run_dir(run_dir)
    fd = _open_lock(run_dir / LOCK_FILE)
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


def _check_owner(run_dir: Path) -> None:
    """A run directory of another user (one planted in a shared temporary folder) is refused: its owner could swap
    any file in it for a link between our checks and our writes."""
    if not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file, not a folder", "choose another --out")
    if hasattr(os, "geteuid") and run_dir.stat().st_uid != os.geteuid():
        raise UsageError(f"run directory {run_dir} belongs to another user", "choose an --out of your own")


def _open_lock(lock: Path) -> int:
    """A descriptor of `lock`, created new (O_EXCL) or an existing plain file of ours (never through a link)."""
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        pass
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.EMLINK, errno.ENXIO, errno.EACCES, errno.EPERM):
            raise
        fd = None
    info = os.fstat(fd) if fd is not None else os.lstat(lock)
    if not stat.S_ISREG(info.st_mode) or os.path.islink(lock):
        problem = "a symbolic link" if os.path.islink(lock) else "a folder" if stat.S_ISDIR(info.st_mode) else (
            "not a plain file")
    elif info.st_nlink > 1:
        problem = f"a hard link ({info.st_nlink} names for one file)"
    elif hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        problem = "owned by another user"
    elif fd is None:
        problem = "not readable and writable"
    else:
        return fd
    if fd is not None:
        os.close(fd)
    raise UsageError(f"{lock} is {problem}, not mlxtune's lock file: refusing to open it",
                     f"remove it if you know what it is (rm {lock} removes only the link or name), then run again")
def unlock_run_dir(run_dir: Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # the file stays: removing it would let a waiting opener lock a file nobody else sees


def has_training(run_dir: Path) -> bool:
    """Whether a run directory holds anything trained (a checkpoint or an adapter) or files a run does not write."""
    if not run_dir.is_dir():
        return False
    return has_checkpoint(run_dir) or any(p.name not in UNTRAINED_FILES for p in run_dir.iterdir())


def has_checkpoint(run_dir: Path) -> bool:
    checkpoints = run_dir / CHECKPOINTS_DIR
    return checkpoints.is_dir() and any(checkpoint_step(p) is not None for p in checkpoints.iterdir())


def claim_run_dir(run_dir: Path, resume: bool) -> list[str]:
    """Lock `run_dir` for this process and check it suits a new run (or a resume); returns notes for the user.

    A new run may reuse a directory mlxtune created (its RUN_MARKER) where nothing was trained yet: the files the
    stopped run wrote are removed, nothing else. A folder mlxtune did not create is never emptied."""
    run_dir = Path(run_dir)
    if not resume:
        _refuse_foreign(run_dir)  # before the lock: a folder of the user's gets no .lock file either
    lock_run_dir(run_dir)
    check_layout(run_dir)
    notes = []
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise UsageError(f"{run_dir} is not an mlxtune run (no {CONFIG_FILE})",
                             "give the run directory to --resume, or start a new run with --out")
        return notes
    if has_training(run_dir):
        raise UsageError(f"run directory {run_dir} already exists",
                         f"continue it with: mlxtune lora --resume {run_dir}   (or pick another --out)")
    if not is_marked(run_dir):  # an empty folder (or one holding only our lock): ours from now on
        _refuse_foreign(run_dir)
        mark_run_dir(run_dir)
    if remove_untrained(run_dir):
        notes.append(f"{run_dir} held a run stopped before its first checkpoint: starting it afresh")
    return notes


def _refuse_foreign(run_dir: Path) -> None:
    """A UsageError when `run_dir` holds something but mlxtune did not create it (no RUN_MARKER)."""
    if not run_dir.is_dir() or is_marked(run_dir):
        return
    if has_checkpoint(run_dir):
        return  # a run of an older mlxtune (no marker) with a checkpoint: "already exists, --resume it" follows
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
    if entries:
        raise UsageError(f"--out {run_dir} is a folder mlxtune did not create (it holds {', '.join(entries[:4])}"
                         f"{', ...' if len(entries) > 4 else ''}); refusing to replace its files",
                         "choose a new or empty --out folder (or move those files away)")


def remove_untrained(run_dir: Path) -> bool:
    """Remove what a run stopped before its first checkpoint wrote (only mlxtune's own names); whether any was."""
    removed = False
    for name in (CONFIG_FILE, RUN_FILE, METRICS_FILE, PLOT_FILE, TEMPLATE_FILE):
        if (run_dir / name).is_file() or (run_dir / name).is_symlink():
            (run_dir / name).unlink()  # a link: the link itself, never what it points to
            removed = True
    own = {BEST_DIR: (ADAPTER_FILE, ADAPTER_CONFIG_FILE), CHECKPOINTS_DIR: (LATEST_POINTER,)}
    for folder, names in own.items():
        path = run_dir / folder
        if not path.is_dir() or path.is_symlink():
            continue
        for item in path.iterdir():
            if item.name in names or (folder == CHECKPOINTS_DIR and item.name.startswith(".step-")):
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        if not any(path.iterdir()):
            path.rmdir()
        removed = True
    return removed


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


# Settings a resumed run may change: how long it runs, how often it evaluates/saves/logs, the optimizer's step sizes
# (the schedule is a function of the step, so a new one simply takes over) and machine-only knobs. Everything else
# decides what the adapter or the data order is, so changing it would silently train a different run: checkpoints
# save those (adapter_settings) and a resume whose config.yaml was edited since is refused.
CHANGEABLE_ON_RESUME = (
    "iters", "epochs", "eval_every", "save_every", "report_every", "val_batches", "patience", "min_delta",
    "learning_rate", "schedule", "warmup_steps", "weight_decay", "grad_clip", "grad_checkpoint", "report_to",
    "threads", "cache_limit_gb", "memory",
    "sample_every",  # grpo: how often completions are written to samples.jsonl
)
NOT_COMPARED = ("out", "data")  # where the run lives; the data is compared by its fingerprint instead


def adapter_settings(settings) -> dict:
    """The settings that decide the adapter (rank, seed, dropout, ...), as a checkpoint saves them."""
    return {key: value for key, value in settings.to_dict().items()
            if key not in CHANGEABLE_ON_RESUME and key not in NOT_COMPARED}


def settings_changes(saved: dict, current: dict) -> list[str]:
    """`key: saved → current` for each adapter-deciding setting that differs (keys unknown to either are skipped)."""
    changes = []
    for key, value in saved.items():
        if key in current and setting_differs(value, current[key]):
            changes.append(f"{key} {value!r} → {current[key]!r}")
    return changes


def apply_resume_flags(settings, overrides: dict, run_dir) -> None:
    """Apply flags given to a resume (`overrides`, None = not given) to the run's own settings: the
    CHANGEABLE_ON_RESUME ones are taken, any other that differs from the run's value is refused, naming it."""
    refused = []
    for key, value in overrides.items():
        if value is None:
            continue
        if key in CHANGEABLE_ON_RESUME:
            setattr(settings, key, value)
        elif key != "out" and setting_differs(getattr(settings, key), value):
            refused.append(f"--{key.replace('_', '-')} (the run has {getattr(settings, key)!r})")
    if refused:
        raise UsageError(f"can't change {', '.join(refused)} when resuming {run_dir}",
                         "drop those flags, or start a new run with --out; --resume may change "
                         + ", ".join(f"--{k.replace('_', '-')}" for k in CHANGEABLE_ON_RESUME))


def setting_differs(saved, given) -> bool:
    """Whether a setting's value `given` (a flag, an edited config.yaml) is not the `saved` one."""
    if saved is None or given is None:
        return saved != given
    if isinstance(given, str) and isinstance(saved, str) and Path(given).exists() and Path(saved).exists():  # --model / --data paths
        return Path(given).resolve() != Path(saved).resolve()
    if isinstance(saved, list) and isinstance(given, str):  # --target-modules a,b against the saved list
        given = [m.strip() for m in given.split(",") if m.strip()]
    if isinstance(saved, float) or isinstance(given, float):
        return not math.isclose(float(saved), float(given))
    if saved is not None and given is not None and not isinstance(saved, type(given)):
        return str(saved) != str(given)
    return saved != given


def check_resume_state(run_dir: Path, state: dict, total_steps: int, data: dict | None, settings=None) -> None:
    """Refuse a resume that can't continue: finished, early-stopped, past this run's steps, other data, or
    adapter-deciding settings edited in config.yaml since the checkpoint."""
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
    check_settings_unchanged(run_dir, state, settings)


def check_settings_unchanged(run_dir: Path, state: dict, settings) -> None:
    """Refuse a resume whose config.yaml was edited, since the checkpoint `state`, in a setting that decides the
    adapter (seed, dropout, rank, ...): like other data, it would silently train a different run."""
    saved = state.get("settings")
    if settings is None or not isinstance(saved, dict):
        return  # a checkpoint of an older mlxtune: nothing saved to compare with
    changes = settings_changes(saved, adapter_settings(settings))
    if changes:
        raise UsageError(f"{run_dir / CONFIG_FILE} changed since step {state.get('step')} was saved: "
                         f"{', '.join(changes[:3])} (the checkpoint was trained with the old values)",
                         "put the old values back to resume, or start a new run with the new ones: mlxtune lora "
                         f"--config {run_dir / CONFIG_FILE} --out NEW_RUN")
