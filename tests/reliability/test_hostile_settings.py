"""Settings and model files a careless user (or a damaged download) gives: each refused before anything loads, as
a one-line error with a hint and exit code 2 — never an internal error, a `std::bad_cast`, or a run the kernel kills.
Defaults that fit the model: --max-seq-length is min(2048, the model's context) wherever a length is chosen.

Exit codes are checked through the real CLI in a subprocess; the long tables of values through the settings object
itself (the same `validate()` the CLI calls), to keep this file quick."""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import struct
from pathlib import Path

import pytest

from conftest import MODEL, WIKISQL, run_cli
from mlxtune.errors import UsageError
from mlxtune.model_config import check_architecture, max_seq_length_for, read_config, read_safetensors_header
from mlxtune.settings import UPPER_BOUNDS, LoraSettings, resolve_settings

# Past each bound: what users typed (or a YAML file held) in the reports of issue 23.
TOO_LARGE = {
    "iters": [10**7 + 1, 10**21],
    "warmup_steps": [10**21],
    "grad_accumulation": [1025, 10**14, 4295532647],
    "rank": [4097, 100000],
    "batch_size": [2**16 + 1],
    "batch_tokens": [2**24 + 1],
    "max_seq_length": [2**20 + 1],
    "epochs": [1e9],
    "cache_limit_gb": [1e30],
    "eval_every": [10**12],
    "save_every": [10**12],
    "report_every": [10**12],
    "val_batches": [10**12],
    "patience": [10**9],
    "layers": [10**6],
    "threads": [10**6],
    "alpha": [1e300],
    "weight_decay": [1e6],
    "grad_clip": [1e300],
}


def invoke(*args):
    """The CLI in this process (click's runner: the same parsing, error reporting and exit codes as a subprocess,
    without a Python start per case); `returncode`/`stderr` like subprocess.run's result."""
    from click.testing import CliRunner

    from mlxtune.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], env={"COLUMNS": "120"})
    result.returncode = result.exit_code
    return result


def _one_line_error(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and any(line.startswith("hint:") for line in lines), result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.mark.parametrize("name,value", [(k, v) for k, values in TOO_LARGE.items() for v in values])
def test_every_setting_past_its_bound_is_refused_with_its_flag(name, value):
    with pytest.raises(UsageError) as refused:
        LoraSettings(**{name: value}).validate()
    assert f"{name} " in refused.value.message and "too large" in refused.value.message
    assert f"--{name.replace('_', '-')}" in refused.value.hint


def test_the_bounds_themselves_are_accepted():
    values = {k: v for k, v in UPPER_BOUNDS.items() if k in LoraSettings.__dataclass_fields__}
    LoraSettings(**values).validate()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, -1e-4])
def test_learning_rate_must_be_finite_and_positive(value):
    with pytest.raises(UsageError, match="learning_rate"):
        LoraSettings(learning_rate=value).validate()


def test_yaml_values_past_the_bounds_are_refused(tmp_path):
    config = tmp_path / "config.yaml"
    for text, message in [("iters: 1e21\n", "iters 1,000,000,000,000,000,000,000 is too large"),
                          ("warmup_steps: 1.0e21\n", "warmup_steps 1,000,000,000,000,000,000,000 is too large"),
                          ("grad_accumulation: 100000000000000\n", "grad_accumulation 100,000,000,000,000"),
                          ("cache_limit_gb: 1e30\n", "cache_limit_gb 1e+30 is too large")]:
        config.write_text(text)
        with pytest.raises(UsageError, match=re.escape(message)):
            resolve_settings(config, {})


def test_cli_refuses_out_of_bound_flags_with_exit_2(tmp_path):
    out = tmp_path / "run"
    result = run_cli("lora", "--model", MODEL, "--data", WIKISQL, "--out", out, "--grad-accumulation", 10**14)
    _one_line_error(result, 2, "grad_accumulation 100,000,000,000,000 is too large")
    assert "--grad-accumulation" in result.stderr and not out.exists()
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {MODEL}\ndata: {WIKISQL}\niters: 1e21\n")
    _one_line_error(invoke("lora", "--config", config, "--out", out), 2, "iters")
    _one_line_error(invoke("plan", "--model", MODEL, "--data", WIKISQL, "--cache-limit-gb", "1e30"), 2,
                    "cache_limit_gb")
    for timeout in ("nan", "inf", "0", "1e12"):
        _one_line_error(invoke("lora", "--model", MODEL, "--data", WIKISQL, "--out", out, "--nproc", 2,
                               "--rank-timeout", timeout), 2, "--rank-timeout")
    assert not out.exists()


def test_rank_past_the_models_hidden_size_is_refused_before_loading(tmp_path):
    out = tmp_path / "run"
    result = invoke("lora", "--model", MODEL, "--data", WIKISQL, "--out", out, "--rank", 100)
    _one_line_error(result, 2, "rank 100 is larger than the model's hidden size (64)")
    assert "--rank" in result.stderr and not out.exists()
    with pytest.raises(UsageError, match="hidden size"):
        LoraSettings(rank=65).fit_model(MODEL)
    assert LoraSettings(rank=64).fit_model(MODEL).rank == 64
    assert LoraSettings(rank=4096, method="full").fit_model(MODEL).rank == 4096  # full finetunes have no rank


