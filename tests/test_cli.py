"""The whole flow through the real CLI in a subprocess, on the bundled real model."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from conftest import MODEL, WIKISQL, mlx_greedy, run_cli

PROBE = "table: 1-10015132-11\ncolumns: Player, No., Nationality\nQ: Who is number 5?\nA:"


def _logits(model, tokenizer, text=PROBE):
    return model(mx.array(tokenizer.encode(text))[None]).astype(mx.float32)


def test_run_directory_holds_config_adapter_and_metrics(trained_run):
    run_dir, result = trained_run
    assert result["steps"] == 8 and result["stopped"] == "completed"
    for name in ("config.yaml", "adapters.safetensors", "adapter_config.json", "metrics.jsonl", "run.json"):
        assert (run_dir / name).is_file(), name
    adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter_config["num_layers"] == 5  # all blocks of the 5-block model
    assert adapter_config["lora_parameters"] == {"rank": 8, "scale": 2.0, "dropout": 0.0}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    for r in train:
        assert r["tokens_per_second"] > 0 and r["peak_memory_gb"] > 0 and np.isfinite(r["train_loss"])
    val_steps = [r["step"] for r in records if "val_loss" in r]
    assert val_steps == [0, 4, 8]
    assert result["final_val_loss"] < result["initial_val_loss"]


def test_adapter_loads_in_mlx_lm_and_changes_logits(trained_run):
    run_dir, _ = trained_run
    base, tokenizer = load(str(MODEL))
    tuned, _ = load(str(MODEL), adapter_path=str(run_dir))
    difference = mx.abs(_logits(tuned, tokenizer) - _logits(base, tokenizer)).max().item()
    assert difference > 1e-2


def test_fused_model_equals_base_plus_adapter(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "fused"
    result = run_cli("fuse", run_dir, "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["max_abs_diff"] < 1e-4
    fused, tokenizer = load(str(out))
    with_adapter, _ = load(str(MODEL), adapter_path=str(run_dir))
    assert not any("lora" in name for name, _ in __import__("mlx.utils").utils.tree_flatten(fused.parameters()))
    assert mx.abs(_logits(fused, tokenizer) - _logits(with_adapter, tokenizer)).max().item() < 1e-4
    # a second fuse into the same place is refused unless asked for
    again = run_cli("fuse", run_dir, "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_generate_on_a_run_is_greedy_base_plus_adapter(trained_run):
    run_dir, _ = trained_run
    base, tokenizer = load(str(MODEL))
    tuned, _ = load(str(MODEL), adapter_path=str(run_dir))
    ids = tokenizer.encode(PROBE)
    expected = {str(target): tokenizer.decode(mlx_greedy(model, ids, 10, tokenizer.eos_token_id)).strip()
                for target, model in ((run_dir, tuned), (MODEL, base))}
    assert expected[str(run_dir)] != expected[str(MODEL)]  # the adapter changes the answer: dropping it shows
    for target in (run_dir, MODEL):
        # the bare model would get mlxtune's fallback template (the one template rule): --no-template continues raw text
        raw = ["--no-template"] if target == MODEL else []
        result = run_cli("generate", target, "-p", PROBE, "-m", 10, "--json", *raw)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["text"].strip() == expected[str(target)]


def test_chat_answers_each_line_and_exits_on_eof(trained_run, tmp_path):
    run_dir, _ = trained_run
    result = run_cli("chat", run_dir, "--max-tokens", 8, "--temp", 0, input="hello\nhow are you?\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    replies = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2
    assert "plain text" in result.stderr  # a text-trained run chats in raw text, and says so
    # the run's adapter is in use: the same run with its adapter zeroed (= the base model) answers differently
    zeroed = tmp_path / "zeroed"
    shutil.copytree(run_dir, zeroed)
    weights = mx.load(str(zeroed / "adapters.safetensors"))
    mx.save_safetensors(str(zeroed / "adapters.safetensors"), {k: mx.zeros_like(v) for k, v in weights.items()})
    base = run_cli("chat", zeroed, "--max-tokens", 8, "--temp", 0, input="hello\nhow are you?\n")
    assert base.returncode == 0 and base.stdout != result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no/such/dir", "--data", str(WIKISQL)], "model not found"),
        (["--model", str(MODEL), "--data", "missing.jsonl"], "data not found"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_error(args, message, tmp_path):
    result = run_cli("lora", *args, "--out", tmp_path / "run", "--iters", 1)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith("error:") and message in first


def test_resume_refuses_a_flag_that_would_train_a_different_adapter(trained_run):
    run_dir, _ = trained_run
    result = run_cli("lora", "--resume", run_dir, "--rank", 16, "--iters", 8)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "can't change --rank (the run has 8)" in result.stderr and "--learning-rate" in result.stderr


def test_empty_data_file_exits_2(tmp_path):
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    result = run_cli("lora", "--model", MODEL, "--data", empty, "--out", tmp_path / "run", "--iters", 1)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{empty}: the file is empty" in result.stderr


def test_malformed_line_names_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine"}\n{"text": broken\n')
    result = run_cli("lora", "--model", MODEL, "--data", data, "--out", tmp_path / "run", "--iters", 1)
    assert result.returncode == 2
    assert f"{data}:2: invalid JSON" in result.stderr


def test_version_and_help_examples():
    assert run_cli("--version").stdout.strip().startswith("mlxtune, version")
    for command in ("lora", "fuse", "generate", "chat", "doctor"):
        help_text = run_cli(command, "--help").stdout
        assert "Example" in help_text and f"mlxtune {command}" in help_text
        if command == "lora":  # every kind of data it reads, named where users look first
            flat = " ".join(help_text.split())
            assert all(kind in flat for kind in (".csv", ".parquet", "Hugging Face dataset id")), flat


def test_doctor_reports_the_backend_and_a_measured_matmul_speed():
    result = run_cli("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["versions"]["mlx"] and report["versions"]["mlx-lm"]
    assert report["matmul_gflops"] > 0.5 and report["cores"] >= 1
    assert "cpu" in report["mlx_device"] or report["metal"]["available"]
    assert set(report["blas"]) == {"library", "status", "openblas_coretype"}
