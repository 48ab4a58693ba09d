"""The inference core: prompt formats, sampling, streaming generation and a conversation's state — what chat, generate,
serve, eval and verify share (chat.py is the terminal REPL on top of it).

Prompts are written the way the model was trained: a run trained on plain text continues raw text; a run trained on
prompt/completion or chat data renders with the template it trained with (mlxtune's fallback included); a model
directory uses its own chat template, or mlxtune's fallback one when it has none (data/template.py's
`choose_template` decides, for training and inference alike).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mlxtune.data.template import FALLBACK_CHAT_TEMPLATE, choose_template, render_chat
from mlxtune.errors import UsageError
from mlxtune.model_config import context_length
from mlxtune.runs import LoadedModel, open_for_inference

# Base models trained on the fallback template tend to continue with the next "### User:" turn: stop there.
FALLBACK_STOPS = ("\n### User:", "### User:")
DEFAULT_CONTEXT = 4096  # when the config names no context window


@dataclass
class Sampling:
    """How tokens are drawn: mlx-lm's sampler (temperature, top-p, min-p) and logits processors (repetition)."""

    max_tokens: int = 200
    temperature: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None

    def check(self) -> "Sampling":
        numbers = {"temperature": self.temperature, "top_p": self.top_p, "min_p": self.min_p,
                   "repetition_penalty": self.repetition_penalty or 1.0}
        for name, value in numbers.items():
            if not math.isfinite(value):  # NaN passes every range check below
                raise UsageError(f"{name} must be a finite number, got {value}", "e.g. --temp 0.7")
        if self.max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, got {self.max_tokens}", "set --max-tokens")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}", "0 is greedy")
        if not 0 <= self.top_p <= 1 or not 0 <= self.min_p <= 1:
            raise UsageError("top_p and min_p must lie in [0, 1]", "e.g. --top-p 0.95 --min-p 0.05")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise UsageError(f"repetition penalty must be > 0, got {self.repetition_penalty}",
                             "1.0 is none; 1.1 is a mild penalty")
        return self

    def sampler(self):
        """mlx-lm's sampling steps, with the values passed as arrays. Its samplers are compiled, and a Python number
        is a compile-time constant there: every new temperature or top_p (a server's clients send many) would compile
        again — seconds each, and MLX's compile cache keeps every one (tests/test_chat.py checks the tokens match
        `make_sampler`'s)."""
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_top_p, categorical_sampling, make_sampler

        if self.temperature == 0:
            return make_sampler(temp=0.0)
        temperature = mx.array(self.temperature, dtype=mx.float32)
        top_p = mx.array(self.top_p, dtype=mx.float32) if 0 < self.top_p < 1 else None  # 1 (or 0): no nucleus cut
        # mlx-lm's apply_min_p takes math.log(min_p), which an array can't pass inside compile: the same mask here.
        log_min_p = mx.array(math.log(self.min_p), dtype=mx.float32) if self.min_p > 0 else None

        def sample(logprobs):
            if top_p is not None:
                logprobs = apply_top_p(logprobs, top_p)
            if log_min_p is not None:
                floor = logprobs.max(axis=-1, keepdims=True) + log_min_p
                logprobs = mx.where(logprobs < floor, -float("inf"), logprobs)
            return categorical_sampling(logprobs, temperature)

        return sample

    def logits_processors(self):
        from mlx_lm.sample_utils import make_logits_processors

        penalty = self.repetition_penalty if self.repetition_penalty not in (None, 1.0) else None
        return make_logits_processors(repetition_penalty=penalty)


@dataclass
class PromptFormat:
    """How a conversation becomes prompt text for one loaded model."""

    kind: str  # "text" (raw continuation) | "template"
    template: str | None
    name: str  # the template choice in words (TemplateChoice.name): the same in every command
    description: str  # said in the chat/generate header: the name, and why

    @property
    def stops(self) -> tuple[str, ...]:
        return FALLBACK_STOPS if self.template == FALLBACK_CHAT_TEMPLATE else ()


def prompt_format(loaded: LoadedModel, use_template: bool | None = None) -> PromptFormat:
    """The format the model was trained on, by the one template rule (data/template.py's `choose_template`): plain
    text for a run (or a model fused from one) trained on plain text, else the run's saved template, else the
    model's own, else mlxtune's fallback. `use_template` forces (True) or refuses (False) a chat template."""
    text = use_template is False or (use_template is None and loaded.data_kind == "text")
    choice = choose_template(loaded.tokenizer, "text" if text else "chat", loaded.trained_template,
                             own=loaded.own_template)
    if choice.template is None:
        why = "--no-template" if use_template is False else (
            "the run was trained on plain text" if loaded.run is not None else "fused from a run trained on plain text")
        return PromptFormat("text", None, choice.name, f"{choice.name} ({why}): your message is continued as raw text")
    run = loaded.run
    trained = {"completion": "prompt/completion, as a user turn", "chat": "chat"}.get(run.data_kind, "") if run else ""
    return PromptFormat("template", choice.template, choice.name,
                        f"{trained + ' with ' if trained else ''}{choice.name}")


def context_window(config: dict) -> int:
    return context_length(config) or DEFAULT_CONTEXT


