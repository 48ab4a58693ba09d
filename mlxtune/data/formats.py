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
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Record:
    kind: str  # "chat" | "completion" | "text"
    source: str  # "file:line"
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI-style tool definitions, passed to the chat template


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


def _decode_lines(path: Path) -> list[tuple[int, str | UsageError]]:
    """(line number, text) per non-blank line; a line that is not UTF-8 becomes an error for that line only."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # tolerate a BOM
        raw = raw[3:]
    lines = []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            text = chunk.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            lines.append((number, UsageError(f"{path}:{number}: invalid UTF-8 (byte {exc.start} of the line)",
                                             "re-save the file as UTF-8")))
            continue
        if text.strip():
            lines.append((number, text))
    return lines


def _raw_rows(path: Path) -> list[tuple[int, Any]]:
    """(line, decoded row or UsageError) pairs; lines are 1-based (for a JSON array: element numbers)."""
    if path.suffix == ".csv":
        return _csv_rows(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    lines = _decode_lines(path)
    if not lines:
        raise UsageError(f"{path}: the file is empty", "add at least one record, one JSON object per line")
    first = lines[0][1]
    if path.suffix == ".json" and isinstance(first, str) and first.lstrip().startswith("["):
        bad = [error for _, error in lines if isinstance(error, UsageError)]
        if bad:
            raise bad[0]
        try:
            rows = json.loads(path.read_bytes().decode("utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})", "fix the JSON array") from None
        if not isinstance(rows, list):
            raise UsageError(f"{path}: expected a JSON array of records", "write [ {...}, {...} ] or use .jsonl")
        return [(index + 1, row) for index, row in enumerate(rows)]
    rows = []
    for number, text in lines:
        if isinstance(text, UsageError):
            rows.append((number, text))
            continue
        try:
            rows.append((number, json.loads(text)))
        except json.JSONDecodeError as exc:
            rows.append((number, UsageError(
                f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})",
                "each line must be one complete JSON object",
            )))
    return rows


JSON_COLUMNS = ("messages", "conversations", "tools")


def _from_table_row(row: dict) -> dict:
    """CSV/Parquet cells holding conversations are JSON strings; empty cells are absent."""
    clean = {}
    for key, value in row.items():
        if value is None or value == "":
            continue
        if key in JSON_COLUMNS and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # reported by the record parser as a wrong type
        clean[key] = value
    return clean


def _csv_rows(path: Path) -> list[tuple[int, Any]]:
    import csv

    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [(reader.line_num, _from_table_row(row)) for row in reader]
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: invalid UTF-8 ({exc.reason})", "re-save the file as UTF-8") from None
    except csv.Error as exc:
        raise UsageError(f"{path}: invalid CSV ({exc})", "check quoting and the header line") from None
    return rows


def _parquet_rows(path: Path) -> list[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{path}: reading Parquet needs pyarrow", "pip install pyarrow, or convert to .jsonl") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for a bad file
        raise UsageError(f"{path}: unreadable Parquet ({exc})", "check the file, or convert to .jsonl") from None
    return [(index + 1, _from_table_row(row)) for index, row in enumerate(table.to_pylist())]


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
        if not message["content"].strip() and "tool_calls" not in message:
            raise UsageError(f"{where}: message {position} ({role}) has empty content", "remove the message or fill it")
        messages.append(message)
    if not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in messages):
        raise UsageError(f"{where}: no assistant message with content", "there is nothing to learn from this record")
    return messages


def _completion(row: dict, where: str, prompt_key: str, completion_key: str) -> Record:
    for key in (prompt_key, completion_key):
        if key not in row:
            raise UsageError(f"{where}: missing {key!r}", f"{prompt_key}/{completion_key} records need both keys")
    completion = _text(row[completion_key], where, completion_key)
    if not completion.strip():
        raise UsageError(f"{where}: empty {completion_key}", "there is nothing to learn from this record")
    return Record("completion", where, prompt=_text(row[prompt_key], where, prompt_key), completion=completion)


def _tools(row: dict, where: str) -> list | None:
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise UsageError(f"{where}: 'tools' must be a list of tool definitions", "use the OpenAI tools format")
    return tools or None


def parse_record(row: Any, where: str, keys: tuple[str, str] | None = None) -> Record:
    """Detect the shape of one decoded row and normalise it. `keys`: custom (prompt, completion) field names."""
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(row).__name__}", "one object per line")
    if keys is not None:
        return _completion(row, where, *keys)
    if "messages" in row:
        return Record("chat", where, messages=_messages(row["messages"], where, "role", "content"),
                      tools=_tools(row, where))
    if "conversations" in row:  # ShareGPT
        return Record("chat", where, messages=_messages(row["conversations"], where, "from", "value"),
                      tools=_tools(row, where))
    if "prompt" in row or "completion" in row:
        return _completion(row, where, "prompt", "completion")
    if "question" in row and "answer" in row:  # GSM8K and friends
        return _completion(row, where, "question", "answer")
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


def read_records(path: str | Path, problems: list[UsageError] | None = None,
                 keys: tuple[str, str] | None = None) -> list[Record]:
    """All records of one file, all of one shape (mixed shapes are an error naming the lines).

    With `problems`, bad records are collected there and skipped instead of stopping at the first. `keys` names
    the prompt and completion fields when they are not the usual ones (e.g. ("question", "answer")).
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UsageError(f"{path}: unsupported file type {path.suffix!r}", f"use one of {', '.join(SUFFIXES)}")
    rows = _raw_rows(path)
    if not rows:
        raise UsageError(f"{path}: the file is empty", "add at least one record, one JSON object per line")
    records = []
    for line, row in rows:
        try:
            if isinstance(row, UsageError):
                raise row
            records.append(parse_record(row, f"{path}:{line}", keys))
        except UsageError as error:
            if problems is None:
                raise
            problems.append(error)
    kinds = {r.kind for r in records}
    if len(kinds) > 1:
        first = records[0].kind
        odd = [r.source.rsplit(":", 1)[1] for r in records if r.kind != first][:5]
        error = UsageError(
            f"{path}: mixed record formats ({', '.join(sorted(kinds))}); first is {first}, lines {', '.join(odd)} differ",
            "keep one format per file",
        )
        if problems is None:
            raise error
        problems.append(error)
    return records
