"""`data check` warnings: records that parse but would hurt the run, each at its file:line; and the report's shape."""

from __future__ import annotations

import json
import re

from conftest import MODEL, run_cli
from mlxtune import LoraSettings
from mlxtune.data.check import check_data
from mlxtune.train.loop import finetune
from mlxtune.ui import make_console


def chat(*turns):
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def by_code(report) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for warning in report.warnings:
        found.setdefault(warning["code"], []).append(warning["where"])
    return found


def test_each_warning_names_its_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    long_reply = "the cat sat on the mat and looked at the moon. " * 40
    train = write_jsonl(data / "train.jsonl", [
        chat("What is 2+2?", "Four."),                                                          # 1: fine
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "assistant", "content": "Hello."}]},                             # 2: no user turn
        {"messages": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": ""},
                      {"role": "user", "content": "B?"}, {"role": "assistant", "content": "B."}]},  # 3: empty
        chat("Hi", "Hello!", "Are you there?"),                                                # 4: ends on user
        chat("Write to the customer", "Dear {{ customer_name }}, thanks."),                    # 5: placeholder
        chat("Tell a story", long_reply),                                                       # 6: too long
    ])
    write_jsonl(data / "valid.jsonl", [chat("Unique question?", "Unique answer."), chat("What is 2+2?", "Four.")])
    report = check_data(data, MODEL, max_seq_length=128)
    assert report.problems == []
    found = by_code(report)
    assert found["no-user-turn"] == [f"{train}:2"]
    assert found["empty-turn"] == [f"{train}:3"]
    assert found["ends-on-user"] == [f"{train}:4"]
    assert found["placeholder"] == [f"{train}:5"]
    assert found["over-max-length"] == [f"{train}:6"]
    assert found["in-train"] == [f"{data / 'valid.jsonl'}:2"]
    over = next(w for w in report.warnings if w["code"] == "over-max-length")
    lost, total = (int(n.replace(",", "").removeprefix("at least ")) for n in
                   over["message"].split("drops ")[1].split(" supervised")[0].split(" of its "))
    assert lost > total / 2  # truncated to less than half its supervised tokens: warned, with the numbers
    share = next(w for w in report.warnings if w["code"] == "truncation")
    assert "1 of 6 train records (17%)" in share["message"]
    assert "max-length-over-context" not in found  # 128 < the model's 512

    # the same problems in the other shapes get the same rule
    other = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Punctuate", "output": "..."},
                                                    {"instruction": "", "output": "An answer to nothing."},
                                                    {"instruction": "Name?", "output": "Mine"}])
    found = by_code(check_data(other))
    assert found["near-empty-reply"] == [f"{other}:1"] and found["no-user-turn"] == [f"{other}:2"]


def test_context_window_copy_of_train_and_too_many_passes(tmp_path):
    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(6)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "valid.jsonl", rows[:3])
    report = check_data(tmp_path, MODEL, iters=200, batch_size=4, max_seq_length=2048)  # over the context 512
    found = by_code(report)
    assert report.context_length == 512 and found["max-length-over-context"] == ["--max-seq-length"]
    assert found["valid-copies-train"] == [str(tmp_path / "valid.jsonl")]
    assert found["too-small"] == ["--iters"]


def test_lone_file_split_labels_and_all_records_failing(tmp_path):
    good = write_jsonl(tmp_path / "train.jsonl", [chat(f"Q{i}?", f"A{i}.") for i in range(10)])
    report = check_data(good).to_dict()
    train, valid = report["splits"]
    assert train["file"] == str(good) and train["held_out_from"] is None
    assert valid["split"] == "valid" and valid["file"] is None and valid["held_out_from"] == str(good)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"q": i, "a": i} for i in range(300)])
    report = check_data(bad)
    assert report.splits == [] and len(report.problems) == 300
    assert not any("only one record" in note for note in report.notes)


def test_cli_groups_a_flood_and_strict_fails_on_warnings(tmp_path):
    flood = write_jsonl(tmp_path / "flood.jsonl", [{"question_text": "q", "answer_text": "a"}] * 500)
    result = run_cli("data", "check", flood)
    assert result.returncode == 1
    assert result.stdout.count("unrecognised record") == 3 and "and 497 more like this" in result.stdout
    assert "--prompt-key/--completion-key" in result.stdout and "found: answer_text, question_text" in result.stdout
    assert len(result.stdout.splitlines()) < 20

    warned = write_jsonl(tmp_path / "warned.jsonl", [chat("Hi", "Hello!", "Still there?")] + [
        chat(f"Q{i}?", f"A{i}.") for i in range(4)])
    strict = run_cli("data", "check", warned, "--model", MODEL, "--max-seq-length", 256, "--show", 1, "--strict")
    assert strict.returncode == 1, strict.stdout  # a warning alone fails only with --strict
    assert f"{warned}:1: ends on a user turn" in strict.stdout and "problem(s)" not in strict.stdout
    assert re.search(r"\{\+[^{}]*</s>\+\}", strict.stdout)  # piped: the supervised part is marked in the text

def test_lora_summarises_warnings_in_its_header(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [chat("Hi", "Hello!", "Still there?")] + [
        chat(f"Question {i}?", f"Answer {i}.") for i in range(5)])
    console = make_console()
    with console.capture() as captured:
        result = finetune(LoraSettings(model=str(MODEL), data=str(data), out=str(tmp_path / "run"), iters=1,
                                       batch_size=2, val_batches=1, max_seq_length=256), console=console)
    assert [w["code"] for w in result.data_warnings] == ["ends-on-user"]
    output = captured.get()
    assert f"{data}:1: ends on a user turn" in output
    assert "data warnings" in output and "ends on an unanswered user or tool turn ×1" in output
