"""Data in the conventions other tools document, written here in their documented shapes, read as they mean it.

Each test writes a small file the way LLaMA-Factory, the OpenAI fine-tuning API, TRL or Axolotl document it and
checks what mlxtune trains on (the supervised text, with the real stories260K tokenizer and fallback template).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.utils import load_tokenizer

from conftest import MODEL
from mlxtune.data import FALLBACK_CHAT_TEMPLATE, load_datasets, read_records
from mlxtune.data.formats import PAIRED, UNPAIRED, detect_preference, parse_record
from mlxtune.data.template import tokenize_record
from mlxtune.errors import MlxtuneError, UsageError


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


def supervised_runs(tokenizer, record) -> list[str]:
    """The trained-on text of a record, one string per contiguous supervised run."""
    example = tokenize_record(record, tokenizer, FALLBACK_CHAT_TEMPLATE, train_on_prompt=False)
    runs, current = [], []
    for token, supervised in zip(example.ids.tolist(), example.supervised.tolist()):
        if supervised:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_one(directory, name, row):
    """Write one record as the tool's file would hold it (.json: an indented array, .jsonl: a line) and read it."""
    path = directory / name
    if name.endswith(".json"):
        path.write_text(json.dumps([row], indent=2))
    else:
        write_jsonl(path, [row])
    (record,) = read_records(path)
    return record


# LLaMA-Factory's sharegpt tool-use shape (data/README.md, glaive_toolcall_en_demo.json): tools as a JSON string,
# function_call and observation turns, a system column.
SHAREGPT_TOOLS = {
    "conversations": [
        {"from": "human", "value": "Area of a 5 by 3 rectangle?"},
        {"from": "function_call",
         "value": json.dumps({"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}})},
        {"from": "observation", "value": json.dumps({"area": 15})},
        {"from": "gpt", "value": "The area is 15 square units."},
    ],
    "system": "You can call tools.",
    "tools": json.dumps([{"name": "calculate_area", "description": "Area of a shape",
                          "parameters": {"type": "object", "properties": {"shape": {"type": "string"}}}}]),
}


def test_llama_factory_sharegpt_tool_calls_and_observations(tmp_path, tokenizer):
    record = read_one(tmp_path, "glaive_toolcall.json", SHAREGPT_TOOLS)
    assert [m["role"] for m in record.messages] == ["system", "user", "assistant", "tool", "assistant"]
    call = record.messages[2]["tool_calls"][0]["function"]
    assert call == {"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}
    assert record.tools[0]["type"] == "function" and record.tools[0]["function"]["name"] == "calculate_area"
    runs = supervised_runs(tokenizer, record)
    assert len(runs) == 2 and '"calculate_area"' in runs[0] and runs[1].startswith("The area is 15")
    assert not any('"area": 15' in run for run in runs)  # the observation is context, not a target


def test_llama_factory_dataset_info_maps_columns_and_tags(tmp_path, tokenizer):
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "my_chats": {"file_name": "chats.json", "formatting": "sharegpt",
                     "columns": {"messages": "dialog", "system": "persona", "tools": "functions_json"},
                     "tags": {"role_tag": "speaker", "content_tag": "says", "user_tag": "customer",
                              "assistant_tag": "agent", "observation_tag": "result", "function_tag": "call"}},
        "my_alpaca": {"file_name": "alpaca.json", "columns": {"prompt": "question", "query": "context",
                                                              "response": "reply", "system": "sys"}},
    }))
    (tmp_path / "chats.json").write_text(json.dumps([{
        "dialog": [{"speaker": "customer", "says": "Where is my parcel?"},
                   {"speaker": "call", "says": json.dumps({"name": "track", "arguments": {"id": 7}})},
                   {"speaker": "result", "says": "in Lyon"},
                   {"speaker": "agent", "says": "It is in Lyon."}],
        "persona": "You are a courier.",
    }], indent=2))
    (tmp_path / "alpaca.json").write_text(json.dumps([{"question": "Capital?", "context": "France", "reply": "Paris",
                                                      "sys": "Be short."}]))
    (chat,) = read_records(tmp_path / "chats.json")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert chat.messages[0]["content"] == "You are a courier."
    (alpaca,) = read_records(tmp_path / "alpaca.json")
    assert (alpaca.prompt, alpaca.completion, alpaca.system) == ("Capital?\nFrance", "Paris", "Be short.")
    assert supervised_runs(tokenizer, alpaca) == ["Paris</s>"]


def test_alpaca_history_is_trained_on_and_system_kept(tmp_path, tokenizer):
    record = read_one(tmp_path, "alpaca.json", {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Math tutor.",
                           "history": [["What is 2+2?", "4"]]})
    assert [m["role"] for m in record.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert supervised_runs(tokenizer, record) == ["4</s>", "6</s>"]  # LLaMA-Factory learns history replies too


def test_openai_weight_tool_calls_and_value_content_parts(tmp_path, tokenizer):
    record = read_one(tmp_path, "openai.jsonl", {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": [{"type": "text", "value": "Weather in Paris?"}]},
            {"role": "assistant", "content": "A first try.", "weight": 0},
            {"role": "user", "content": "Again, with the tool."},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "weather", "arguments": "{\"city\": \"Paris\"}"}}], "loss_weight": 1},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "assistant", "content": [{"type": "text", "text": "It is sunny."}], "weight": 1},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
    })
    assert record.messages[1]["content"] == "Weather in Paris?"
    assert record.messages[4]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert record.messages[5]["tool_call_id"] == "call_1"
    runs = supervised_runs(tokenizer, record)
    assert len(runs) == 2 and '"city": "Paris"' in runs[0] and runs[1] == "It is sunny.</s>"
    assert "A first try." not in "".join(runs)  # weight 0: context only


