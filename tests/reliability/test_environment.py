"""What a user's machine and files do to us: a full disk (a real, small tmpfs), a read-only --out, absurd settings,
hostile model and adapter files, and credentials in the environment. Each is a one-line error with a hint (exit 2
for bad input, 1 for a run the machine stopped), never `internal error`.

The disk tests mount a tmpfs (Linux, as root: CI runs so); where that is impossible they skip.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import MODEL, WIKISQL, run_cli
from mlxtune.errors import UsageError
from mlxtune.runs import open_for_inference
from mlxtune.settings import LoraSettings, resolve_settings
from mlxtune.train.checkpoint import verify_checkpoint
from reliability_tools import cli, lora_args


@contextmanager
def tmpfs(path: Path, size: int, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"can't mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _one_line_error(result, exit_code: int, starts: str) -> list[str]:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == exit_code, result.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {starts}"), result.stderr
    assert lines[lines.index(errors[0]) + 1].startswith("hint: "), result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    return errors


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    with tmpfs(tmp_path / "disk", 1300 * 1024) as disk:
        run = disk / "run"
        result = cli(*lora_args(run, iters=4, eval_every=100))
        [error] = _one_line_error(result, 1, "disk full writing")
        assert str(run) in error and "free on" in error and "this step needs about" in error
        assert verify_checkpoint(run / "checkpoints" / "step-0000002") is None, "the previous checkpoint was hurt"
        assert (run / "checkpoints" / "latest").read_text() == "step-0000002"
        assert not list((run / "checkpoints").glob(".*")), "the half-written checkpoint was left behind"


def test_disk_full_during_an_export_leaves_nothing_half_written(tmp_path):
    weights = 260032 * 4  # what the free-space check expects: the weights alone; tokenizer files then overflow
    with tmpfs(tmp_path / "disk", (weights // 4096 + 2) * 4096) as disk:
        result = cli("export", MODEL, "--format", "hf", "--out", disk / "hf")
        [error] = _one_line_error(result, 1, "disk full writing")
        assert str(disk / "hf") in error
        assert list(disk.iterdir()) == [], "a partial export was left on the full disk"


def test_not_enough_space_for_a_fuse_is_said_before_it_starts(trained_run, tmp_path):
    run_dir, _ = trained_run
    with tmpfs(tmp_path / "disk", 256 * 1024) as disk:
        result = cli("fuse", run_dir, "--out", disk / "fused")
        [error] = _one_line_error(result, 1, "not enough free space for the fused model")
        assert "needs about 1.1 MB" in error, error
        assert list(disk.iterdir()) == []


def test_read_only_out_is_refused_before_the_model_is_loaded(trained_run, tmp_path):
    with tmpfs(tmp_path / "ro", 64 * 1024, read_only=True) as read_only:
        result = cli(*lora_args(read_only / "run"))
        [error] = _one_line_error(result, 2, f"cannot write {read_only / 'run'}")
        assert "Read-only file system" in error and "validation loss" not in result.stderr
        exported = cli("export", trained_run[0], "--format", "gguf", "--out", read_only / "model.gguf")
        _one_line_error(exported, 2, f"cannot write {read_only}")


ABSURD = {
    "learning_rate": [math.nan, math.inf, -1e-4, 0.0, 5.0],
    "grad_clip": [math.nan, -1.0],
    "epochs": [math.nan, 0.0],
    "min_delta": [math.nan, -0.1],
    "warmup_steps": [-5],
    "val_batches": [0, -2],
    "seed": [-1, 2**40],
    "rank": [0, 2.9, True],
    "iters": [0],
    "batch_size": [0],
    "alpha": [math.nan, 0.0],
    "target_modules": [5],
    "dropout": [math.nan, 1.0],
}


@pytest.mark.parametrize("name,value", [(k, v) for k, values in ABSURD.items() for v in values])
def test_absurd_settings_are_refused_with_a_hint(name, value):
    with pytest.raises(UsageError) as refused:
        LoraSettings(**{name: value}).validate()
    assert name in refused.value.message and refused.value.hint


def test_absurd_yaml_and_flags_are_one_line_errors(tmp_path):
    config = tmp_path / "config.yaml"
    for text, message in [("rank: 2.9\n", "rank must be a whole number, got 2.9"),
                          ("target_modules: 5\n", "target_modules must be a list of names, got 5"),
                          ("learning_rate: .nan\n", "learning_rate must be a finite number")]:
        config.write_text(text)
        with pytest.raises(UsageError, match=message):
            resolve_settings(config, {})
    result = run_cli("lora", "--model", MODEL, "--data", WIKISQL, "--lr", "nan")
    _one_line_error(result, 2, "learning_rate must be a finite number, got nan")


def _model_copy(tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(MODEL, copy)
    return copy


def test_hostile_model_and_adapter_files(trained_run, tmp_path):
    no_hidden = _model_copy(tmp_path, "no-hidden-size")
    config = json.loads((no_hidden / "config.json").read_text())
    del config["hidden_size"]
    (no_hidden / "config.json").write_text(json.dumps(config))
    huge = _model_copy(tmp_path, "huge")
    (huge / "config.json").write_text(json.dumps({**config, "hidden_size": 10**9}))
    pickled = _model_copy(tmp_path, "pickled")
    marker = tmp_path / "unpickled"
    (pickled / "model.safetensors").write_bytes(pickle.dumps(_Trap(str(marker))))
    broken = _model_copy(tmp_path, "broken-config")
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_')
    missing = _model_copy(tmp_path, "no-config")
    (missing / "config.json").unlink()
    for model, message in [(no_hidden, "could not load"), (huge, "could not load"), (pickled, "not a safetensors file"),
                           (broken, "invalid JSON"), (missing, "no config.json")]:
        with pytest.raises(UsageError, match=message):
            open_for_inference(model)
    assert not marker.exists(), "a pickle was unpickled"

    run_dir, _ = trained_run
    other = tmp_path / "other-run"
    shutil.copytree(run_dir, other)
    adapter = mx.load(str(other / "adapters.safetensors"))
    mx.save_safetensors(str(other / "adapters.safetensors"), {k: mx.zeros((3, 5)) for k in adapter})
    with pytest.raises(UsageError, match="could not load .* with the adapter"):
        open_for_inference(other)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(run_dir / "adapters.safetensors", outside)
    (other / "adapters.safetensors").unlink()
    (other / "adapters.safetensors").symlink_to(outside)
    with pytest.raises(UsageError, match="is a link to .* outside the run"):
        open_for_inference(other)
    result = run_cli("generate", pickled, "-p", "hi")
    _one_line_error(result, 2, f"{pickled / 'model.safetensors'}: not a safetensors file")


class _Trap:
    """Unpickling this creates a file: proof that a pickle was (wrongly) loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


