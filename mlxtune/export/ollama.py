"""An Ollama model directory: the GGUF plus a Modelfile whose TEMPLATE, stops and parameters come from the model.

The Go TEMPLATE is derived from the model's Jinja chat template by rendering probe conversations and cutting the
text at the probe contents: what comes before a system message, between system and user, between user and the
assistant's reply, and between a reply and the next user turn. Every literal piece goes into the Go template as a
quoted string, so whitespace and newlines survive exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlxtune.errors import UsageError

PROBE = {"system": "\x01SYSTEM\x01", "user": "\x01USER\x01", "assistant": "\x01ASSISTANT\x01",
         "user2": "\x01USER2\x01"}


@dataclass
class TemplatePieces:
    before_system: str  # start of the prompt up to a system message
    system_to_user: str  # after the system message, before the first user message
    before_user: str  # start of the prompt up to a user message when there is no system message
    user_to_assistant: str  # after a user message, up to the assistant's reply (the generation prompt)
    assistant_to_user: str  # after an assistant reply, before the next user message


def _render(tokenizer, template: str, messages: list[dict], bos: str) -> str:
    from mlxtune.data.template import render_chat

    text = render_chat(tokenizer, messages, template, add_generation_prompt=True)
    return text[len(bos):] if bos and text.startswith(bos) else text  # llama.cpp adds BOS itself


def _between(text: str, start: str | None, end: str | None) -> str:
    begin = text.index(start) + len(start) if start else 0
    stop = text.index(end, begin) if end else len(text)
    return text[begin:stop]


def template_pieces(tokenizer, template: str) -> TemplatePieces:
    bos = getattr(tokenizer, "bos_token", None) or ""
    p = PROBE
    full = _render(tokenizer, template, [
        {"role": "system", "content": p["system"]}, {"role": "user", "content": p["user"]},
        {"role": "assistant", "content": p["assistant"]}, {"role": "user", "content": p["user2"]}], bos)
    try:
        no_system = _render(tokenizer, template, [{"role": "user", "content": p["user"]}], bos)
        pieces = TemplatePieces(
            before_system=_between(full, None, p["system"]),
            system_to_user=_between(full, p["system"], p["user"]),
            before_user=_between(no_system, None, p["user"]),
            user_to_assistant=_between(full, p["user"], p["assistant"]),
            assistant_to_user=_between(full, p["assistant"], p["user2"]),
        )
    except ValueError:
        raise UsageError("the chat template does not place messages in order; can't derive an Ollama TEMPLATE",
                         "write the Modelfile's TEMPLATE by hand") from None
    if _between(full, p["user2"], None) != pieces.user_to_assistant:
        raise UsageError("the chat template renders turns inconsistently; can't derive an Ollama TEMPLATE",
                         "write the Modelfile's TEMPLATE by hand")
    return pieces


def render_like_ollama(pieces: TemplatePieces, messages: list[dict]) -> str:
    """What the derived Go template produces for `messages` (same branches, in Python): used to check it."""
    out, previous = [], ""
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            out += [pieces.before_system, content]
        elif role == "user":
            joiner = {"system": pieces.system_to_user, "assistant": pieces.assistant_to_user}.get(
                previous, pieces.before_user)
            out += [joiner, content, pieces.user_to_assistant]
        elif role == "assistant":
            out.append(content)
        previous = role
    return "".join(out)


def _go(text: str) -> str:
    """A Go template action printing `text` verbatim (JSON string escapes are valid Go string escapes)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(pieces: TemplatePieces) -> str:
    return (
        '{{- $prev := "" }}'
        "{{- range .Messages }}"
        '{{- if eq .Role "system" }}' + _go(pieces.before_system) + "{{ .Content }}"
        '{{- else if eq .Role "user" }}'
        '{{- if eq $prev "system" }}' + _go(pieces.system_to_user)
        + '{{- else if eq $prev "assistant" }}' + _go(pieces.assistant_to_user)
        + "{{- else }}" + _go(pieces.before_user) + "{{- end }}"
        "{{ .Content }}" + _go(pieces.user_to_assistant)
        + '{{- else if eq .Role "assistant" }}{{ .Content }}'
        "{{- end }}"
        "{{- $prev = .Role }}"
        "{{- end }}"
    )


def stop_strings(tokenizer, pieces: TemplatePieces | None) -> list[str]:
    stops = []
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        stops.append(eos)
    if pieces:
        # The start of the next user turn is a stop too (base models trained on a template may run on).
        marker = pieces.assistant_to_user.strip()
        if marker and marker not in stops and (not eos or marker.replace(eos, "").strip()):
            stops.append(marker.replace(eos, "").strip() if eos else marker)
    return [s for s in dict.fromkeys(stops) if s]


def _parameters(model_dir: Path) -> dict:
    params = {}
    config_file = model_dir / "generation_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                             ("repetition_penalty", "repeat_penalty")):
            if config.get(ours) is not None:
                params[theirs] = config[ours]
    return params


def modelfile(gguf_name: str, tokenizer, template: str | None, model_dir: Path,
              context_length: int | None = None) -> str:
    pieces = template_pieces(tokenizer, template) if template else None
    lines = [f"FROM ./{gguf_name}", ""]
    if pieces:
        lines += ['TEMPLATE """' + go_template(pieces) + '"""', ""]
    for stop in stop_strings(tokenizer, pieces):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    for key, value in _parameters(model_dir).items():
        lines.append(f"PARAMETER {key} {value}")
    if context_length:
        lines.append(f"PARAMETER num_ctx {context_length}")
    return "\n".join(lines) + "\n"