def test_planner_suggestions_stay_within_the_bounds():
    from mlxtune.memory.estimate import ModelFacts
    from mlxtune.memory.planner import DataLengths, plan_memory

    facts = ModelFacts.from_dir(MODEL)
    lengths = [500] * 64
    data = DataLengths(lengths, [200] * 64)
    settings = LoraSettings(batch_tokens=2**24, grad_accumulation=512, max_seq_length=512).validate()
    plan = plan_memory(facts, settings, data, budget=10**6, budget_source="test")
    assert not plan.fits and plan.suggested.get("grad_accumulation", 0) <= UPPER_BOUNDS["grad_accumulation"]
    assert "grad_accumulation" in plan.suggested


# ------------------------------------------------------------------------------------------- bad model files


def _model_copy(tmp_path: Path, name: str = "model") -> Path:
    copy = tmp_path / name
    shutil.copytree(MODEL, copy)
    return copy


def _edit_config(model: Path, **changes) -> Path:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))
    return model


def _weights(kind: str, real: bytes) -> bytes:
    if kind == "pickle":
        return pickle.dumps({"model.embed_tokens.weight": list(range(1000))})
    if kind == "huge-header":
        return struct.pack("<Q", 10**15) + real[8:]
    if kind == "bad-json":
        return struct.pack("<Q", 16) + b"{not json at all" + real[24:]
    if kind == "not-tensors":
        header = b'{"a": 1}'
        return struct.pack("<Q", len(header)) + header
    if kind == "short":
        return b"\x01\x02"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["pickle", "huge-header", "bad-json", "not-tensors", "short"])
