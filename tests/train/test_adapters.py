"""Which layers get adapters, and that mlx-lm reads the same choice back."""

from __future__ import annotations

import re

import mlx.core as mx
import pytest
from mlx_lm import load

from conftest import MODEL, WIKISQL, run_cli
from mlxtune import LoraSettings
from mlxtune.errors import UsageError
from mlxtune.train.adapters import attach_adapters, trainable_weights


def test_layers_beyond_the_model_mean_all_and_last_n_means_last_n():
    model, _ = load(str(MODEL))
    config = attach_adapters(model, LoraSettings(layers=16))
    assert config["num_layers"] == 5
    model, _ = load(str(MODEL))
    attach_adapters(model, LoraSettings(layers=2))
    adapted = {name.split(".")[2] for name in trainable_weights(model)}
    assert adapted == {"3", "4"}


def test_target_modules_limit_the_adapters_and_typos_are_refused(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("lora", "--model", MODEL, "--data", WIKISQL, "--out", run_dir, "--iters", 2,
                     "--target-modules", "self_attn.q_proj,self_attn.v_proj", "--val-batches", 1,
                     "--max-seq-length", 64, "--report-every", 1)
    assert result.returncode == 0, result.stderr
    # Piped output (a log, CI): a plain progress line per report, not one live bar rendered at the end.
    progress = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["1/2", "2/2"], result.stdout
    assert all(re.search(r"loss \d\.\d{3}  val \S+( \(step \d+\))?  \d+ tok/s  mem .* elapsed \d:\d\d:\d\d  ETA \d:\d\d:\d\d$", line)
               for line in progress), progress
    names = mx.load(str(run_dir / "adapters.safetensors")).keys()
    assert names and all(".q_proj." in n or ".v_proj." in n for n in names)
    tuned, _ = load(str(MODEL), adapter_path=str(run_dir))  # mlx-lm honours the same module list
    assert {n for n, m in tuned.named_modules() if type(m).__name__ == "LoRALinear"} == {
        f"model.layers.{i}.self_attn.{p}" for i in range(5) for p in ("q_proj", "v_proj")}
    model, _ = load(str(MODEL))
    with pytest.raises(UsageError, match="no module self_attn.qproj"):
        attach_adapters(model, LoraSettings(target_modules=["self_attn.qproj"]))
