"""Generation and interactive chat with a model directory or a run (base model + the run's adapter).

Prompts are written the way the model was trained: a run trained on plain text continues raw text; a run trained on
prompt/completion or chat data renders with the run's template (its own fallback template included); a model
directory uses its own chat template, or mlxtune's fallback one when it has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mlxtune.data.template import FALLBACK_CHAT_TEMPLATE, render_chat
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
    description: str  # said in the chat/generate header

    @property
    def stops(self) -> tuple[str, ...]:
        return FALLBACK_STOPS if self.template == FALLBACK_CHAT_TEMPLATE else ()


def prompt_format(loaded: LoadedModel, use_template: bool | None = None) -> PromptFormat:
    """The format the model was trained on. `use_template` forces (True) or refuses (False) a chat template."""
    run = loaded.run
    if use_template is False or (use_template is None and loaded.data_kind == "text"):
        why = "--no-template" if use_template is False else (
            "the run was trained on plain text" if run is not None else "fused from a run trained on plain text")
        return PromptFormat("text", None, f"plain text ({why}): your message is continued as raw text")
    if loaded.template is None and use_template is None and run is None:  # (a text-trained fused model: above)
        return PromptFormat("template", FALLBACK_CHAT_TEMPLATE,
                            "this model has no chat template: using mlxtune's fallback template "
                            "(### User: / ### Assistant:)")
    template = loaded.template or FALLBACK_CHAT_TEMPLATE
    which = "mlxtune's fallback template (### User: / ### Assistant:)" if template == FALLBACK_CHAT_TEMPLATE else (
        "the run's chat template" if loaded.template_origin == "run" else "the model's chat template")
    trained = {"completion": "prompt/completion, as a user turn", "chat": "chat"}.get(run.data_kind, "") if run else ""
    return PromptFormat("template", template, f"{trained + ' with ' if trained else ''}{which}")


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
    plain text, or a model without a chat template, continues the prompt as raw text."""
    sampling = Sampling(max_tokens, temperature, top_p, min_p, repetition_penalty, seed).check()
    loaded = model_or_run if isinstance(model_or_run, LoadedModel) else open_for_inference(model_or_run)
    if use_template is None and loaded.run is None and loaded.template is None:
        use_template = False  # a plain model directory without a template: raw continuation, as before
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


def _speed(reply: Reply) -> str:
    return f"{reply.generation_tokens} tokens · {reply.generation_tps:.1f} tok/s (prompt {reply.prompt_tps:.0f} tok/s)"


@dataclass
class ChatCommands:
    """What the slash commands act on; shared by the single and the side-by-side chat."""

    conversations: list[Conversation]
    notice: Callable[[str], None]
    saved: list[str] = field(default_factory=list)

    def handle(self, line: str) -> bool:
        """True when `line` was a command (handled here)."""
        if not line.startswith("/"):
            return False
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if command == "/reset":
            for conversation in self.conversations:
                conversation.reset()
            self.notice("history cleared")
        elif command == "/system":
            if argument:
                for conversation in self.conversations:
                    conversation.system = argument
                self.notice("system prompt set")
            else:
                self.notice(f"system prompt: {self.conversations[0].system or '(none)'}")
        elif command == "/save":
            if not argument:
                self.notice("usage: /save FILE")
            else:
                self.notice(f"saved to {save_transcript(argument, self.conversations)}")
        elif command == "/help":
            self.notice("/system TEXT sets the system prompt, /save FILE writes the conversation, /reset clears it, "
                        "/exit quits")
        else:
            self.notice(f"unknown command {command}: /help lists them")
        return True


def save_transcript(path: str | Path, conversations: list[Conversation]) -> Path:
    """One chat record ({"messages": [...]}, mlxtune's own chat data format) per conversation, as JSON lines."""
    import json

    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            for conversation in conversations:
                handle.write(json.dumps({"model": conversation.loaded.source, "messages": conversation.messages},
                                        ensure_ascii=False) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}", "give a writable file path") from None
    return path


