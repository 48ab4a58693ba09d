"""Crash-safe checkpoints: every file is written to a temporary name, fsynced and renamed into place.

A checkpoint is a directory `checkpoints/step-NNNNNNN/` (adapter, optimizer state, step) that becomes visible
only once complete; `checkpoints/latest` names the newest one. A SIGKILL at any moment leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxtune.errors import UsageError
from mlxtune.runs import ADAPTER_CONFIG_FILE, ADAPTER_FILE, CHECKPOINTS_DIR, LATEST_POINTER, checkpoint_name

# A checkpoint directory's own files, beside the adapter.
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
KEEP_CHECKPOINTS = 2


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_save_safetensors(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_adapter(run_dir: Path, weights: dict[str, mx.array], config: dict) -> None:
    """The adapter in mlx-lm's layout, loadable with `mlx_lm.generate --adapter-path RUN_DIR`."""
    atomic_save_safetensors(run_dir / ADAPTER_FILE, weights)
    atomic_write_text(run_dir / ADAPTER_CONFIG_FILE, json.dumps(config, indent=2))


def save_checkpoint(
    run_dir: Path, step: int, weights: dict[str, mx.array], adapter_config: dict, optimizer, state: dict
) -> Path:
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = root / name
    staging = root / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    mx.save_safetensors(str(staging / ADAPTER_FILE), weights)
    (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2), encoding="utf-8")
    optimizer_arrays = dict(tree_flatten(optimizer.state))
    mx.save_safetensors(str(staging / OPTIMIZER_FILE), optimizer_arrays)
    (staging / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2), encoding="utf-8")
    for file in staging.iterdir():
        _fsync_file(file)
    _fsync_dir(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST_POINTER, name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CHECKPOINTS_DIR / LATEST_POINTER
    if not pointer.is_file():
        return None
    path = run_dir / CHECKPOINTS_DIR / pointer.read_text(encoding="utf-8").strip()
    return path if (path / STATE_FILE).is_file() else None


def load_checkpoint(checkpoint: Path, model, optimizer) -> dict:
    """Restore adapter weights and optimizer state; returns the saved state (step, ...).

    The RNG needs no saving: the loop reseeds it from (seed, step) before every step."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        model.load_weights(str(checkpoint / ADAPTER_FILE), strict=False)
        arrays = mx.load(str(checkpoint / OPTIMIZER_FILE))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise UsageError(f"checkpoint {checkpoint} is unreadable: {exc}", "delete it to resume from the one before")
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