def test_openai_deprecated_functions_and_function_call(tmp_path):
    record = read_one(tmp_path, "functions.jsonl", {"messages": [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "function_call": {"name": "clock", "arguments": "{}"}},
        {"role": "function", "name": "clock", "content": "12:00"},
        {"role": "assistant", "content": "Noon."}],
        "functions": [{"name": "clock", "parameters": {}}]})
    assert record.messages[1]["tool_calls"][0]["function"] == {"name": "clock", "arguments": {}}
    assert record.messages[2]["role"] == "tool" and record.tools[0]["function"]["name"] == "clock"


def test_trl_conversational_prompt_completion_trains_on_the_completion_only(tmp_path, tokenizer):
    record = read_one(tmp_path, "trl.jsonl", {
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": "Sky colour?"}],
        "completion": [{"role": "assistant", "content": "It is blue."}],
    })
    assert supervised_runs(tokenizer, record) == ["It is blue.</s>"]
    text = read_one(tmp_path, "trl_standard.jsonl", {"prompt": "The sky is", "completion": " blue."})
    assert (text.kind, text.prompt, text.completion) == ("completion", "The sky is", " blue.")


def test_axolotl_per_message_train_flag_and_input_output_segments(tmp_path, tokenizer):
    record = read_one(tmp_path, "chat_template.jsonl", {"conversations": [
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!", "train": False},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye.", "train": True}]})
    assert supervised_runs(tokenizer, record) == ["Goodbye.</s>"]
    segments = read_one(tmp_path, "input_output.jsonl", {"segments": [
        {"label": False, "text": "Q: colour of the sky?\nA:"}, {"label": True, "text": " blue, mostly."}]})
    example = tokenize_record(segments, tokenizer, None, train_on_prompt=False)
    trained = tokenizer.decode([t for t, s in zip(example.ids.tolist(), example.supervised.tolist()) if s])
    assert trained.strip() == "blue, mostly." and segments.convention.startswith("input_output")
    for row in ({"instruction": "Hi", "response": "Hello"}, {"INSTRUCTION": "Hi", "RESPONSE": "Hello"},
                {"system_prompt": "Be brief.", "question": "Hi", "response": "Hello"}):
        record = read_one(tmp_path, "axolotl.jsonl", row)
        assert (record.prompt, record.completion) == ("Hi", "Hello")


