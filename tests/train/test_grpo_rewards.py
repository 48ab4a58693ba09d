"""Reward specs, built-ins, TRL-convention user functions and the one-line errors of a broken reward."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mlxtune.errors import UsageError
from mlxtune.train.grpo.rewards import (RewardError, _validate, as_completions, check_fields, final_number, parse_reward,
                                        parse_rewards, score)

SOURCES = ["data.jsonl:1", "data.jsonl:2", "data.jsonl:3"]


def _score(spec, completions, records, prompts=None):
    prompts = prompts or ["q"] * len(completions)
    return score([parse_reward(spec)], prompts, completions, records, SOURCES[:len(completions)]).values[0].tolist()


def test_exact_contains_number():
    records = [{"answer": "Paris"}, {"answer": "Paris"}, {"answer": "Paris"}]
    assert _score("exact", [" Paris\n", "paris", "It is Paris"], records) == [1, 0, 0]
    assert _score("contains", [" Paris\n", "paris", "It is Paris"], records) == [1, 0, 1]
    gsm = [{"answer": "She has 3 + 4 = 7 apples.\n#### 7"}, {"answer": "#### 1,200"}, {"label": 42}]
    assert _score("number", ["so 3 and then 7", "#### 1200", "nothing"], gsm[:2] + [{"answer": "5"}]) == [1, 1, 0]
    assert _score("number:label", ["the answer is 42.", "#### 41", "$42"], [gsm[2]] * 3) == [1, 0, 1]
    assert final_number("#### -3.5 then 9") == -3.5 and final_number("x = 12, y = 1,000") == 1000.0
    assert final_number("no digits") is None


def test_regex_format_json(tmp_path):
    records = [{"answer": "12", "city": "Oslo"}] * 3
    assert _score(r"regex:answer is (\d+)", ["The answer is 12.", "answer is 13", "no"], records) == [1, 0, 0]
    assert _score(r"regex@city:in ([A-Z]\w+)", ["in Oslo", "in Rome", "Oslo"], records) == [1, 0, 0]
    assert _score("format", ["3 + 4 = 7\n#### 7", "#### 7 apples", "7"], records) == [1, 0, 0]
    assert _score("format:think", ["<think>hm</think>\n<answer>7</answer>", "<answer>7</answer>", "x"],
                  records) == [1, 0, 0]
    assert _score("json", ['{"a": 1}', '```json\n[1, 2]\n```', "{a: 1}"], records) == [1, 1, 0]
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["name", "age"], "additionalProperties": False,
                                  "properties": {"name": {"type": "string", "minLength": 1},
                                                 "age": {"type": "integer", "minimum": 0}}}))
    assert _score(f"json:{schema}", ['{"name": "Ann", "age": 3}', '{"name": "Ann", "age": -1}',
                                     '{"name": "Ann", "age": 3, "x": 0}'], records) == [1, 0, 0]


def test_schema_subset_without_the_library():
    schema = {"type": "array", "minItems": 1, "items": {"enum": ["a", "b"]}}
    assert _validate(["a", "b"], schema) and not _validate([], schema) and not _validate(["c"], schema)
    assert _validate(3, {"type": "integer"}) and not _validate(True, {"type": "integer"})
    assert not _validate(3.5, {"type": "integer"}) and _validate(3.5, {"type": ["number", "null"]})
    assert _validate("ab1", {"type": "string", "pattern": r"\d$"}) and not _validate("ab", {"pattern": r"\d$"})


def test_unknown_schema_keyword_is_refused_without_jsonschema(tmp_path):
    try:
        import jsonschema  # noqa: F401
        pytest.skip("jsonschema is installed: every keyword is supported")
    except ImportError:
        pass
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "oneOf": [{"type": "object"}]}))
    with pytest.raises(UsageError, match="oneOf need the jsonschema library"):
        parse_reward(f"json:{schema}")


def test_weights_sum_and_none(tmp_path):
    user = tmp_path / "my_rewards.py"
    user.write_text(
        "def length_bonus(prompts, completions, answer, **kwargs):\n"
        "    return [None if a == 'skip' else len(c) / 10 for c, a in zip(completions, answer)]\n")
    rewards = parse_rewards(["exact", "0.5*format", f"-2*{user}:length_bonus"])
    assert [r.weight for r in rewards] == [1.0, 0.5, -2.0]
    result = score(rewards, ["p"] * 3, ["#### 7", "7", "x"], [{"answer": "#### 7"}, {"answer": "7"},
                                                                  {"answer": "skip"}], SOURCES)
    assert result.values[:, 0].tolist() == [1.0, 1.0, 0.6]
    assert math.isnan(result.values[2, 2])
    np.testing.assert_allclose(result.total, [1 + 0.5 - 1.2, 1 - 0.2, 0.0])
    summary = result.summary()
    assert summary[f"{user}:length_bonus"]["mean"] == pytest.approx(0.35)  # the None left out of the mean


def test_trl_convention_columns_and_conversational_completions(tmp_path):
    user = tmp_path / "trl_reward.py"
    user.write_text(
        "seen = {}\n"
        "def reward(prompts, completions, **kwargs):\n"
        "    seen.update(prompts=prompts, completions=completions, **kwargs)\n"
        "    return [1.0 if c[0]['content'] == a else 0.0 for c, a in zip(completions, kwargs['answer'])]\n")
    reward = parse_reward(f"{user}:reward")
    prompts = [[{"role": "user", "content": "2+2?"}]] * 2
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]]
    result = score([reward], prompts, completions, [{"answer": "4", "level": 1}, {"answer": "4", "level": 2}],
                   SOURCES[:2])
    assert result.total.tolist() == [1.0, 0.0]
    seen = reward.function.__globals__["seen"]
    assert seen["level"] == [1, 2] and seen["answer"] == ["4", "4"] and seen["prompts"] == prompts
    assert as_completions(["4", "5"], prompts) == completions and as_completions(["x"], ["text"]) == ["x"]
    # built-ins read the text of conversational completions too
    assert _score("exact", completions, [{"answer": "4"}] * 2, prompts) == [1.0, 0.0]


BROKEN = '''
def raises(prompts, completions, answer, **kwargs):
    return [1.0 / (len(a) - 3) for a in answer]

def nan(prompts, completions, **kwargs):
    return [float("nan") if c == "bad" else 0.0 for c in completions]

def short(prompts, completions, **kwargs):
    return [0.0]

def text(prompts, completions, **kwargs):
    return ["high"] * len(completions)
'''


@pytest.mark.parametrize("name,message", [
    ("raises", r"^reward .*:raises failed on data.jsonl:2: ZeroDivisionError: float division by zero "
               r"\(at broken.py:3\)"),
    ("nan", r"^reward .*:nan returned nan on data.jsonl:3"),
    ("short", r"^reward .*:short returned 1 values for 3 completions \(the batch of 3 completions from "
              r"data.jsonl:1"),
    ("text", r"^reward .*:text returned 'high' on data.jsonl:1"),
])
def test_a_broken_reward_stops_with_one_line_naming_function_and_record(tmp_path, name, message):
    (tmp_path / "broken.py").write_text(BROKEN)
    reward = parse_reward(f"{tmp_path / 'broken.py'}:{name}")
    with pytest.raises(RewardError, match=message) as caught:
        score([reward], ["p"] * 3, ["ok", "ok", "bad"], [{"answer": "four"}, {"answer": "two"},
                                                         {"answer": "seven"}], SOURCES)
    assert "\n" not in str(caught.value) and caught.value.exit_code == 1


def test_bad_specs_are_usage_errors(tmp_path):
    (tmp_path / "r.py").write_text("def f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    for spec, message in [("nope", "unknown reward 'nope'"), ("regex:(", "bad regular expression"),
                          ("regex", "has no pattern"), ("format:xml", "unknown format"),
                          (f"{tmp_path}/r.py:g", "has no function 'g'.*functions found: f"),
                          (f"{tmp_path}/missing.py:f", "no file"), (f"{tmp_path}/syntax.py:f", "failed to load"),
                          ("json:/no/such/schema.json", "no schema file"), ("exact@x", "only regex takes @FIELD")]:
        with pytest.raises(UsageError, match=message):
            parse_reward(spec)
    with pytest.raises(UsageError, match="no reward given"):
        parse_rewards([])
    with pytest.raises(UsageError, match=r"data.jsonl:2: reward 'number:label' compares with field 'label'"):
        check_fields(parse_rewards(["format", "number:label"]), [{"label": 1}, {"answer": 2}], SOURCES[:2])
