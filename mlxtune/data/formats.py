"""Read dataset files into records of one of three shapes: chat messages, prompt/completion, or plain text.

Every record remembers where it came from (`file:line`) so every error can point at it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxtune.errors import UsageError

SPLIT_NAMES = ("train", "valid", "test")
SUFFIXES = (".jsonl", ".json")


@dataclass
class Record:
    kind: str  # "chat" | "completion" | "text"
    source: str  # "file:line"
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None


def find_splits(path: str | Path) -> dict[str, Path]:
    """Map split name → file for a data directory, or {"train": file} for a single file."""
    path = Path(path)
    if path.is_file():
        return {"train": path}
    if not path.exists():
        raise UsageError(f"data not found: {path}", "give a directory with train.jsonl/valid.jsonl, or one .jsonl file")
    if not path.is_dir():
        raise UsageError(f"data path is not a file or directory: {path}", "give a .jsonl file or a directory")
    splits = {}
    for split in SPLIT_NAMES:
        for suffix in SUFFIXES:
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                splits[split] = candidate
                break
    if "train" not in splits:
        present = sorted(p.name for p in path.iterdir())[:8]
        raise UsageError(
            f"no train.jsonl or train.json in {path}",
            f"the directory holds {present or 'nothing'}; name the training file train.jsonl",
        )
    return splits


def _raw_rows(path: Path) -> list[tuple[int, Any]]:
    """(line, decoded object) pairs; line numbers are 1-based, for a JSON array they are element indexes."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerate a BOM
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: invalid UTF-8 (byte {exc.start})", "re-save the file as UTF-8") from None
    if not text.strip():
        raise UsageError(f"{path}: the file is empty", "add at least one record, one JSON object per line")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})", "fix the JSON array") from None
        return [(index + 1, row) for index, row in enumerate(rows)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})",
                "each line must be one complete JSON object",
            ) from None
    return rows


def _text(value: Any, where: str, key: str) -> str:
    """Content as a string; OpenAI-style lists of {"type": "text", "text": ...} parts are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise UsageError(f"{where}: {key!r} must be a string, got {type(value).__name__}", "use plain text content")


ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                "tool": "tool", "function": "tool", "model": "assistant"}


def _messages(items: Any, where: str, role_key: str, content_key: str) -> list[dict[str, Any]]:
    if not isinstance(items, list) or not items:
        raise UsageError(f"{where}: the conversation is empty", "give at least one user and one assistant message")
    messages = []
    for position, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise UsageError(f"{where}: message {position} is not an object", "each message is {role, content}")
        role = ROLE_ALIASES.get(str(item.get(role_key, "")).lower())
        if role is None:
            raise UsageError(
                f"{where}: message {position} has unknown role {item.get(role_key)!r}",
                "use system, user, assistant or tool",
            )
        message: dict[str, Any] = {"role": role}
        if item.get("tool_calls"):
            message["tool_calls"] = item["tool_calls"]
        content = item.get(content_key)
        if content is None and "tool_calls" not in message:
            raise UsageError(f"{where}: message {position} has no {content_key!r}", f"add {content_key!r} text")
        message["content"] = "" if content is None else _text(content, where, content_key)
        messages.append(message)
    if not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in messages):
        raise UsageError(f"{where}: no assistant message with content", "there is nothing to learn from this record")
    return messages


def parse_record(row: Any, where: str) -> Record:
    """Detect the shape of one decoded JSON row and normalise it."""
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(row).__name__}", "one object per line")
    if "messages" in row:
        return Record("chat", where, messages=_messages(row["messages"], where, "role", "content"))
    if "conversations" in row:  # ShareGPT
        return Record("chat", where, messages=_messages(row["conversations"], where, "from", "value"))
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if key not in row:
                raise UsageError(f"{where}: missing {key!r}", "prompt/completion records need both keys")
        completion = _text(row["completion"], where, "completion")
        if not completion.strip():
            raise UsageError(f"{where}: empty completion", "there is nothing to learn from this record")
        return Record("completion", where, prompt=_text(row["prompt"], where, "prompt"), completion=completion)
    if "instruction" in row and "output" in row:  # Alpaca
        prompt = _text(row["instruction"], where, "instruction")
        extra_input = row.get("input") or ""
        if extra_input:
            prompt = f"{prompt}\n\n{_text(extra_input, where, 'input')}"
        return Record("completion", where, prompt=prompt, completion=_text(row["output"], where, "output"))
    if "text" in row:
        text = _text(row["text"], where, "text")
        if not text.strip():
            raise UsageError(f"{where}: empty text", "remove the line or give it text")
        return Record("text", where, text=text)
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise UsageError(
        f"{where}: unrecognised record (keys: {keys})",
        "use one of: messages, conversations, prompt+completion, instruction+output, text",
    )


def read_records(path: str | Path) -> list[Record]:
    """All records of one file, all of one shape (mixed shapes are an error naming the lines)."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UsageError(f"{path}: unsupported file type {path.suffix!r}", "use .jsonl or .json")
    records = [parse_record(row, f"{path}:{line}") for line, row in _raw_rows(path)]
    if not records:
        raise UsageError(f"{path}: the file is empty", "add at least one record, one JSON object per line")
    kinds = {r.kind for r in records}
    if len(kinds) > 1:
        first = records[0].kind
        odd = [r.source.rsplit(":", 1)[1] for r in records if r.kind != first][:5]
        raise UsageError(
            f"{path}: mixed record formats ({', '.join(sorted(kinds))}); first is {first}, lines {', '.join(odd)} differ",
            "keep one format per file",
        )
    return records
