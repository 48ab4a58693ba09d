"""`mlxtune data check` and the data paths every format takes into training."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.utils import load_tokenizer

from conftest import MODEL, WWDC25, run_cli
from mlxtune import LoraSettings
from mlxtune.data import load_datasets, read_records
from mlxtune.data.formats import parse_record
from mlxtune.data.quality import record_warnings
from mlxtune.data.template import FALLBACK_CHAT_TEMPLATE, tokenize_record
from mlxtune.errors import MlxtuneError, UsageError
from mlxtune.train.loop import finetune
from mlxtune.ui import make_console


def test_data_check_reports_wwdc25_and_caches_tokens():
    first = run_cli("data", "check", WWDC25, "--model", MODEL, "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    train = next(s for s in report["splits"] if s["split"] == "train")
    assert train["records"] == 1800 and train["kind"] == "completion"
    assert 60 <= train["lengths"]["min"] <= train["lengths"]["median"] <= train["lengths"]["p95"] <= train["lengths"]["max"]
    assert 0.5 < train["supervised_share"] < 0.95  # prompts are masked out
    assert report["template"] == "fallback" and report["problems"] == []
    second = json.loads(run_cli("data", "check", WWDC25, "--model", MODEL, "--json").stdout)
    assert second["from_cache"] is True
    assert second["splits"] == report["splits"]


def test_data_check_lists_every_problem_and_exits_1(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(
        '{"prompt": "a", "completion": "b"}\n'
        '{"prompt": "a", "completion": \n'
        '{"prompt": "a"}\n'
        '{"prompt": "a", "completion": "   "}\n'
        '{"prompt": "c", "completion": "d"}\n'
    )
    result = run_cli("data", "check", data)
    assert result.returncode == 1
    for line in (2, 3, 4):
        assert f"{data}:{line}:" in result.stdout
    assert "3 problem(s)" in result.stdout


def test_show_highlights_the_supervised_part():
    result = run_cli("data", "check", WWDC25, "--model", MODEL, "--show", 1, "--json")
    segments = json.loads(result.stdout)["examples"][0]["segments"]
    supervised = "".join(text for text, flag in segments if flag)
    first = json.loads((WWDC25 / "train.jsonl").read_text().splitlines()[0])
    assert supervised.strip().startswith(first["completion"][:30]) and supervised.strip().endswith("</s>")
    assert first["prompt"] in "".join(text for text, flag in segments if not flag)


GOOD_FILES = {
    "chat_tools.jsonl": json.dumps({
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": [{"type": "text", "text": "It is sunny."}]},
        ]}) + "\n",
    "sharegpt.jsonl": json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                                    {"from": "gpt", "value": "Hello there"}]}) + "\n",
    "alpaca.json": json.dumps([{"instruction": "Add", "input": "2 and 2", "output": "4"},
                               {"instruction": "Say hi", "output": "hi"}, {"instruction": "Say no", "output": "no"}]),
    "gsm8k.jsonl": json.dumps({"question": "2+2?", "answer": "4"}) + "\n",
    "table.csv": "prompt,completion\nWhat is red?,A colour\n\"Quote, comma\",ok\nWhy?,Because\n",
}


GOOD_KINDS = {"chat_tools.jsonl": "chat", "sharegpt.jsonl": "chat", "alpaca.json": "completion",
              "gsm8k.jsonl": "completion", "table.csv": "completion"}


@pytest.mark.parametrize("name", sorted(GOOD_FILES))
def test_each_good_format_trains(name, tmp_path):
    data = tmp_path / name
    content = GOOD_FILES[name]
    data.write_text(content * 3 if name.endswith(".jsonl") else content)
    result = finetune(LoraSettings(model=str(MODEL), data=str(data), out=str(tmp_path / "run"), iters=1,
                                   batch_size=2, val_batches=1), console=make_console(quiet=True))
    assert result.steps == 1 and 0 < result.final_train_loss < 20
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["data_kind"] == GOOD_KINDS[name]
    assert info["train_examples"] + info["valid_examples"] == len(read_records(data)) == 3  # none lost
    (step,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if "train_loss" in line]
    assert step["supervised_tokens"] > 0


def test_tool_calls_are_supervised_and_tools_rendered():
    tokenizer = load_tokenizer(MODEL)
    (record,) = [parse_record(json.loads(GOOD_FILES["chat_tools.jsonl"]), "x:1")]
    example = tokenize_record(record, tokenizer, FALLBACK_CHAT_TEMPLATE, train_on_prompt=False)
    supervised = tokenizer.decode([int(t) for t, s in zip(example.ids, example.supervised) if s])
    everything = tokenizer.decode([int(t) for t in example.ids])
    assert '"city": "Paris"' in supervised and "It is sunny." in supervised
    assert "sunny</s>" not in supervised  # the tool's answer is context, not a target
    assert "### Tools:" in everything and "weather" in everything


def test_a_100k_token_record_is_truncated_and_reported(tmp_path):
    tokenizer = load_tokenizer(MODEL)
    data = tmp_path / "train.jsonl"
    long_text = "Once upon a time there was a cat. " * 12000
    data.write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "A short one."}) + "\n")
    datasets = load_datasets(data, tokenizer, max_seq_length=512)
    assert max(len(e) for e in datasets.train + datasets.valid) <= 512
    note = next(n for n in datasets.notes if "truncated" in n)
    longest = int(note.split("longest ")[1].split(")")[0])
    assert longest > 4 * 512  # a lower bound: text far past --max-seq-length is never tokenized (i19)
    dropped = load_datasets(data, tokenizer, max_seq_length=512, drop_long=True)
    assert all(len(e) < 512 for e in dropped.train + dropped.valid)
    assert any("dropped" in n for n in dropped.notes)


def test_custom_prompt_and_completion_keys(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"q": "Why?", "a": "Because."}) + "\n")
    (record,) = read_records(data, keys=("q", "a"))
    assert (record.prompt, record.completion) == ("Why?", "Because.")
    with pytest.raises(UsageError, match="unrecognised record"):
        read_records(data)


def test_empty_user_turn_is_a_warning_not_an_error(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": ""},
                                             {"role": "assistant", "content": "x"}]}) + "\n")
    (record,) = read_records(data)
    (warning,) = record_warnings(record)
    assert str(warning) == f"{data}:1: message 1 (user) is empty"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["role", "content", "from", "value", "type", "text", "tool_calls"]) | st.text(max_size=8),
        children, max_size=4),
    max_leaves=12,
)
record_keys = st.sampled_from(["messages", "conversations", "prompt", "completion", "instruction", "input",
                               "output", "text", "question", "answer", "tools"]) | st.text(max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(record_keys, json_values, max_size=4) | json_values)
def test_random_records_parse_or_raise_our_error(row):
    try:
        record = parse_record(row, "random.jsonl:1")
    except MlxtuneError as error:
        assert error.message.startswith("random.jsonl:1")
        return
    assert record.kind in ("chat", "completion", "text")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_random_file_bytes_never_crash(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "train.jsonl"
    path.write_bytes(content)
    try:
        read_records(path)
    except MlxtuneError:
        pass


def test_data_check_names_the_template_as_the_other_commands_do():
    result = run_cli("data", "check", WWDC25, "--model", MODEL)
    assert result.returncode == 0, result.stderr
    assert "template: mlxtune's fallback template (### User: / ### Assistant:)" in " ".join(result.stdout.split())
