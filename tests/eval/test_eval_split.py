"""eval never scores training data: a single-file run is evaluated on exactly the records training held out, and
data that overlaps training (by content) is said so in the terminal, eval.json and report.html."""

from __future__ import annotations

import io
import json

import pytest

from conftest import MODEL, run_cli
from mlxtune.data.dataset import split_validation
from mlxtune.data.formats import read_records
from mlxtune.eval.evaluate import verdict


def _record(i: int) -> dict:
    return {"prompt": f"What is item {i}?", "completion": f"Item {i} is number {i * 7 % 13}."}


@pytest.fixture(scope="module")
def single_file_run(tmp_path_factory):
    """The issue's scenario: one data file of 91 records, of which training holds out 9 for validation."""
    root = tmp_path_factory.mktemp("split")
    data = root / "identity.jsonl"
    data.write_text("".join(json.dumps(_record(i)) + "\n" for i in range(91)))
    run_dir = root / "run"
    result = run_cli("lora", "--model", MODEL, "--data", data, "--out", run_dir, "--iters", 2, "--batch-size", 2,
                     "--max-seq-length", 64, "--eval-every", 2, "--val-batches", 1, "--json")
    assert result.returncode == 0, result.stderr
    assert "held out 9 of 91 records" in result.stderr
    return data, run_dir


def test_a_single_file_run_is_evaluated_on_the_records_training_held_out(single_file_run, tmp_path):
    data, run_dir = single_file_run
    result = run_cli("eval", run_dir, "--samples", 0, "--max-tokens", 4, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["split"] == "held-out validation" and report["examples"] == 9
    assert report["overlap"] == {"checked": True, "examples": 0, "sources": []}
    assert "held-out validation · 9 examples" in result.stdout
    assert "none of the 9 scored examples was trained on" in result.stdout

    # exactly the records training held out (same seed): the eval cases are those records, in that order
    from mlxtune.inference import prompt_format
    from mlxtune.eval.cases import load_cases
    from mlxtune.runs import open_for_inference, open_run

    loaded = open_for_inference(run_dir)
    cases = load_cases(open_run(run_dir), loaded.tokenizer, prompt_format(loaded).template)
    held_out = split_validation(read_records(data), 0)[1]
    assert [c.reference for c in cases.cases] == [r.completion for r in held_out]


def test_eval_on_data_that_overlaps_training_says_so_everywhere(single_file_run, tmp_path):
    data, run_dir = single_file_run
    records = read_records(data)
    trained, held_out = split_validation(records, 0)
    mixed = tmp_path / "mixed.jsonl"  # 3 records the run trained on (copied, so by content) + 2 it never saw
    mixed.write_text("".join(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n"
                             for r in trained[:3] + held_out[:2]))
    from mlxtune.eval import evaluate_run, print_summary
    from mlxtune.ui import make_console

    result = evaluate_run(run_dir, data=mixed, samples=0, max_tokens=4, out=tmp_path)  # in-process: no 2nd start-up
    console = make_console()
    console.file = io.StringIO()
    print_summary(console, result)
    terminal = console.file.getvalue()
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["split"] == "file" and report["examples"] == 5
    assert report["overlap"]["examples"] == 3
    assert report["overlap"]["sources"] == [f"{mixed}:{n}" for n in (1, 2, 3)]
    assert report["verdict"]["better"] is False and report["verdict"]["trained_on"] == 3
    assert "3 of 5 scored examples were trained on" in terminal.replace("\n", " ")
    assert "3 of 5 scored examples were trained on" in (tmp_path / "report.html").read_text()


def test_the_verdict_never_calls_a_gain_on_training_data_better():
    clear_gain = {"base": {"value": 3.0, "low": 2.9, "high": 3.1}, "tuned": {"value": 1.0, "low": 0.9, "high": 1.1},
                  "difference": {"value": -2.0, "low": -2.1, "high": -1.9}}
    assert verdict(clear_gain, None, {"checked": True, "examples": 0, "sources": []}, 9)["better"]
    on_training = verdict(clear_gain, None, {"checked": True, "examples": 9, "sources": []}, 9)
    assert not on_training["better"] and "training data" in on_training["text"]
    assert "larger than the noise" not in on_training["text"]
