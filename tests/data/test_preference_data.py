"""Preference pairs in the shapes people have, normalised to (prompt, chosen answer, rejected answer); data check
reports pairs, identical answers and prompt-only records."""

from __future__ import annotations

import json

import pytest
from mlx_lm.utils import load_tokenizer

from conftest import MODEL
from mlxtune.data.check import check_data
from mlxtune.data.preference import parse_preference, tokenize_pair
from mlxtune.data.template import FALLBACK_CHAT_TEMPLATE
from mlxtune.errors import UsageError

USER = {"role": "user", "content": "What is 2+2?"}
GOOD = {"role": "assistant", "content": "4"}
BAD = {"role": "assistant", "content": "5"}

SHAPES = {
    "strings": ({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}, "prompt/chosen/rejected"),
    "trl explicit prompt": ({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "conversational"),
    "trl implicit prompt": ({"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "conversational"),
    "anthropic hh": ({"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4",
                      "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5"}, "hh"),
    "llamafactory alpaca": ({"instruction": "What is 2+2?", "input": "", "chosen": "4", "rejected": "5"},
                            "llamafactory"),
    "llamafactory alpaca output pair": ({"instruction": "What is 2+2?", "output": ["4", "5"]}, "llamafactory"),
    "llamafactory sharegpt": ({"conversations": [{"from": "human", "value": "What is 2+2?"}],
                               "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}},
                              "llamafactory"),
}


@pytest.mark.parametrize("name", SHAPES)
def test_every_shape_becomes_the_same_pair(name):
    row, shape = SHAPES[name]
    record = parse_preference(row, "f.jsonl:1")
    assert record.shape == shape
    assert record.prompt == [USER]
    assert record.chosen == [GOOD] and record.rejected == [BAD]


def test_multi_turn_transcripts_share_the_prompt_up_to_the_last_assistant_turn():
    earlier = [USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    record = parse_preference({"chosen": earlier + [{"role": "assistant", "content": "6"}],
                               "rejected": earlier + [{"role": "assistant", "content": "7"}]}, "f:1")
    assert record.prompt == earlier and record.chosen[0]["content"] == "6"
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 3+3?\n\nAssistant: "
    record = parse_preference({"chosen": hh + "6", "rejected": hh + "seven"}, "f:1")
    assert [m["role"] for m in record.prompt] == ["user", "assistant", "user"]
    assert record.chosen == [{"role": "assistant", "content": "6"}]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "only a prompt"}, "prompt-only record"),
    ({"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]}, "differ before"),
    ({"chosen": "4", "rejected": "5"}, "without a prompt"),
    ({"prompt": "q", "chosen": "", "rejected": "5"}, "prompt-only record"),
    ({"instruction": "q", "output": ["4"]}, "two answers"),
])
def test_bad_records_name_their_line(row, message):
    with pytest.raises(UsageError) as error:
        parse_preference(row, "f.jsonl:7")
    assert error.value.message.startswith("f.jsonl:7: ") and message in error.value.message and error.value.hint


def test_only_the_answer_is_scored_even_after_earlier_assistant_turns():
    tokenizer = load_tokenizer(MODEL)
    earlier = [USER, {"role": "assistant", "content": "four"}, {"role": "user", "content": "And 3+3?"}]
    record = parse_preference({"chosen": earlier + [{"role": "assistant", "content": "six"}],
                               "rejected": earlier + [{"role": "assistant", "content": "seven"}]}, "f:1")
    pair = tokenize_pair(record, tokenizer, FALLBACK_CHAT_TEMPLATE)
    scored = tokenizer.decode(pair.chosen.ids[pair.chosen.supervised].tolist())
    assert "six" in scored and "four" not in scored
    assert "seven" in tokenizer.decode(pair.rejected.ids[pair.rejected.supervised].tolist())


def test_data_check_reports_pairs_identical_answers_and_prompt_only_records(tmp_path):
    rows = [{"prompt": f"q{n}", "chosen": f"good {n}", "rejected": f"bad {n}"} for n in range(8)]
    rows.append({"prompt": "same", "chosen": "x", "rejected": "x"})
    rows.append({"prompt": "no answers"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check_data(tmp_path, MODEL, show=1)
    assert [p["where"] for p in report.problems] == [f"{tmp_path / 'train.jsonl'}:10"]
    assert "prompt-only" in report.problems[0]["message"]
    assert [(w["code"], w["where"]) for w in report.warnings] == [("identical-pair", f"{tmp_path / 'train.jsonl'}:9")]
    assert sum(s.records for s in report.splits) == 9 and {s.kind for s in report.splits} == {"preference"}
    assert report.splits[0].supervised_share and 0 < report.splits[0].supervised_share < 1
    assert [e["source"].rsplit(" ", 1)[1] for e in report.examples] == ["(chosen)", "(rejected)"]