def test_a_safetensors_file_that_isnt_is_a_one_line_error(tmp_path, kind):
    model = _model_copy(tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(_weights(kind, weights.read_bytes()))
    with pytest.raises(UsageError, match="not a safetensors file") as refused:
        read_safetensors_header(weights)
    assert "re-download" in refused.value.hint and "\n" not in refused.value.message


def test_bad_weights_through_lora_plan_and_models_info(tmp_path):
    """The issue's cases end to end: a pickle saved as model.safetensors and a header length of 10^15."""
    pickled = _model_copy(tmp_path, "pickled")
    (pickled / "model.safetensors").write_bytes(_weights("pickle", b""))
    out = tmp_path / "run"
    _one_line_error(run_cli("lora", "--model", pickled, "--data", WIKISQL, "--out", out, "--iters", 1), 2,
                    "not a safetensors file")
    _one_line_error(invoke("plan", "--model", pickled, "--data", WIKISQL), 2, "not a safetensors file")
    _one_line_error(invoke("models", "info", pickled), 2, "not a safetensors file")
    huge = _model_copy(tmp_path, "huge")
    real = (huge / "model.safetensors").read_bytes()
    (huge / "model.safetensors").write_bytes(_weights("huge-header", real))
    _one_line_error(invoke("plan", "--model", huge, "--data", WIKISQL), 2, "header length 1,000,000,000,000,000")
    assert not out.exists()


@pytest.mark.parametrize("model_type", ["../../x", "__init__", "llama/../../os", 5, ["llama"], "Llama"])
def test_model_type_must_be_a_plain_architecture_name(tmp_path, model_type):
    with pytest.raises(UsageError, match="is not an architecture name"):
        check_architecture({"model_type": model_type}, tmp_path)


def test_model_type_path_through_the_cli(tmp_path):
    model = _edit_config(_model_copy(tmp_path), model_type="../../x")
    _one_line_error(invoke("lora", "--model", model, "--data", WIKISQL, "--out", tmp_path / "run", "--iters", 1),
                    2, "model_type '../../x' is not an architecture name")
    model = _edit_config(model, model_type="__init__")
    _one_line_error(invoke("generate", model, "--prompt", "hi", "--max-tokens", 2), 2, "'__init__'")


def test_a_config_claiming_more_blocks_than_the_weights_is_refused_before_loading(tmp_path):
    model = _edit_config(_model_copy(tmp_path), num_hidden_layers=1_000_000)
    out = tmp_path / "run"
    result = run_cli("lora", "--model", model, "--data", WIKISQL, "--out", out, "--iters", 1)
    _one_line_error(result, 2, "num_hidden_layers 1,000,000", "weights hold 5 blocks")
    assert not out.exists()
    _one_line_error(invoke("plan", "--model", model, "--data", WIKISQL), 2, "num_hidden_layers 1,000,000")
    for bad in ("many", -3, 0, True):
        _edit_config(model, num_hidden_layers=bad)
        with pytest.raises(UsageError, match="num_hidden_layers must be a whole number"):
            LoraSettings().fit_model(model)


@pytest.mark.parametrize("text", [b"[1, 2]", b'"llama"', b'{"model_type": "llama", "text_config": 5}',
                                  b"[" * 100000, b'{"model_type": "\xff\xfe"}'])
def test_a_config_json_that_isnt_an_object_is_a_usage_error(tmp_path, text):
    model = _model_copy(tmp_path)
    (model / "config.json").write_bytes(text)
    with pytest.raises(UsageError, match="config.json"):
        read_config(model)


# ---------------------------------------------------------------------------------- defaults that fit the model


def test_max_seq_length_defaults_to_the_models_context_up_to_2048(tmp_path):
    assert max_seq_length_for({"max_position_embeddings": 512}) == 512
    assert max_seq_length_for({"max_position_embeddings": 32768}) == 2048
    assert max_seq_length_for({"text_config": {"max_position_embeddings": 1024}}) == 1024
    assert max_seq_length_for({"n_positions": 256}) == 256
    assert max_seq_length_for({}) == 2048 and max_seq_length_for({"max_position_embeddings": "x"}) == 2048
    assert LoraSettings().max_seq_length is None  # resolved from the model, never a fixed 2048
    assert LoraSettings().fit_model(MODEL).max_seq_length == 512  # stories260K's context
    assert LoraSettings(max_seq_length=300).fit_model(MODEL).max_seq_length == 300  # given: kept


def test_plan_and_data_check_use_the_models_context_by_default(tmp_path):
    from mlxtune.data.check import check_data

    result = invoke("plan", "--model", MODEL, "--data", WIKISQL, "--json")
    assert result.returncode in (0, 3), result.stderr
    assert json.loads(result.stdout)["settings"]["max_seq_length"] == 512
    report = check_data(WIKISQL, MODEL)
    assert report.max_seq_length == 512
    assert not any(w["code"] == "max-length-over-context" for w in report.warnings)
    assert check_data(WIKISQL).max_seq_length == 2048  # no model: characters, the plain default
    with pytest.raises(UsageError, match="max_seq_length must be in"):
        check_data(WIKISQL, max_seq_length=0)


def test_a_run_saves_the_resolved_length(tmp_path):
    from mlxtune.settings import load_run_settings
    from mlxtune.train.loop import finetune
    from mlxtune.ui import make_console

    out = tmp_path / "run"
    finetune(LoraSettings(model=str(MODEL), data=str(WIKISQL), out=str(out), iters=1, batch_size=2, val_batches=1),
             console=make_console(quiet=True))
    assert load_run_settings(out / "config.yaml").max_seq_length == 512


def test_plan_without_model_uses_the_default_model(tmp_path, monkeypatch):
    """`plan --data D` plans for the model `lora` would use (here a library entry standing in for it)."""
    from mlxtune.models import DEFAULT_BASE_MODEL

    home = tmp_path / "home"
    entry = home / "models" / "default-stand-in"
    shutil.copytree(MODEL, entry)
    (entry / "mlxtune.json").write_text(json.dumps({
        "name": "default-stand-in", "path": str(entry), "architecture": "llama", "parameters": 1,
        "quantization": None, "dtype": "float32", "size_bytes": 1, "source": DEFAULT_BASE_MODEL,
        "created": "2026-01-01"}))
    monkeypatch.setenv("MLXTUNE_HOME", str(home))
    result = invoke("plan", "--data", WIKISQL, "--json")
    assert result.returncode in (0, 3), result.stderr
    assert "no model given" not in result.stderr
    assert json.loads(result.stdout)["model"] == str(entry.resolve())


@pytest.mark.parametrize("content,message", [(b"rank: 8\nseed: \xff\xfe\n", "config.yaml:2: not UTF-8 text"),
                                             (b"[" * 50000, "config.yaml"),
                                             (b"- 1\n- 2\n", "expected a mapping of settings")])
def test_a_settings_file_that_isnt_text_or_a_mapping_is_a_usage_error(tmp_path, content, message):
    config = tmp_path / "config.yaml"
    config.write_bytes(content)
    with pytest.raises(UsageError, match=re.escape(message)):
        resolve_settings(config, {})
    from mlxtune.settings import load_run_settings

    with pytest.raises(UsageError, match=re.escape(message)):
        load_run_settings(config)
    config.unlink()
    config.mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        resolve_settings(config, {})


def test_dpo_defaults_to_the_models_context_and_warns_past_it(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Answer {i}.",
                                         "rejected": f"{i} answer."}) + "\n" for i in range(24)))
    from mlxtune.train.preference.run import PreferenceSettings

    assert PreferenceSettings().fit_model(MODEL).max_seq_length == 512
    # --memory far too small: refused by the plan once the pairs are tokenized, after the context check
    result = invoke("dpo", "--model", MODEL, "--data", pairs, "--out", tmp_path / "run", "--max-seq-length", 1024,
                    "--memory", "0.001GB")
    assert result.returncode == 2, result.output
    assert "1024 is over the model's context window (512 tokens" in result.stdout, result.stdout
    result = invoke("dpo", "--model", MODEL, "--data", pairs, "--out", tmp_path / "run", "--memory", "0.001GB")
    assert result.returncode == 2 and "context window" not in result.stdout, result.output
