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


def _added_bos(tokenizer) -> str:
    """The BOS text cut from a rendering: only when the tokenizer adds one itself (as llama.cpp and Ollama then do);
    where it doesn't, the BOS text is the template's own first marker (SmolLM2's BOS is <|im_start|>) and stays."""
    bos = getattr(tokenizer, "bos_token", None) or ""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return "" if bos and (bos_id is None or list(tokenizer.encode("a"))[:1] != [bos_id]) else bos


def template_pieces(tokenizer, template: str) -> TemplatePieces:
    bos = _added_bos(tokenizer)
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


def kept_settings(base_dir: Path | None) -> dict | None:
    """The TEMPLATE, SYSTEM and parameters Ollama gave the model, kept at `mlxtune pull ollama:NAME`; None when the
    model did not come from Ollama (or Ollama gave it no TEMPLATE)."""
    from mlxtune.importers import OLLAMA_SETTINGS

    kept_file = base_dir / OLLAMA_SETTINGS if base_dir else None
    if kept_file is None or not kept_file.is_file():
        return None
    kept = json.loads(kept_file.read_text(encoding="utf-8"))
    return kept if kept.get("template") else None


def kept_from_ollama(base_dir: Path | None, template: str | None) -> dict | None:
    """The kept settings (kept_settings) when the model is still rendered with the chat template it was imported
    with (a run with its own template gets a derived TEMPLATE)."""
    kept = kept_settings(base_dir)
    config_file = base_dir / "tokenizer_config.json" if kept else None
    imported = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template") \
        if config_file and config_file.is_file() else None
    return kept if kept and imported == template else None


def kept_template_difference(tokenizer, template: str, kept: dict) -> str | None:
    """None when the kept TEMPLATE (with its SYSTEM, as Ollama applies it) renders verify's fixed chat probes byte
    for byte as training's `template` does; else what differs, in words. A legacy TEMPLATE (.System/.Prompt) drops
    earlier turns and a template's default system prompt, so a model tuned on the Jinja rendering would be prompted
    otherwise in Ollama than it was trained."""
    from mlxtune.verify.gotemplate import ollama_data, render
    from mlxtune.verify.probes import FIXED_PROBES

    bos = _added_bos(tokenizer)
    for name, messages in FIXED_PROBES.items():
        try:
            trained = _render(tokenizer, template, messages, bos)
        except UsageError:  # training's template refuses this conversation: nothing to compare
            continue
        try:
            ollama = render(kept["template"], ollama_data(messages, system=kept.get("system")))
        except UsageError as exc:
            return f"it can't be rendered here ({exc.message})"
        if ollama != trained:
            return f"it renders the {name!r} probe otherwise than the chat template the model was trained with"
    return None


def _parameter_lines(parameters: dict) -> list[str]:
    lines = []
    for key, value in parameters.items():
        for one in value if isinstance(value, list) else [value]:  # Ollama keeps `stop` as a list
            lines.append(f"PARAMETER {key} {json.dumps(one, ensure_ascii=False) if key == 'stop' else one}")
    return lines


def _stop_list(value) -> list[str]:
    """A Modelfile `stop` parameter as a list: Ollama's params hold one string or a list of them."""
    return value if isinstance(value, list) else [value] if value else []


def _with_end_of_turn(stops: list[str], tokenizer, template: str | None) -> list[str]:
    """`stops` plus the text that ends an assistant turn in `template` (what verify checks Ollama stops on)."""
    from mlxtune.verify.compare import end_of_turn

    return [stop for stop in dict.fromkeys([*stops, end_of_turn(tokenizer, template)["text"]]) if stop]


def modelfile(gguf_name: str, tokenizer, template: str | None, model_dir: Path,
              context_length: int | None = None, base_dir: Path | None = None, keep_template: bool = False,
              notes: list[str] | None = None) -> str:
    """The Modelfile beside the exported GGUF. A model that came from Ollama (`base_dir` holds what the import kept)
    gets Ollama's own TEMPLATE, SYSTEM and parameters back when that TEMPLATE renders prompts as training did, or
    with `keep_template`; otherwise (and for every other model) a TEMPLATE derived from the chat template, keeping
    the import's parameters. The template's end of turn is always a stop. Why a kept TEMPLATE was replaced goes to
    `notes`."""
    kept = kept_settings(base_dir) if keep_template else kept_from_ollama(base_dir, template)
    replaced = None
    if kept and not keep_template and template:
        why = kept_template_difference(tokenizer, template, kept)
        if why:
            replaced, kept = kept, None
            if notes is not None:
                notes.append(f"Ollama's TEMPLATE from the import was not kept: {why}; wrote one derived from the "
                             "chat template instead (--keep-template writes the original)")
    lines = [f"FROM ./{gguf_name}", ""]
    if kept:
        lines += ['TEMPLATE """' + kept["template"] + '"""', ""]
        if kept.get("system"):
            lines += ['SYSTEM """' + kept["system"] + '"""', ""]
        parameters = dict(kept.get("parameters") or {})
        parameters["stop"] = _with_end_of_turn(_stop_list(parameters.get("stop")), tokenizer, template)
    else:
        pieces = template_pieces(tokenizer, template) if template else None
        if pieces:
            lines += ['TEMPLATE """' + go_template(pieces) + '"""', ""]
        parameters = {**_parameters(model_dir), **((replaced or {}).get("parameters") or {})}
        stops = [*_stop_list(parameters.get("stop")), *stop_strings(tokenizer, pieces)]
        parameters = {"stop": _with_end_of_turn(stops, tokenizer, template),
                      **{k: v for k, v in parameters.items() if k != "stop"}}
    if context_length:
        parameters.setdefault("num_ctx", context_length)
    return "\n".join(lines + _parameter_lines(parameters)) + "\n"
