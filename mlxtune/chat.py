"""`mlxtune chat`: the terminal conversation (slash commands, transcripts, Ctrl-C) and `--compare`'s two columns, on
the inference core (mlxtune/inference.py: prompt formats, sampling, streaming, a conversation's state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlxtune.errors import UsageError
from mlxtune.inference import Conversation, Reply, Sampling, stream_reply
from mlxtune.runs import LoadedModel, open_for_inference


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
    loaded = (model_or_run if isinstance(model_or_run, LoadedModel)
              else open_for_inference(model_or_run, float32_on_cpu=True))
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
    base = open_for_inference(run_dir, adapter=False, float32_on_cpu=True)
    tuned = open_for_inference(run_dir, checkpoint, float32_on_cpu=True)
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