def encode_messages(loaded: LoadedModel, messages: list[dict], fmt: PromptFormat) -> list[int]:
    """Token ids of the prompt for the next assistant reply."""
    tokenizer = loaded.tokenizer
    if fmt.kind == "text":
        # A raw-text transcript: each message continues the text; a new user message starts a new line.
        text = ""
        for message in messages:
            if message["role"] == "system":
                text += message["content"] + "\n"
            elif message["role"] == "user":
                text += ("\n" if text and not text.endswith("\n") else "") + message["content"]
            else:
                text += message["content"]
        return list(tokenizer.encode(text))
    rendered = render_chat(tokenizer, messages, fmt.template, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    # Templates write their own BOS; the tokenizer must not add a second one.
    return list(tokenizer.encode(rendered, add_special_tokens=not (bos and rendered.startswith(bos))))


@dataclass
class Reply:
    text: str = ""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    finish_reason: str = "stop"  # stop | length | interrupted (Ctrl-C in chat)


SPLIT_CHARACTER = "\ufffd"  # what decoding shows for the first bytes of a character whose last bytes are missing


def stream_reply(loaded: LoadedModel, prompt_ids: list[int], sampling: Sampling,
                 stops: Iterable[str] = ()) -> Iterator[tuple[str, Reply]]:
    """Yield (new text, reply so far) as tokens arrive; text that may be the start of a stop string is held back.

    A generator, so two models can be streamed side by side by alternating `next()`."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate

    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    stops = tuple(stops)
    hold = max((len(s) for s in stops), default=0)
    reply = Reply(prompt_tokens=len(prompt_ids), finish_reason="length")
    text, shown = "", 0
    for response in stream_generate(loaded.model, loaded.tokenizer, prompt_ids, max_tokens=sampling.max_tokens,
                                    sampler=sampling.sampler(), logits_processors=sampling.logits_processors()):
        text += response.text
        reply.generation_tokens = response.generation_tokens
        reply.prompt_tps, reply.generation_tps = response.prompt_tps, response.generation_tps
        if response.finish_reason:
            reply.finish_reason = response.finish_reason
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
            reply.finish_reason = "stop"
            break
        visible = len(text) - hold
        while visible > shown and text[visible - 1] == SPLIT_CHARACTER:  # the rest of its bytes may still come
            visible -= 1
        if visible > shown:
            reply.text = text[:visible]
            yield text[shown:visible], reply
            shown = visible
    # A multi-byte character cut off by max_tokens decodes to U+FFFD at the end: it was never said, so not shown.
    text = text.rstrip(SPLIT_CHARACTER)
    reply.text = text
    if len(text) > shown:
        yield text[shown:], reply
    else:
        yield "", reply


def run_reply(loaded: LoadedModel, prompt_ids: list[int], sampling: Sampling, stops: Iterable[str] = (),
              on_text: Callable[[str], None] | None = None) -> Reply:
    reply = Reply(prompt_tokens=len(prompt_ids))
    for piece, reply in stream_reply(loaded, prompt_ids, sampling, stops):
        if on_text and piece:
            on_text(piece)
    return reply


def generate_text(
    model_or_run: str | Path | LoadedModel,
    prompt: str,
    *,
    max_tokens: int = 100,
    temperature: float = 0.0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    use_template: bool | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """One completion, in the format the model or run was trained on (see `prompt_format`): a run trained on
    plain text continues the prompt as raw text; otherwise it is a user turn in the chosen template."""
    sampling = Sampling(max_tokens, temperature, top_p, min_p, repetition_penalty, seed).check()
    loaded = (model_or_run if isinstance(model_or_run, LoadedModel)
              else open_for_inference(model_or_run, float32_on_cpu=True))
    fmt = prompt_format(loaded, use_template)
    ids = encode_messages(loaded, [{"role": "user", "content": prompt}], fmt)
    return run_reply(loaded, ids, sampling, fmt.stops, on_text).text


class Conversation:
    """One model's side of a chat: system prompt, history, and trimming to the context window."""

    def __init__(self, loaded: LoadedModel, system: str | None, sampling: Sampling):
        self.loaded = loaded
        self.format = prompt_format(loaded)
        self.system = system
        self.sampling = sampling
        self.turns: list[dict] = []
        self.context = context_window(loaded.config)

    @property
    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def prompt(self, user: str) -> tuple[list[int], int]:
        """Token ids for the reply to `user`, dropping the oldest turns until prompt + reply fit the context.
        Returns the ids and how many earlier turns were dropped."""
        self.turns.append({"role": "user", "content": user})
        dropped = 0
        budget = max(1, self.context - self.sampling.max_tokens)
        while True:
            ids = encode_messages(self.loaded, self.messages, self.format)
            if len(ids) <= budget or len(self.turns) <= 1:
                break
            self.turns.pop(0)  # oldest first; keep user/assistant pairs together
            if self.turns and self.turns[0]["role"] == "assistant":
                self.turns.pop(0)
            dropped += 1
        if len(ids) > budget:
            ids = ids[-budget:]  # one message longer than the window: keep its end
        return ids, dropped

    def answer(self, reply: Reply) -> None:
        self.turns.append({"role": "assistant", "content": reply.text.strip()})

    def reset(self) -> None:
        self.turns = []