@pytest.mark.parametrize("row, shape", [
    ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, PAIRED),
    ({"chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
      "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}]}, PAIRED),
    ({"instruction": "Sky?", "input": "", "chosen": "Blue.", "rejected": "Green."}, PAIRED),
    ({"prompt": "The sky is", "completion": " blue.", "label": True}, UNPAIRED),
    ({"messages": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
      "label": False}, UNPAIRED),
    ({"prompt": "The sky is", "completion": " blue."}, None),
])
def test_preference_shapes_are_detected(row, shape):
    assert detect_preference(row) == shape


def test_lora_refuses_preference_data_naming_the_commands(tmp_path, tokenizer):
    pairs = write_jsonl(tmp_path / "dpo.jsonl",
                        [{"prompt": f"Q{i}", "chosen": "good", "rejected": "bad"} for i in range(40)])
    with pytest.raises(UsageError) as caught:
        load_datasets(pairs, tokenizer, use_cache=False)
    assert "40 record(s) are preference pairs (chosen/rejected" in caught.value.message
    assert f"mlxtune dpo --data {pairs}" in caught.value.hint and "mlxtune orpo" in caught.value.hint
    (tmp_path / "dataset_info.json").write_text(json.dumps({"fb": {"file_name": "feedback.jsonl", "columns": {
        "prompt": "q", "response": "a", "kto_tag": "thumbs_up"}}}))
    mapped = write_jsonl(tmp_path / "feedback.jsonl", [{"q": "Q", "a": "A", "thumbs_up": True}])
    with pytest.raises(UsageError, match="feedback.jsonl: 1 record.s. are unpaired preference data"):
        read_records(mapped)  # the KTO column is only known through dataset_info.json
    with pytest.raises(UsageError, match="x.jsonl:3: this is preference pairs"):
        parse_record({"prompt": "Q", "chosen": "A", "rejected": "B"}, "x.jsonl:3")
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Q", "completion": "A", "label": True}])
    with pytest.raises(UsageError, match="true/false label, for KTO") as caught:
        read_records(kto)
    assert "no KTO trainer yet" in caught.value.hint


def test_mixed_formats_name_their_line_ranges_not_a_template_exception(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "Once upon a time."}] * 3 + [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 2)
    with pytest.raises(UsageError) as caught:
        load_datasets(data, tokenizer, use_cache=False)
    assert "lines 1-3: text; lines 4-5: chat (messages)" in caught.value.message
    assert "keep one format per file" in caught.value.hint


def test_json_array_errors_point_at_the_real_line(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)] + [{"what": "no"}]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows, indent=2))  # each record spans 4 lines
    problems = []
    records = read_records(data, problems)
    assert [r.source for r in records] == [f"{data}:2 (record 1)", f"{data}:6 (record 2)", f"{data}:10 (record 3)"]
    assert problems[0].message.startswith(f"{data}:14 (record 4): unrecognised record (keys: what)")
    assert data.read_text().splitlines()[13].strip() == "{"


@pytest.mark.parametrize("row", [
    {"instruction": "Say it", "output": ""},
    {"prompt": "Say it", "completion": "  "},
    {"question": "Say it", "answer": ""},
    {"messages": [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": ""}]},
    {"conversations": [{"from": "human", "value": "Say it"}]},
    {"messages": [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": "x", "weight": 0}]},
    {"text": ""},
])
def test_nothing_to_learn_is_the_same_error_in_every_format(row):
    with pytest.raises(UsageError, match=r"^r\.jsonl:1: nothing to learn"):
        parse_record(row, "r.jsonl:1")


def test_messages_name_the_convention_they_expected():
    with pytest.raises(UsageError, match=r"expected \"text\" or \"value\" in message 1 'content' part 1, found txt, type"):
        parse_record({"messages": [{"role": "user", "content": [{"type": "text", "txt": "hi"}]},
                                   {"role": "assistant", "content": "x"}]}, "w:1")
    with pytest.raises(UsageError, match=r"'tools' is a string but not JSON") as caught:
        parse_record({**SHAREGPT_TOOLS, "tools": "[{name: calculate_area}]"}, "w:1")
    assert "LLaMA-Factory" in caught.value.hint
    with pytest.raises(UsageError, match=r"expected 'content' or 'value' or 'text', found role, txt"):
        parse_record({"messages": [{"role": "user", "txt": "hi"}, {"role": "assistant", "content": "x"}]}, "w:1")


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet='[]{}",:\n 0123456789abtrue', max_size=80))
def test_random_json_arrays_never_crash(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "train.json"
    path.write_text("[" + content)
    try:
        read_records(path)
    except MlxtuneError:
        pass


def test_records_nested_past_pythons_limit_are_our_error(tmp_path):
    deep = "[" * 100_000
    lines = tmp_path / "train.jsonl"
    lines.write_text('{"text": "fine"}\n{"text": ' + deep + "}\n")
    with pytest.raises(UsageError, match=r"train.jsonl:2: nested too deeply"):
        read_records(lines)
    array = tmp_path / "train.json"
    array.write_text('[\n{"text": "fine"},\n' + deep)
    with pytest.raises(UsageError, match=r"train.json:3: record 2 is nested too deeply"):
        read_records(array)
