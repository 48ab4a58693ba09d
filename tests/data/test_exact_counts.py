"""Counts people act on are exact or say what they are: a capped length is "at least", every bad preference record
is named (and --skip-invalid trains without them), and pairs truncation empties are named by line, in training and
in `data check` alike."""

from __future__ import annotations

import io
import json

import pytest
from mlx_lm.utils import load_tokenizer

from conftest import MODEL, run_cli
from mlxtune.data.check import check_data
from mlxtune.data.formats import read_records
from mlxtune.data.preference import parse_preference, read_preference_splits, tokenize_preference_splits
from mlxtune.errors import UsageError


def test_a_length_measured_only_up_to_the_cap_reads_at_least(tmp_path):
    from mlxtune.ui import make_console, print_data_report

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "Once upon a time there was a cat. " * 400}) + "\n"
                    + json.dumps({"text": "A short one."}) + "\n")
    report = check_data(data, MODEL, max_seq_length=64)
    cap = report.measured_up_to
    assert cap == max(4 * 64, report.context_length or 0)
    over = next(w for w in report.warnings if w["code"] == "over-max-length")
    assert over["message"].startswith(f"at least {cap:,} tokens")
    console = make_console()
    console.file = io.StringIO()
    print_data_report(console, report, 64)
    assert f"≥{cap}" in console.file.getvalue()


def test_a_control_character_error_reads_once(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a\x01b"}\n')
    problems = []
    read_records(data, problems)
    assert "Invalid control character at column" in problems[0].message and "at at" not in problems[0].message


PAIRS = [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
         {"prompt": "What is 3+3?", "chosen": " ", "rejected": "7"},
         {"prompt": "What is 4+4?", "chosen": "8", "rejected": "9"},
         {"prompt": "What is 5+5?"},
         {"prompt": "What is 6+6?", "chosen": " ", "rejected": "11"},
         {"prompt": "What is 7+7?", "chosen": "14", "rejected": "13"}]


def test_every_bad_preference_record_is_named_and_skip_invalid_trains_without_them(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    with pytest.raises(UsageError) as refused:
        read_preference_splits(data)
    message = refused.value.message
    assert message.startswith("3 bad preference record(s): ")
    assert f"empty chosen answer ({data}:2, :5)" in message and f"prompt-only record (no chosen or rejected) " \
                                                                   f"({data}:4)" in message
    assert "--skip-invalid" in refused.value.hint
    splits = read_preference_splits(data, skip_invalid=True)
    assert sum(len(r) for r in splits.records.values()) == 3
    assert any(note.startswith("--skip-invalid: left out 3 bad") and f"{data}:2, :5" in note for note in splits.notes)

    # the CLI names them all before loading any model, and takes the flag
    result = run_cli("dpo", "--model", MODEL, "--data", data, "--out", tmp_path / "run")
    assert result.returncode == 2 and f"({data}:2, :5)" in result.stderr and f"{data}:4" in result.stderr
    assert "--skip-invalid" in run_cli("dpo", "--help").stdout


def test_kto_records_are_named_as_kto_in_dpo():
    with pytest.raises(UsageError, match="unpaired preference data"):
        parse_preference({"prompt": "Hi", "completion": "Hello", "label": True}, "kto.jsonl:1")


def test_pairs_truncation_empties_are_named_by_line_in_training_and_predicted_by_data_check(tmp_path):
    data = tmp_path / "pairs.jsonl"
    long_prompt = "Tell me a long story about a cat and a dog. " * 20
    pairs = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}] * 3 + [
        {"prompt": long_prompt, "chosen": "Yes.", "rejected": "No."}] + [
        {"prompt": "Hi?", "chosen": "Hey.", "rejected": "No."}] * 6
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    sets = tokenize_preference_splits(read_preference_splits(data), load_tokenizer(MODEL), max_seq_length=48)
    dropped = [n for n in sets.notes if "dropped" in n]
    assert len(dropped) == 1 and dropped[0].endswith(f"{data}:4"), sets.notes
    report = check_data(data, MODEL, max_seq_length=48)
    predicted = [w for w in report.warnings if w["code"] == "dropped-by-truncation"]
    assert [w["message"] for w in predicted] == dropped
