"""Prompt-only records for reinforcement learning: reading, one-line errors with file:line, rendering with the
chat template, and `data check` recognising them."""

from __future__ import annotations

import json

import pytest
from mlx_lm.utils import load_tokenizer

from conftest import MODEL, run_cli
from mlxtune.data.formats import RecordError
from mlxtune.data.prompts import (is_prompt_only_row, parse_prompt_record, prompt_ids, read_prompt_records,
                                  read_prompt_splits)
from mlxtune.data.template import FALLBACK_CHAT_TEMPLATE, render_chat

GOOD = [
    {"prompt": "What is 6 times 7?", "answer": "42", "level": 1},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": "4"},
    {"prompt": "Name a colour.", "system": "Answer in one word.", "answer": "red"},
]


def _write(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_records_keep_the_prompt_as_given_and_the_other_fields(tmp_path):
    records = read_prompt_records(_write(tmp_path / "train.jsonl", GOOD))
    assert [r.source for r in records] == [f"{tmp_path / 'train.jsonl'}:{n}" for n in (1, 2, 3)]
    assert records[0].prompt == "What is 6 times 7?" and records[0].fields == {"answer": "42", "level": 1}
    assert records[0].messages == [{"role": "user", "content": "What is 6 times 7?"}]
    assert records[1].conversational and records[1].messages[0]["role"] == "system"
    assert records[2].messages[0] == {"role": "system", "content": "Answer in one word."}
    gsm = parse_prompt_record({"question": "3+4?", "answer": "3+4=7\n#### 7"}, "gsm.jsonl:1", "question")
    assert gsm.prompt == "3+4?" and gsm.fields == {"answer": "3+4=7\n#### 7"}


def test_prompt_ids_end_with_the_generation_prompt():
    tokenizer = load_tokenizer(MODEL)
    record = parse_prompt_record(GOOD[0], "x:1")
    ids = prompt_ids(record, tokenizer, FALLBACK_CHAT_TEMPLATE)
    rendered = render_chat(tokenizer, record.messages, FALLBACK_CHAT_TEMPLATE, add_generation_prompt=True)
    assert rendered.endswith("### Assistant:\n")
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id  # one BOS, the template's
    assert tokenizer.decode(ids).strip().endswith("### Assistant:")


@pytest.mark.parametrize("row,message", [
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"question": "x", "answer": "1"}', "no 'prompt' field \\(keys: answer, question\\)"),
    ('{"prompt": "  "}', "empty 'prompt'"),
    ('{"prompt": 7}', "'prompt' must be text or a message list, got int"),
    ('{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "ends with an assistant turn"),
    ('{"prompt": [{"role": "system", "content": "s"}]}', "has no user turn"),
    ('{"prompt": [{"content": "q"}]}', "message 1 has no role"),
    ('{"prompt": "q", "system": 3}', "'system' must be text"),
    ('{"prompt": "q", ', "invalid JSON"),
])
def test_bad_records_are_one_line_errors_with_file_and_line(tmp_path, row, message):
    path = _write(tmp_path / "train.jsonl", [GOOD[0], row])
    with pytest.raises(RecordError, match=message) as caught:
        read_prompt_records(path)
    assert caught.value.where == f"{path}:2" and "\n" not in str(caught.value) and caught.value.exit_code == 2
    problems = []
    assert len(read_prompt_records(path, problems)) == 1 and len(problems) == 1


def test_splits_hold_out_validation(tmp_path):
    _write(tmp_path / "train.jsonl", [{"prompt": f"q{n}", "answer": str(n)} for n in range(20)])
    records, notes = read_prompt_splits(tmp_path)
    assert len(records["train"]) == 18 and len(records["valid"]) == 2 and "held out 2 of 20 prompts" in notes[0]


def test_only_prompt_only_rows_are_recognised():
    assert is_prompt_only_row({"prompt": "q", "answer": "a"})
    assert not is_prompt_only_row({"prompt": "q", "completion": "a"})
    assert not is_prompt_only_row({"prompt": "q", "chosen": "a", "rejected": "b"})
    assert not is_prompt_only_row({"messages": []}) and not is_prompt_only_row(["prompt"])


def test_data_check_recognises_prompt_only_data(tmp_path):
    path = _write(tmp_path / "train.jsonl", GOOD * 4 + [{"prompt": ""}])
    result = run_cli("data", "check", path, "--model", MODEL, "--json")
    assert result.returncode == 1, result.stderr  # one bad record
    report = json.loads(result.stdout)
    assert [p["where"] for p in report["problems"]] == [f"{path}:13"]
    assert {s["kind"] for s in report["splits"]} == {"prompt-only"}
    assert sum(s["records"] for s in report["splits"]) == 12
    assert "prompt-only records" in report["notes"][0] and "answer, level, system" in report["notes"][0]
    train = next(s for s in report["splits"] if s["split"] == "train")
    assert report["unit"] == "tokens" and train["lengths"]["min"] > 5 and train["duplicates"] > 0
    text = run_cli("data", "check", path)
    assert "prompt-only" in text.stdout and f"{path}:13" in text.stdout
