"""`mlxtune pull FILE.gguf` with an explicit -q and --dtype on a Q8_0 GGUF (stories260K, written by our own GGUF
export): left out, the Q8_0 tensors stay quantized exactly; `-q none --dtype f32` gives a float32 model that computes
what the quantized import computes; `-q 4` re-quantizes and says what that costs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import MLXTUNE, MODEL


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory) -> Path:
    from mlxtune.export.gguf import export_gguf
    from mlxtune.export.source import open_source

    with open_source(MODEL) as source:  # Q8_0 matrices (ffn_down's 172 columns aren't blocks of 32: F16), F32 norms
        return export_gguf(source, tmp_path_factory.mktemp("gguf") / "stories260K.gguf", "q8_0")


def _logits(path: str) -> mx.array:
    from mlx_lm.utils import dequantize_model, load

    model, _ = load(path)
    return dequantize_model(model)(mx.array([[1, 403, 261, 29, 87, 300, 17, 5, 411]])).astype(mx.float32)


def test_q_none_dtype_f32_dequantizes_every_tensor(tmp_path, monkeypatch, q8_gguf):
    from mlxtune.importers import pull_gguf

    home = tmp_path / "home"
    monkeypatch.setenv("MLXTUNE_HOME", str(home))
    kept = pull_gguf(str(q8_gguf), dtype="f32")  # -q left out: Q8_0 kept exactly, its scales and the floats float32
    assert kept.quantization == {"bits": 8, "group_size": 32} and not kept.extra["gguf"]["notes"]
    assert kept.name == "stories260K-mlx-f32"

    result = subprocess.run([*MLXTUNE, "pull", str(q8_gguf), "-q", "none", "--dtype", "f32", "--json"],
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, MLXTUNE_HOME=str(home)))
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout)
    said = " ".join(result.stderr.split())  # the console wraps the note
    assert "Q8_0 tensors dequantized to float32 as -q none asks: the file's values to float32 rounding" in said
    assert entry["quantization"] is None and entry["name"] == "stories260K-mlx-qnone-f32"
    config = json.loads((Path(entry["path"]) / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float32"
    weights = mx.load(str(Path(entry["path"]) / "model.safetensors"))
    assert {str(w.dtype) for w in weights.values()} == {"mlx.core.float32"}
    assert not [k for k in weights if k.endswith((".scales", ".biases"))]

    delta = mx.abs(_logits(entry["path"]) - _logits(kept.path)).max().item()
    assert delta < 1e-4, f"the float32 import computes other logits than the Q8_0 one: max |Δ| {delta}"

    four = pull_gguf(str(q8_gguf), quantize="4")  # the other width: re-quantized, saying what it costs
    assert four.quantization == {"bits": 4, "group_size": 32}
    assert "a second, 4-bit rounding on top of the file's 8-bit one" in four.extra["gguf"]["notes"][0]
    assert not pull_gguf(str(q8_gguf), quantize="8").extra["gguf"]["notes"]  # the file's own width: kept exactly