SENTINEL = "hf_i19SentinelTokenNeverPrintMe0123456789"


def test_credentials_never_reach_logs_configs_cards_or_json(tmp_path):
    env = {"HF_TOKEN": SENTINEL, "HUGGING_FACE_HUB_TOKEN": SENTINEL, "WANDB_API_KEY": SENTINEL}
    run = tmp_path / "run"
    outputs = [cli(*lora_args(run, iters=2), "--json", **env),
               cli("fuse", run, "--out", tmp_path / "fused", "--json", **env),
               cli("pull", f"nobody/{SENTINEL}", HF_HUB_OFFLINE="1", **env),  # an error echoing the token
               cli("--debug", "pull", f"nobody/{SENTINEL}", HF_HUB_OFFLINE="1", **env)]  # and its traceback
    assert [o.returncode for o in outputs] == [0, 0, 2, 2], [o.stderr[-500:] for o in outputs]
    assert "***" in outputs[2].stderr
    assert "Traceback" in outputs[3].stderr and "***" in outputs[3].stderr
    for output in outputs:
        assert SENTINEL not in output.stdout + output.stderr
    for file in [*run.rglob("*"), *(tmp_path / "fused").rglob("*")]:
        if file.is_file():
            assert SENTINEL.encode() not in file.read_bytes(), file


def test_a_huge_one_line_record_is_never_tokenized_whole(tmp_path):
    from mlx_lm.utils import load_tokenizer

    from mlxtune.data.dataset import load_datasets
    from mlxtune.data.template import MAX_CHARS_PER_TOKEN

    data = tmp_path / "train.jsonl"
    huge = "Once upon a time there was a cat. " * 150_000  # 5 MB on one line: over a million tokens
    data.write_text(json.dumps({"prompt": huge, "completion": "The end."}) + "\n"
                    + "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(3)))
    tokenizer = load_tokenizer(MODEL)
    datasets = load_datasets(data, tokenizer, max_seq_length=128)
    note = next(n for n in datasets.notes if "truncated" in n)
    longest = int(note.split("longest ")[1].split(")")[0])
    assert 128 < longest <= 128 * MAX_CHARS_PER_TOKEN, note  # cut before tokenizing, still reported as over


def test_a_full_mlxtune_home_trains_without_the_tokenized_cache(tmp_path):
    """The tokenized cache is optional: a full MLXTUNE_HOME (the --out disk has room) trains without it, says so,
    and leaves no temporary file behind."""
    with tmpfs(tmp_path / "home", 16 * 1024) as home:
        run = tmp_path / "run"
        result = cli(*lora_args(run, iters=2), MLXTUNE_HOME=str(home))
        assert result.returncode == 0, result.stderr[-800:]
        assert "could not be cached" in result.stdout + result.stderr
        assert not list(home.rglob("*.npz")), list(home.rglob("*"))
        assert (run / "adapters.safetensors").is_file()


def test_disk_full_during_a_gguf_adapter_export_is_a_disk_full_error(trained_run, tmp_path):
    """numpy (under the gguf writer) reports a short write as an OSError without an errno: still a full disk."""
    with tmpfs(tmp_path / "disk", 40 * 1024) as disk:
        result = cli("export", trained_run[0], "--format", "gguf-adapter", "--out", disk / "adapter.gguf")
        [error] = _one_line_error(result, 1, "disk full writing")
        assert str(disk / "adapter.gguf") in error
        assert list(disk.iterdir()) == [], "a partial export was left on the full disk"
