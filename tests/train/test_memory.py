"""The memory planner: estimates against measured peaks, `mlxtune plan`, lora refusing/choosing, the run-time guard."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from conftest import MODEL, ROOT, WIKISQL, run_cli

from mlxtune.errors import UsageError
from mlxtune.memory import GB, parse_memory

BENCH = ROOT / "scripts" / "bench_memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def short_data(tmp_path_factory):
    return _bench().make_data(tmp_path_factory.mktemp("memory-data"))["short"]


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory):
    """A Qwen2.5-0.5B-shaped model (one block, random bfloat16 weights): its 152k vocabulary dominates memory."""
    from mlxtune.synthetic import build_random_model

    return build_random_model("qwen2.5-0.5b", tmp_path_factory.mktemp("qwen") / "qwen-1l", layers=1,
                              dtype="bfloat16")


def test_budgets_parse_in_one_unit_and_bad_ones_are_refused():
    assert parse_memory("16GB") == 16 * GB == parse_memory("16") == parse_memory("16 gb")
    assert parse_memory("512MB") == 512 * 10**6 and parse_memory("1GiB") == 2**30
    for bad in ("0", "lots", "-3GB", "99999GB"):
        with pytest.raises(UsageError) as caught:
            parse_memory(bad)
        assert caught.value.hint


def test_calibration_cases_within_tolerance(tmp_path):
    """Three of the calibration cases (docs/MEMORY.md has all of them): estimate within ±15% of MLX's peak."""
    bench = _bench()
    data = bench.make_data(tmp_path / "data")
    for name in ("stories-lora-short", "stories-dora-long-fullloss", "smollm-lora-short"):
        row = bench.run_case(name, data, tmp_path / "models", tmp_path / "runs", iters=2)
        assert abs(row["error"]) <= bench.TOLERANCE, row


def test_plan_refuses_then_suggested_settings_fit(qwen_model, short_data, tmp_path):
    default = run_cli("plan", "--model", qwen_model, "--data", short_data, "--json")
    assert default.returncode == 0, default.stderr
    needed = json.loads(default.stdout)["estimate_gb"]
    budget = round(0.85 * needed, 3)  # below what the default settings need

    refused = run_cli("plan", "--model", qwen_model, "--data", short_data, "--memory", f"{budget}GB", "--json")
    report = json.loads(refused.stdout)
    assert refused.returncode == 3 and report["fits"] is False and report["budget_gb"] == budget
    assert report["suggested"] and report["suggested_fits"] and report["reasons"]

    flags = []
    for key, value in report["suggested"].items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, value]
    explicit = run_cli("lora", "--model", qwen_model, "--data", short_data, "--memory", f"{budget}GB",
                       "--batch-tokens", 4096, "--out", tmp_path / "refused", "--iters", 2)
    assert explicit.returncode == 2 and "more than the" in explicit.stderr and "--force" in explicit.stderr
    assert not (tmp_path / "refused" / "adapters.safetensors").exists()

    run = run_cli("lora", "--model", qwen_model, "--data", short_data, "--memory", f"{budget}GB", *flags,
                  "--out", tmp_path / "fits", "--iters", 2, "--val-batches", 1, "--report-every", 1, "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["peak_memory_gb"] < budget, (result["peak_memory_gb"], budget)
    assert not result["memory_changes"]


def test_guard_shrinks_batches_when_the_run_overshoots(tmp_path):
    """A budget the first batches exceed (--force past the plan): checkpoint, smaller batches, and the run ends."""
    out = tmp_path / "guarded"
    run = run_cli("lora", "--model", MODEL, "--data", WIKISQL, "--batch-tokens", 2048, "--memory", "0.1GB",
                  "--force", "--iters", 3, "--val-batches", 1, "--report-every", 1, "--out", out, "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["steps"] == 3 and result["stopped"] == "completed"
    changes = result["memory_changes"]
    assert 1 <= len(changes) <= 2 and changes[0]["after"]["batch_tokens"] == 1024
    assert changes[0]["after"]["grad_accumulation"] == 2 * changes[0]["before"]["grad_accumulation"]
    assert "memory:" in run.stderr and "2048 → 1024" in run.stderr
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("memory_event") for e in events)
    assert f"batch_tokens: {changes[-1]['after']['batch_tokens']}" in (out / "config.yaml").read_text()
    shutil.rmtree(out)
