"""`mlxtune eval` on a real run: tuned beats base beyond the intervals, and the report renders in a real browser."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pytest

from conftest import MODEL, WIKISQL, run_cli
from mlxtune.eval.metrics import parse_metric
from mlxtune.eval.stats import mean_interval, paired_ratio_difference, ratio_interval


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "headless Chromium is needed (scripts/test.sh installs Debian's chromium package)"
    return path


def test_eval_shows_the_tuned_model_better_and_the_report_renders_in_chromium(trained_run, tmp_path):
    run_dir, _ = trained_run
    result = run_cli("eval", run_dir, "--limit", 24, "--samples", 3, "--max-tokens", 24, "--out", tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    base, tuned, difference = (report["loss"][k] for k in ("base", "tuned", "difference"))
    assert tuned["value"] < base["value"]
    assert tuned["high"] < base["low"]  # the intervals do not overlap
    assert difference["high"] < 0 and report["verdict"]["better"] and "better" in report["verdict"]["text"]
    assert report["split"] == "test" and report["examples"] == 24
    assert math.isclose(report["perplexity"]["tuned"]["value"], math.exp(tuned["value"]), rel_tol=1e-6)
    assert report["task"]["metric"] == "exact" and len(report["samples"]) == 3
    assert all(s["reference"].startswith("A: SELECT") for s in report["samples"])
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] == report["loss"]

    page = (tmp_path / "report.html").read_text()
    for external in ('src="http', "src='http", 'href="http', "url(http", "@import", "<link"):
        assert external not in page  # self-contained: nothing fetched from the network
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", (tmp_path / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    # Set by the page's script from the laid-out sizes: two charts drawn, three comparison rows shown.
    assert 'data-charts-rendered="2"' in dom and 'data-table-rows="3"' in dom, dom[:500]


def test_eval_loss_is_the_training_validation_loss(trained_run):
    from mlxtune.eval.scoring import example_losses
    from mlxtune.runs import open_for_inference
    from mlxtune.data.formats import read_records
    from mlxtune.data.template import tokenize_records
    from mlxtune.train.validation import validation_loss

    run_dir, _ = trained_run
    loaded = open_for_inference(run_dir)
    examples, _ = tokenize_records(read_records(WIKISQL / "valid.jsonl")[:12], loaded.tokenizer, None,
                                   max_seq_length=128)
    sums, counts = example_losses(loaded.model, examples)
    assert math.isclose(sum(sums) / sum(counts), validation_loss(loaded.model, examples), rel_tol=1e-4)


def test_bootstrap_intervals_cover_the_value_and_pairing_narrows_the_difference():
    rng = np.random.default_rng(1)
    counts = rng.integers(5, 40, size=60)
    base = counts * (3.0 + rng.normal(0, 0.8, size=60))
    tuned = base - counts * (0.1 + rng.normal(0, 0.05, size=60))  # a small, consistent gain
    one = ratio_interval(base, counts)
    assert one.low < one.value < one.high
    paired = paired_ratio_difference(tuned, base, counts)
    assert paired.high < 0  # the gain is clear when paired…
    assert ratio_interval(tuned, counts).overlaps(one)  # …though the separate intervals overlap
    hits = mean_interval([1, 0, 1, 1])
    assert hits.value == 0.75 and 0 <= hits.low <= hits.high <= 1


@pytest.mark.parametrize("spec, generation, reference, expected", [
    ("exact", "  SELECT a\n FROM t ", "SELECT a FROM t", 1.0),
    ("exact", "SELECT b FROM t", "SELECT a FROM t", 0.0),
    ("contains", "the answer is 42.", "42", 1.0),
    (r"regex:####\s*(-?[\d.,]+)", "so 6*7 = 42 #### 42", "work... #### 42", 1.0),
    (r"regex:####\s*(-?[\d.,]+)", "#### 41", "#### 42", 0.0),
])
def test_task_metrics(spec, generation, reference, expected):
    assert parse_metric(spec).score(generation, reference) == expected


def test_eval_bad_input_is_a_one_line_error(tmp_path):
    for args, message in ((["--metric", "regex:("], "bad --metric regex"), (["--metric", "bleu"], "unknown metric")):
        result = run_cli("eval", MODEL, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith("error:") and (message in result.stderr or "not an mlxtune run" in
                                                       result.stderr)
