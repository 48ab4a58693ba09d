"""Render records to text and mark which tokens the loss covers.

The supervised part is found in the *rendered* text (character spans of each assistant reply) and mapped to tokens
through the tokenizer's offset mapping, so merges across the prompt/reply boundary can't shift the mask the way
re-tokenizing pieces does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxtune.data.formats import Record
from mlxtune.data.sandbox import TemplateLimit, check_output, time_limit
from mlxtune.errors import UsageError

# Used when a model has no chat template of its own (base models). Documented in the README; saved into fused
# models so inference renders prompts exactly as training did. The EOS after each reply teaches the model to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}### Tools:\n{{ tools | tojson }}\n\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'tool' %}### Tool:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Assistant:\n{{ message['content'] }}"
    "{% if message.get('tool_calls') %}{{ message['tool_calls'] | tojson }}{% endif %}{{ eos_token }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


@dataclass
class TokenizedExample:
    ids: np.ndarray  # int32 token ids
    supervised: np.ndarray  # bool, True where the token is a target of the loss
    source: str

    def __len__(self) -> int:
        return len(self.ids)


# What each choice is called wherever it is printed (training's run table, chat/generate/serve headers, verify rows).
TEMPLATE_NAMES = {"model": "the model's own template",
                  "fallback": "mlxtune's fallback template (### User: / ### Assistant:)",
                  "none": "plain text"}


@dataclass
class TemplateChoice:
    template: str | None  # None for plain text
    origin: str  # "model", "fallback", "file:<path>" or "none" (plain text): saved in run.json as template_origin

    @property
    def name(self) -> str:
        """The choice in words, the same in every command."""
        return template_name(self.origin)


def template_name(origin: str) -> str:
    """A template choice's origin ("model", "fallback", "file:<path>", "none") in the words every command prints."""
    if origin.startswith("file:"):
        return f"the template file {origin[len('file:'):]}"
    return TEMPLATE_NAMES[origin]


def _named(template: str, origin: str) -> TemplateChoice:
    # mlxtune's fallback is called so wherever it comes from: a run's saved copy, a fused model's chat_template.jinja.
    return TemplateChoice(template, "fallback" if template == FALLBACK_CHAT_TEMPLATE else origin)


def choose_template(tokenizer, kind: str, template_file: str | Path | None = None, *,
                    own: str | None = None) -> TemplateChoice:
    """The one rule for which chat template renders prompts — in training, data checks, chat, generate, serve, eval,
    verify and export alike. `kind` "text" (plain-text data, or a run trained on it): plain text, no template.
    Otherwise the template file (the user's --chat-template, or the copy a run saved of what it trained with), else
    the model's own (`own`: a model folder's chat_template.jinja; else the tokenizer's), else mlxtune's fallback."""
    if kind == "text":
        return TemplateChoice(None, "none")
    if template_file:
        path = Path(template_file)
        if not path.is_file():
            raise UsageError(f"chat template file not found: {path}", "give a Jinja template file")
        return _named(path.read_text(encoding="utf-8"), f"file:{path}")
    own = own or getattr(tokenizer, "chat_template", None)
    if own:
        return _named(own, "model")
    return TemplateChoice(FALLBACK_CHAT_TEMPLATE, "fallback")


def render_chat(tokenizer, messages, template: str, add_generation_prompt: bool = False, tools=None,
                **switches) -> str:
    """Hugging Face's rendering of `template`, bounded in time and output size (data/sandbox.py). `switches` are
    the template's own variables (`enable_thinking=False`)."""
    try:
        with time_limit():
            rendered = tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
                tools=tools, **switches,
            )
        return check_output(rendered, sum(len(str(m)) for m in messages) + len(str(tools or "")))
    except TemplateLimit as exc:
        raise UsageError(f"chat template refused: {exc}",
                         "the model's chat template is broken or hostile: pass --chat-template FILE") from None
    except Exception as exc:  # jinja errors, raise_exception() in templates
        raise UsageError(f"chat template failed: {exc}", "check the messages' roles or pass --chat-template") from None


def _render_or_empty(tokenizer, messages, template: str, tools) -> str:
    """The prompt before an assistant turn; some templates refuse an empty conversation, which renders as ""."""
    try:
        return render_chat(tokenizer, messages, template, True, tools)
    except UsageError:
        if messages:
            raise
        return ""


def _supervised_spans(tokenizer, messages, template: str, rendered: str, tools=None,
                      trained: list[bool] | None = None) -> list[tuple[int, int]]:
    """Character spans of every trained assistant reply (with its end-of-turn marker) in `rendered`."""
    spans = []
    search_from = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or (trained is not None and not trained[index]):
            continue
        before = _render_or_empty(tokenizer, messages[:index], template, tools)
        through = render_chat(tokenizer, messages[: index + 1], template, False, tools)
        if rendered.startswith(through) and through.startswith(before) and len(through) > len(before):
            start, end = len(before), len(through)
        else:
            # Templates that rewrite earlier turns (e.g. strip reasoning): locate the reply text itself.
            start = rendered.find(message["content"], search_from)
            if start < 0 or not message["content"]:
                raise UsageError("the chat template drops an assistant reply", "pass --chat-template")
            end = start + len(message["content"])
            eos = tokenizer.eos_token or ""
            if eos and rendered.startswith(eos, end):
                end += len(eos)
        # The separator after the end-of-turn marker is the template's, not the reply's.
        while end > start and rendered[end - 1].isspace():
            end -= 1
        spans.append((start, end))
        search_from = end
    return spans


