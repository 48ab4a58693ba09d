"""Masking and parsing on real data and hand-written edge cases, with the real stories260K tokenizer."""

from __future__ import annotations

import json

import pytest
from mlx_lm.utils import load_tokenizer

from conftest import MODEL, WWDC25
from mlxtune.data import FALLBACK_CHAT_TEMPLATE, load_datasets, read_records
from mlxtune.data.formats import parse_record
from mlxtune.data.template import tokenize_record
from mlxtune.errors import UsageError


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


def _supervised_text(tokenizer, example):
    return tokenizer.decode([int(t) for t, s in zip(example.ids, example.supervised) if s])


def test_prompt_completion_supervises_exactly_the_completion_and_eos(tokenizer):
    record = parse_record({"prompt": "What is 2+2?", "completion": "It is four."}, "x:1")
    example = tokenize_record(record, tokenizer, FALLBACK_CHAT_TEMPLATE, train_on_prompt=False)
    supervised = [int(t) for t, s in zip(example.ids, example.supervised) if s]
    assert supervised[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(supervised[:-1]) == "It is four."


def test_every_assistant_turn_is_supervised(tokenizer):
    replies = ["First answer.", "Second one here.", "Third and last."]
    messages = [{"role": "system", "content": "Be brief."}]
    for i, reply in enumerate(replies):
        messages += [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": reply}]
    example = tokenize_record(parse_record({"messages": messages}, "x:1"), tokenizer, FALLBACK_CHAT_TEMPLATE, False)
    # split the supervised tokens into contiguous runs: one per assistant turn, each ending in EOS
    runs, current = [], []
    for token, supervised in zip(example.ids, example.supervised):
        if supervised:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert len(runs) == 3
    for run, reply in zip(runs, replies):
        assert run[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(run[:-1]) == reply


def test_train_on_prompt_supervises_everything_but_the_first_token(tokenizer):
    record = parse_record({"prompt": "Hi", "completion": "Hello"}, "x:1")
    example = tokenize_record(record, tokenizer, FALLBACK_CHAT_TEMPLATE, train_on_prompt=True)
    assert not example.supervised[0] and example.supervised[1:].all()


def test_text_records_get_bos_and_eos(tokenizer):
    example = tokenize_record(parse_record({"text": "Once upon a time"}, "x:1"), tokenizer, None, False)
    assert example.ids[0] == tokenizer.bos_token_id and example.ids[-1] == tokenizer.eos_token_id


def test_wwdc25_loads_with_fallback_template_and_prompt_masking(tokenizer):
    datasets = load_datasets(WWDC25, tokenizer, max_seq_length=4096)
    assert datasets.kind == "completion" and datasets.template.origin == "fallback"
    assert len(datasets.train) == 1800 and len(datasets.valid) == 144
    first = json.loads((WWDC25 / "train.jsonl").read_text().splitlines()[0])
    supervised = _supervised_text(tokenizer, datasets.train[0])
    assert supervised.startswith(first["completion"][:40]) and first["prompt"] not in supervised


def test_truncation_is_reported(tokenizer):
    datasets = load_datasets(WWDC25, tokenizer, max_seq_length=128)
    assert all(len(e) <= 128 for e in datasets.train)
    assert any("truncated" in note and "supervised tokens lost" in note for note in datasets.notes)


def test_single_file_gets_a_fixed_seed_validation_split(tmp_path, tokenizer):
    data = tmp_path / "all.jsonl"
    data.write_text("".join(json.dumps({"text": f"story number {i}"}) + "\n" for i in range(50)))
    first = load_datasets(data, tokenizer)
    second = load_datasets(data, tokenizer)
    assert len(first.valid) == 5 and len(first.train) == 45
    assert [e.source for e in first.valid] == [e.source for e in second.valid]
    assert any("held out 5 of 50" in note for note in first.notes)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "a"}\n{"text": \n', ":2: invalid JSON"),
        ('{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', "the records change format (line 1: text; line 2: prompt/completion)"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}\n', ":1: message 1 has unknown role"),
        ('{"prompt": "only a prompt"}\n', ":1: missing 'completion'"),
        ('{"foo": 1}\n', ":1: unrecognised record"),
        ("", "the file is empty"),
        ('{"text": "   "}\n', ":1: nothing to learn: empty 'text'"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(UsageError) as error:
        read_records(path)
    assert str(path) in error.value.message and message in error.value.message


def test_bom_crlf_json_array_and_content_parts(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\r\n{"text": "b"}\r\n')
    assert [r.text for r in read_records(bom)] == ["a", "b"]
    array = tmp_path / "array.json"
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    array.write_text(json.dumps([{"messages": [{"role": "user", "content": parts},
                                               {"role": "assistant", "content": "Hi"}]}]))
    (record,) = read_records(array)
    assert record.messages[0]["content"] == "Hello"


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(UsageError, match=r"train.jsonl:2: invalid UTF-8"):
        read_records(path)


def test_fallback_template_renders_exactly_the_documented_layout(tokenizer):
    """The fallback template's text is a contract (README, fused models, the Ollama/LM Studio templates): any change
    to it changes what every base-model run learns, so the whole rendering is pinned here."""
    from mlxtune.data.template import render_chat

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."},
                {"role": "user", "content": "Thanks"}]
    tools = [{"type": "function", "function": {"name": "weather"}}]
    rendered = render_chat(tokenizer, messages, FALLBACK_CHAT_TEMPLATE, add_generation_prompt=True, tools=tools)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    call = '[{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]'
    assert rendered == (
        f'{bos}### Tools:\n[{{"type": "function", "function": {{"name": "weather"}}}}]\n\n'
        "Be brief.\n\n### User:\nWeather?\n\n"
        f"### Assistant:\n{call}{eos}\n\n### Tool:\nsunny\n\n### Assistant:\nSunny.{eos}\n\n"
        "### User:\nThanks\n\n### Assistant:\n")
    plain = render_chat(tokenizer, messages[1:2], FALLBACK_CHAT_TEMPLATE)
    assert plain == f"{bos}### User:\nWeather?\n\n"  # no tools, no generation prompt: nothing added


def test_choose_template_text_file_model_or_fallback(tmp_path, tokenizer):
    """Which template a run trains with, and what its header and run.json call it."""
    from mlxtune.data.template import choose_template

    assert vars(choose_template(tokenizer, "text")) == {"template": None, "origin": "none"}
    template_file = tmp_path / "chat.jinja"
    template_file.write_text("{% for m in messages %}<{{ m['role'] }}>é{{ m['content'] }}{% endfor %}",
                             encoding="utf-8")
    chosen = choose_template(tokenizer, "chat", str(template_file))
    assert chosen.template == template_file.read_text(encoding="utf-8")
    assert chosen.origin == f"file:{template_file}"
    with pytest.raises(UsageError) as missing:
        choose_template(tokenizer, "chat", str(tmp_path / "absent.jinja"))
    assert str(missing.value.args[0]) == f"chat template file not found: {tmp_path / 'absent.jinja'}"
    assert missing.value.hint == "give a Jinja template file"
    # stories260K has no template of its own: the fallback; a tokenizer that has one keeps it
    assert vars(choose_template(tokenizer, "chat")) == {"template": FALLBACK_CHAT_TEMPLATE, "origin": "fallback"}
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.chat_template = own
    try:
        assert vars(choose_template(tokenizer, "prompt_completion")) == {"template": own, "origin": "model"}
    finally:
        tokenizer.chat_template = None


def test_a_failing_template_is_a_usage_error_with_a_hint(tokenizer):
    from mlxtune.data.template import render_chat

    broken = "{{ raise_exception('only user turns here') }}"
    with pytest.raises(UsageError) as failed:
        render_chat(tokenizer, [{"role": "user", "content": "hi"}], broken)
    assert str(failed.value.args[0]).startswith("chat template failed: ") and "only user turns" in str(
        failed.value.args[0])
    assert failed.value.hint == "check the messages' roles or pass --chat-template"


@pytest.mark.parametrize("hostile, says", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran longer than"),
    ("{{ 'x' * 10**8 }}", "characters"),
])
def test_a_hostile_template_is_stopped_in_seconds(tokenizer, hostile, says):
    import threading

    from mlxtune.data import sandbox
    from mlxtune.data.template import render_chat

    outcome = []

    def render():  # in a thread, so that a missing bound fails the test instead of hanging it
        try:
            render_chat(tokenizer, [{"role": "user", "content": "hi"}], hostile)
        except UsageError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=render, daemon=True)
    worker.start()
    worker.join(timeout=sandbox.MAX_RENDER_SECONDS + 10)
    assert outcome, "the hostile template was not stopped"
    assert says in outcome[0].args[0] and "--chat-template" in outcome[0].hint
    # later renderings are unchanged
    assert render_chat(tokenizer, [{"role": "user", "content": "hi"}], FALLBACK_CHAT_TEMPLATE).endswith("hi\n\n")