def chat_session(
    model_or_run: str | Path | LoadedModel,
    read_line: Callable[[], str | None],
    write: Callable[[str], None],
    *,
    system: str | None = None,
    sampling: Sampling | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> list[dict]:
    """A multi-turn conversation: `read_line` returns the next user message (None at end of input), replies stream
    through `write`, speed and commands' results go to `on_notice`. Returns the history."""
    sampling = (sampling or Sampling(temperature=0.7, top_p=0.95)).check()
    loaded = model_or_run if isinstance(model_or_run, LoadedModel) else open_for_inference(model_or_run)
    notice = on_notice or (lambda message: None)
    conversation = Conversation(loaded, system, sampling)
    notice(f"format: {conversation.format.description}")
    commands = ChatCommands([conversation], notice)
    while True:
        try:
            line = read_line()
        except KeyboardInterrupt:  # Ctrl-C at the prompt (the second one, after stopping a reply): quit
            write("\n")
            return conversation.messages
        if line is None or line.strip() in ("/exit", "/quit"):
            return conversation.messages
        line = line.strip()
        if not line or commands.handle(line):
            continue
        ids, dropped = conversation.prompt(line)
        if dropped:
            notice(f"history trimmed: dropped the {dropped} oldest turn(s) to fit the {conversation.context}-token "
                   "context")
        reply, stream = Reply(prompt_tokens=len(ids)), stream_reply(loaded, ids, sampling, conversation.format.stops)
        try:
            for piece, reply in stream:
                if piece:
                    write(piece)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the session: what was said so far is kept
            stream.close()
            reply.finish_reason = "interrupted"
            write("\n")
            notice("reply stopped (Ctrl-C at the prompt quits)")
        else:
            write("\n")
        conversation.answer(reply)
        notice(_speed(reply))


def compare_session(
    run_dir: str | Path,
    read_line: Callable[[], str | None],
    console,
    *,
    checkpoint: str = "last",
    system: str | None = None,
    sampling: Sampling | None = None,
) -> list[list[dict]]:
    """Base model and tuned model (base + the run's adapter) answer each message side by side, both streaming at
    once in two rich columns. Each keeps its own history. Returns both histories."""
    from rich.live import Live
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from mlxtune.runs import is_run_dir

    if not is_run_dir(run_dir):
        raise UsageError(f"--compare needs a run directory, got {run_dir}",
                         "give the directory `mlxtune lora` wrote; it holds the base model and the adapter")
    sampling = (sampling or Sampling(temperature=0.7, top_p=0.95)).check()
    base = open_for_inference(run_dir, adapter=False)
    tuned = open_for_inference(run_dir, checkpoint)
    sides = [Conversation(base, system, sampling), Conversation(tuned, system, sampling)]
    titles = ["base", f"tuned ({checkpoint})"]
    console.print("[dim]" + escape(f"comparing {base.source} (base) with {tuned.source} (tuned) · "
                                   f"format: {sides[1].format.description}") + "[/]")
    commands = ChatCommands(sides, lambda message: console.print(f"[dim]{escape(message)}[/]"))

    def view(texts: list[str], footers: list[str]) -> Table:
        grid = Table.grid(expand=True, padding=(0, 1))
        grid.add_column(ratio=1)
        grid.add_column(ratio=1)
        grid.add_row(*(Panel(Text(texts[i] or "…"), title=titles[i], subtitle=footers[i], title_align="left")
                       for i in range(2)))
        return grid

    while True:
        try:
            line = read_line()
        except KeyboardInterrupt:  # Ctrl-C at the prompt quits
            return [side.messages for side in sides]
        if line is None or line.strip() in ("/exit", "/quit"):
            return [side.messages for side in sides]
        line = line.strip()
        if not line or commands.handle(line):
            continue
        streams, texts, footers, replies = [], ["", ""], ["", ""], [Reply(), Reply()]
        for side in sides:
            ids, dropped = side.prompt(line)
            if dropped:
                commands.notice(f"history trimmed: dropped the {dropped} oldest turn(s) to fit the context")
            streams.append(stream_reply(side.loaded, ids, sampling, side.format.stops))
        with Live(view(texts, footers), console=console, refresh_per_second=12, transient=False) as live:
            active = [0, 1]
            try:
                while active:
                    for i in list(active):
                        try:
                            piece, replies[i] = next(streams[i])
                            texts[i] += piece
                        except StopIteration:
                            active.remove(i)
                            footers[i] = _speed(replies[i])
                    live.update(view(texts, footers))
            except KeyboardInterrupt:  # Ctrl-C stops both replies, not the session
                for i in active:
                    streams[i].close()
                    replies[i].finish_reason, footers[i] = "interrupted", "stopped (Ctrl-C)"
                live.update(view(texts, footers))
        for side, reply in zip(sides, replies):
            side.answer(reply)