def _encode_with_offsets(tokenizer, text: str, add_special_tokens: bool):
    # Offsets need the Hugging Face tokenizer itself, which mlx-lm's TokenizerWrapper keeps in the private
    # `_tokenizer` (tests/test_mlx_lm_private.py fails clearly if an upgrade renames it).
    backend = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        encoded = backend(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError:
        raise UsageError(
            "this tokenizer has no offset mapping (a 'slow' tokenizer)",
            "convert the model with a tokenizer.json (fast tokenizer)",
        ) from None
    return encoded["input_ids"], encoded["offset_mapping"]


def _mask(offsets, spans) -> np.ndarray:
    supervised = np.zeros(len(offsets), dtype=bool)
    for position, (start, end) in enumerate(offsets):
        if end > start and any(start < span_end and end > span_start for span_start, span_end in spans):
            supervised[position] = True
    if len(supervised):
        supervised[0] = False  # the first token is never predicted
    return supervised


# No token covers more characters than this: text past max_seq_length × this can't reach a truncated example, so it
# is never tokenized (a 50 MB one-line record costs milliseconds, not gigabytes). Its length then reads as a lower
# bound, still over the limit.
MAX_CHARS_PER_TOKEN = 64


def tokenize_record(record: Record, tokenizer, template: str | None, train_on_prompt: bool,
                    max_chars: int | None = None) -> TokenizedExample:
    if record.segments is not None:  # template-free pieces: the labelled ones are trained on
        ids, offsets = _encode_with_offsets(tokenizer, record.text[:max_chars], False)
        spans, at = [], 0
        for piece, label in record.segments:
            if label or train_on_prompt:
                spans.append((at, at + len(piece)))
            at += len(piece)
        return TokenizedExample(np.asarray(ids, dtype=np.int32), _mask(offsets, spans), record.source)
    if record.kind == "text":
        ids = list(tokenizer.encode(record.text[:max_chars]))
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        supervised = np.ones(len(ids), dtype=bool)
        supervised[0] = False  # the first token is never predicted
        return TokenizedExample(np.asarray(ids, dtype=np.int32), supervised, record.source)

    if template is None:
        raise UsageError(f"{record.source}: a {record.kind} record in plain-text data",
                         "keep one format per dataset (text, or chat/prompt-completion)")
    messages = record.chat_messages()
    rendered = render_chat(tokenizer, messages, template, False, record.tools)
    # Templates write their own BOS; the tokenizer must not add a second one.
    bos = tokenizer.bos_token or ""
    add_special = not (bos and rendered.startswith(bos))
    ids, offsets = _encode_with_offsets(tokenizer, rendered[:max_chars], add_special)
    if train_on_prompt:
        spans = [(0, len(rendered))]
    else:
        spans = _supervised_spans(tokenizer, messages, template, rendered, record.tools, record.trained)
    return TokenizedExample(np.asarray(ids, dtype=np.int32), _mask(offsets, spans), record.source)


@dataclass
class LengthReport:
    truncated: int = 0
    dropped: int = 0
    longest: int = 0
    supervised_tokens_lost: int = 0
    supervised_tokens: int = 0  # in all examples, before truncation
    over: list[tuple[str, int, int, int]] = field(default_factory=list)  # (source, tokens, supervised, lost)


def tokenize_records(
    records: list[Record],
    tokenizer,
    template: str | None,
    train_on_prompt: bool = False,
    max_seq_length: int = 2048,
    drop_long: bool = False,
) -> tuple[list[TokenizedExample], LengthReport]:
    """Tokenize all records; over-long ones are truncated (or dropped), and the report says how many."""
    examples, report = [], LengthReport()
    for record in records:
        example = tokenize_record(record, tokenizer, template, train_on_prompt,
                                  max_chars=max_seq_length * MAX_CHARS_PER_TOKEN)
        report.longest = max(report.longest, len(example))
        supervised = int(example.supervised.sum())
        report.supervised_tokens += supervised
        if len(example) > max_seq_length:
            lost = int(example.supervised[max_seq_length:].sum())
            report.over.append((example.source, len(example), supervised, supervised if drop_long else lost))
            if drop_long:
                report.dropped += 1
                report.supervised_tokens_lost += int(example.supervised.sum())
                continue
            report.truncated += 1
            report.supervised_tokens_lost += lost
            example = TokenizedExample(example.ids[:max_seq_length], example.supervised[:max_seq_length], example.source)
        if not example.supervised.any():
            # Truncation removed the whole reply: training on it would teach nothing.
            report.dropped += 1
            continue
        examples.append(example)
    return examples, report
