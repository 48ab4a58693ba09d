"""Crash-safe checkpoints: every file is written to a temporary name, fsynced and renamed into place.

A checkpoint is a directory `checkpoints/step-NNNNNNN/` (adapter, optimizer state, state.json and a manifest of
their sizes and SHA-256, written last) that becomes visible only once complete; `checkpoints/latest` names the
newest one and is written after it. A SIGKILL at any moment leaves the previous checkpoint intact; resume checks
the manifest and falls back to the previous intact checkpoint when a file was truncated or altered on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxtune.errors import UsageError
from mlxtune.faults import fault_point
from mlxtune.storage import atomic_write_text, create_file, fsync_dir, fsync_file, writing  # noqa: F401 (re-exported)

from mlxtune.runs import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, CHECKPOINTS_DIR, LATEST_POINTER, MANIFEST_FILE,
                          OPTIMIZER_FILE, STATE_FILE, checkpoint_name)

KEEP_CHECKPOINTS = 2


def atomic_save_safetensors(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    try:
        tmp.unlink(missing_ok=True)  # MLX opens the name as it finds it: a link planted there is removed, not followed
        with writing(path, sum(a.nbytes for a in arrays.values())):
            mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
            fsync_file(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_adapter(run_dir: Path, weights: dict[str, mx.array], config: dict) -> None:
    """The adapter in mlx-lm's layout, loadable with `mlx_lm.generate --adapter-path RUN_DIR`."""
    atomic_save_safetensors(run_dir / ADAPTER_FILE, weights)
    with writing(run_dir / ADAPTER_CONFIG_FILE):
        atomic_write_text(run_dir / ADAPTER_CONFIG_FILE, json.dumps(config, indent=2))


def _file_digest(path: Path) -> dict:
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def checkpoint_bytes(weights: dict[str, mx.array], optimizer) -> int:
    """About what one checkpoint (plus the run's own adapter copy) takes on disk."""
    arrays = list(weights.values()) + [v for _, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)]
    return sum(a.nbytes for a in arrays) + sum(a.nbytes for a in weights.values()) + 64 * 1024


def save_checkpoint(
    run_dir: Path, step: int, weights: dict[str, mx.array], adapter_config: dict, optimizer, state: dict
) -> Path:
    """Write `checkpoints/step-NNNNNNN/`: adapter, optimizer state, state.json, then manifest.json (sizes and
    SHA-256 of the others) last; the directory is renamed into place complete, and only then does `latest` name it.
    """
    root = run_dir / CHECKPOINTS_DIR
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} is not a folder: this run directory is damaged", f"move {root} away, then resume")
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = root / name
    staging = root / f".{name}.tmp"
    for leftover in root.glob(".step-*.tmp"):  # staging of saves killed earlier (one writer per run: the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir()
    try:
        with writing(staging, checkpoint_bytes(weights, optimizer)):
            mx.save_safetensors(str(staging / ADAPTER_FILE), weights)
            fault_point("checkpoint.adapter")
            create_file(staging / ADAPTER_CONFIG_FILE, json.dumps(adapter_config, indent=2))
            optimizer_arrays = dict(tree_flatten(optimizer.state))
            mx.save_safetensors(str(staging / OPTIMIZER_FILE), optimizer_arrays)
            fault_point("checkpoint.optimizer")
            create_file(staging / STATE_FILE, json.dumps({"step": step, **state}, indent=2))
            for file in staging.iterdir():
                fsync_file(file)
            manifest = {"step": step, "files": {f.name: _file_digest(f) for f in sorted(staging.iterdir())}}
            fault_point("checkpoint.manifest")
            create_file(staging / MANIFEST_FILE, json.dumps(manifest, indent=2))
            fsync_file(staging / MANIFEST_FILE)
            fsync_dir(staging)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            fsync_dir(root)
            fault_point("checkpoint.rename")
            atomic_write_text(root / LATEST_POINTER, name)
            fault_point("checkpoint.latest")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint directory (missing manifest, a file missing, truncated or altered), or None."""
    try:
        manifest = json.loads((checkpoint / MANIFEST_FILE).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (written last: the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({type(exc).__name__})"
    for required in (ADAPTER_FILE, OPTIMIZER_FILE, STATE_FILE):
        if required not in files:
            return f"manifest lists no {required}"
    for name, expected in files.items():
        path = checkpoint / name
        if Path(name).name != name or not path.is_file() or path.is_symlink():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} is {size} bytes, the manifest says {expected.get('bytes')} (truncated or half-written)"
        if _file_digest(path)["sha256"] != expected.get("sha256"):
            return f"{name} does not match its checksum (corrupted on disk)"
    return None


def checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(r"step-(\d+)", path.name)
    return int(match[1]) if match else None


def resumable_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint at or before the one `latest` names, and a warning for each one skipped."""
    root = run_dir / CHECKPOINTS_DIR
    found = sorted((p for p in root.glob("step-*") if p.is_dir() and checkpoint_step(p) is not None),
                   key=checkpoint_step, reverse=True) if root.is_dir() else []
    pointed = latest_checkpoint(run_dir)
    if pointed is not None and pointed in found:  # `latest` may have been rolled back on purpose: start there
        found = found[found.index(pointed):]
    warnings = []
    for checkpoint in found:
        problem = verify_checkpoint(checkpoint)
        if problem is None:
            return checkpoint, warnings
        warnings.append(f"skipping checkpoint {checkpoint.name}: {problem}")
    return None, warnings


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CHECKPOINTS_DIR / LATEST_POINTER
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    path = run_dir / CHECKPOINTS_DIR / name
    return path if re.fullmatch(r"step-\d+", name) and (path / STATE_FILE).is_file() else None


def load_checkpoint(checkpoint: Path, model, optimizer) -> dict:
    """Restore adapter weights and optimizer state; returns the saved state (step, ...).

    The RNG needs no saving: the loop reseeds it from (seed, step) before every step."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        model.load_weights(str(checkpoint / ADAPTER_FILE), strict=False)
        arrays = mx.load(str(checkpoint / OPTIMIZER_FILE))
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"checkpoint {checkpoint} does not fit this run: {exc}".splitlines()[0],
                         "resume with the run's own model and settings (config.yaml)") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise UsageError(f"{checkpoint / STATE_FILE}: no valid step", "resume from another checkpoint")
    # Fill the freshly initialised state in place: the compiled step holds a reference to this very tree.
    optimizer.init(model.trainable_parameters())
    expected = {key for key, _ in tree_flatten(optimizer.state)}
    if expected != set(arrays):
        raise UsageError(f"checkpoint {checkpoint} does not match this model's adapters", "resume with the same settings")
    for key, value in arrays.items():
        _set_leaf(optimizer.state, key, value)
    return state


def _set_leaf(tree, dotted_key: str, value) -> None:
    *parents, leaf = dotted_key.split(".")
    node = tree
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
