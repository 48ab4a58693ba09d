"""`mlxtune dpo` / `mlxtune orpo` end to end on the bundled model, with pairs built from the bundled WikiSQL data:
chosen = the true SQL answer, rejected = the same words in reverse order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import MODEL, make_pairs, run_cli
from mlxtune.eval import evaluate_run


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"))


def test_dpo_raises_validation_preference_accuracy_from_chance_to_above_0_9(pairs_dir, tmp_path):
    run_dir = tmp_path / "dpo"
    result = run_cli("dpo", "--model", MODEL, "--data", pairs_dir, "--out", run_dir, "--iters", 8,
                     "--batch-size", 8, "--lr", "3e-3", "--eval-every", 4, "--report-every", 4,
                     "--val-batches", -1, "--max-seq-length", 128, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["objective"] == "dpo" and summary["reference"] == "adapters off"
    assert summary["initial_val"]["accuracy"] == 0.5  # policy = reference: every reward ties
    assert summary["final_val"]["accuracy"] > 0.9
    assert summary["final_val"]["margin"] > 0 and summary["final_val"]["loss"] < summary["initial_val"]["loss"]
    # the planner's estimate, made before training, against the peak MLX measured
    assert abs(summary["memory_estimate_gb"] / summary["peak_memory_gb"] - 1) < 0.2, summary

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    assert {"train_accuracy", "train_margin", "train_chosen_reward", "train_rejected_reward"} <= set(train[-1])
    assert [r["step"] for r in records if "val_accuracy" in r] == [0, 4, 8]
    assert (run_dir / "loss.png").stat().st_size > 0

    # mlxtune eval: which answer each model finds more likely — the base can't tell, the tuned model can.
    evaluation = evaluate_run(run_dir, out=tmp_path / "eval")
    accuracy = evaluation.task
    assert evaluation.kind == "preference" and accuracy["metric"] == "preference accuracy"
    assert accuracy["examples"] == 32 and 0.3 <= accuracy["base"]["value"] <= 0.7
    assert accuracy["tuned"]["value"] > 0.9 and accuracy["difference"]["low"] > 0  # beyond the noise
    assert (tmp_path / "eval" / "report.html").is_file()
    assert evaluation.overlap == {"checked": True, "examples": 0, "sources": []}
    # pairs the run trained on, by content: said, and never called a gain
    on_training = evaluate_run(run_dir, data=pairs_dir / "train.jsonl", limit=4, out=tmp_path / "eval-train")
    assert on_training.overlap["examples"] == 4 and not on_training.verdict["better"]


def test_orpo_from_a_supervised_run_with_its_adapter_merged(pairs_dir, trained_run, tmp_path):
    sft_dir, _ = trained_run
    run_dir = tmp_path / "orpo"
    result = run_cli("orpo", "--from", sft_dir, "--data", pairs_dir, "--out", run_dir, "--iters", 4,
                     "--batch-size", 8, "--lr", "3e-3", "--eval-every", 4, "--val-batches", 2,
                     "--max-seq-length", 128, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["objective"] == "orpo" and summary["reference"] == "none"
    assert summary["final_val"]["accuracy"] > summary["initial_val"]["accuracy"]
    # the new run's base is the supervised run's merged model; the run loads like any run
    config = (run_dir / "config.yaml").read_text()
    assert str(run_dir / "sft-merged") in config
    assert (run_dir / "sft-merged" / "config.json").is_file()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["objective"] == "orpo" and info["from_run"] == str(sft_dir)


def test_settings_over_the_memory_budget_are_refused_with_settings_that_fit(pairs_dir, tmp_path):
    out = tmp_path / "refused"
    result = run_cli("dpo", "--model", MODEL, "--data", pairs_dir, "--out", out, "--batch-size", 16,
                     "--max-seq-length", 128, "--memory", "0.045GB")
    assert result.returncode == 2, result.stderr
    assert "memory budget (--memory)" in result.stderr
    hint = next(line for line in result.stderr.splitlines() if line.startswith("hint:"))
    assert "--grad-checkpoint" in hint and "--batch-size" in hint and "--force" in hint, hint
    assert not out.exists()  # refused before anything was written


def test_bad_pairs_fail_before_any_model_loads_with_file_line_and_hint(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "only a prompt"}) + "\n")
    result = run_cli("dpo", "--model", tmp_path / "no-such-model", "--data", bad, "--out", tmp_path / "x")
    assert result.returncode == 2, result.stderr
    assert "prompt-only record" in result.stderr and "bad.jsonl:2" in result.stderr and "hint:" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("change,message", [({"beta": 0.0}, "beta must be positive"),
                                            ({"objective": "orpo", "precompute_reference": True}, "ORPO uses no"),
                                            ({"stop_on": "margin"}, "unknown stop_on")])
def test_preference_settings_refuse_what_makes_no_sense(change, message):
    from mlxtune.errors import UsageError
    from mlxtune.train.preference.run import PreferenceSettings

    with pytest.raises(UsageError, match=message):
        PreferenceSettings(**change).validate()


def test_resuming_a_preference_run_takes_the_safe_flags_and_refuses_the_others(tmp_path):
    """`dpo --resume` as `lora --resume`: length, cadence and step sizes may change, the rest is refused."""
    from mlxtune.errors import UsageError
    from mlxtune.train.preference.run import PreferenceSettings, resume_preference_settings, save_preference_settings

    save_preference_settings(PreferenceSettings(model="m", data="d", beta=0.2).validate(), tmp_path)
    settings = resume_preference_settings(tmp_path, {"iters": 7, "learning_rate": 1e-3, "beta": 0.2, "rank": None})
    assert (settings.iters, settings.learning_rate, settings.beta) == (7, 1e-3, 0.2)
    with pytest.raises(UsageError, match=r"can't change --beta \(the run has 0.2\)"):
        resume_preference_settings(tmp_path, {"beta": 0.5})
    with pytest.raises(UsageError, match="is a dpo run"):
        resume_preference_settings(tmp_path, {}, objective="orpo")


def test_precomputed_reference_trains_exactly_like_the_adapters_off_reference(tmp_path):
    """`--precompute-reference` caches the log-probs of the untrained weights once; training must then follow the
    adapters-off reference step for step (same data order, same reference values), and the cache covers every
    train and validation pair."""
    import numpy as np

    from mlxtune.train.preference.run import REFERENCE_FILE

    pairs_dir = make_pairs(tmp_path / "pairs", train=24, valid=8)
    losses = {}
    for name, extra in (("off", []), ("precomputed", ["--precompute-reference"])):
        run_dir = tmp_path / name
        result = run_cli("dpo", "--model", MODEL, "--data", pairs_dir, "--out", run_dir, "--iters", 3,
                         "--batch-size", 4, "--lr", "3e-3", "--eval-every", 3, "--report-every", 1,
                         "--val-batches", 1, "--max-seq-length", 128, "--json", *extra)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["reference"] == ("precomputed" if extra else "adapters off")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [(r["step"], r["train_loss"], r["train_margin"]) for r in records if "train_loss" in r]
        losses[name + " val"] = summary["final_val"]["loss"]
    assert [s for s, _, _ in losses["precomputed"]] == [1, 2, 3]
    for (_, loss_off, margin_off), (_, loss_pre, margin_pre) in zip(losses["off"], losses["precomputed"]):
        assert abs(loss_off - loss_pre) < 1e-5 and abs(margin_off - margin_pre) < 1e-5
    assert abs(losses["off val"] - losses["precomputed val"]) < 1e-5
    assert not (tmp_path / "off" / REFERENCE_FILE).exists()
    with np.load(tmp_path / "precomputed" / REFERENCE_FILE) as stored:
        assert len(stored["keys"]) == 24 + 8 and np.isfinite(stored["values"]).all()
        assert (stored["values"] < 0).all()  # log-probabilities of whole answers
