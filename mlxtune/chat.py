"""Generation and interactive chat with a model directory or a run (base model + the run's adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from mlxtune.data.template import FALLBACK_CHAT_TEMPLATE, render_chat
from mlxtune.errors import UsageError
from mlxtune.runs import LoadedModel, open_for_inference

# Base models trained on the fallback template tend to continue with the next "### User:" turn: stop there.
FALLBACK_STOPS = ("\n### User:", "### User:")


def _sampler(temperature: float, top_p: float):
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=temperature, top_p=top_p)


def _stream(loaded: LoadedModel, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float,
            on_text: Callable[[str], None] | None, stops: Iterable[str] = ()) -> str:
    from mlx_lm.generate import stream_generate

    text = ""
    printed = 0
    stops = tuple(stops)
    hold = max((len(s) for s in stops), default=0)  # don't print what may turn out to be a stop string
    for response in stream_generate(loaded.model, loaded.tokenizer, prompt_ids, max_tokens=max_tokens,
                                    sampler=_sampler(temperature, top_p)):
        text += response.text
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
            break
        if on_text and len(text) - hold > printed:
            on_text(text[printed : len(text) - hold])
            printed = len(text) - hold
    if on_text and len(text) > printed:
        on_text(text[printed:])
    return text


def _encode_rendered(tokenizer, rendered: str) -> list[int]:
    bos = tokenizer.bos_token or ""
    return list(tokenizer.encode(rendered, add_special_tokens=not (bos and rendered.startswith(bos))))


def generate_text(
    model_or_run: str | Path | LoadedModel,
    prompt: str,
    *,
    max_tokens: int = 100,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_template: bool | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """One completion. The prompt goes through the chat template when the model/run has one (`use_template`
    None), as a user turn; otherwise it is continued as raw text."""
    if max_tokens < 1:
        raise UsageError(f"max_tokens must be at least 1, got {max_tokens}", "set --max-tokens")
    loaded = model_or_run if isinstance(model_or_run, LoadedModel) else open_for_inference(model_or_run)
    templated = loaded.template is not None if use_template is None else use_template
    if templated:
        template = loaded.template or FALLBACK_CHAT_TEMPLATE
        rendered = render_chat(loaded.tokenizer, [{"role": "user", "content": prompt}], template,
                               add_generation_prompt=True)
        ids = _encode_rendered(loaded.tokenizer, rendered)
    else:
        ids = list(loaded.tokenizer.encode(prompt))
    stops = FALLBACK_STOPS if templated and (loaded.template or FALLBACK_CHAT_TEMPLATE) == FALLBACK_CHAT_TEMPLATE else ()
    return _stream(loaded, ids, max_tokens, temperature, top_p, on_text, stops)


def chat_session(
    model_or_run: str | Path | LoadedModel,
    read_line: Callable[[], str | None],
    write: Callable[[str], None],
    *,
    system: str | None = None,
    max_tokens: int = 200,
    temperature: float = 0.7,
    top_p: float = 0.95,
    on_notice: Callable[[str], None] | None = None,
) -> list[dict]:
    """A multi-turn conversation: `read_line` returns the next user message (None at end of input),
    replies stream through `write`. Commands: /reset clears the history, /exit ends. Returns the history."""
    loaded = model_or_run if isinstance(model_or_run, LoadedModel) else open_for_inference(model_or_run)
    template = loaded.template
    if template is None:
        template = FALLBACK_CHAT_TEMPLATE
        if on_notice:
            on_notice("this model has no chat template: using mlxtune's fallback template (### User: / ### Assistant:)")
    stops = FALLBACK_STOPS if template == FALLBACK_CHAT_TEMPLATE else ()
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    while True:
        line = read_line()
        if line is None or line.strip() in ("/exit", "/quit"):
            return messages
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages = list(base)
            if on_notice:
                on_notice("history cleared")
            continue
        messages.append({"role": "user", "content": line})
        rendered = render_chat(loaded.tokenizer, messages, template, add_generation_prompt=True)
        reply = _stream(loaded, _encode_rendered(loaded.tokenizer, rendered), max_tokens, temperature, top_p,
                        write, stops)
        write("\n")
        messages.append({"role": "assistant", "content": reply.strip()})
