"""Read dataset files into records of one of three shapes: chat messages, prompt/completion, or plain text.

The conventions other tools document are mapped here, record by record, to those three shapes (the README's
"Data formats" table says what each one trains on): OpenAI chat fine-tuning records (`weight`, `tool_calls`,
`tools`, content parts), TRL/Hugging Face conversational and prompt-completion datasets, LLaMA-Factory's alpaca and
sharegpt formats (`system`, `tools` as a JSON string, `function_call`/`observation` turns, and the column/tag mapping
of a `dataset_info.json` beside the data) and Axolotl's instruction, chat_template and input_output types.

Every record remembers where it came from (`file:line`, the real line also for JSON arrays) so every error and
warning can point at it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxtune.errors import UsageError

SPLIT_NAMES = ("train", "valid", "test")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TOO_DEEP_HINT = "records are a few levels deep (messages → parts); flatten this one"
DATASET_INFO = "dataset_info.json"  # LLaMA-Factory's registry of datasets, with column and tag mappings


@dataclass
class Record:
    kind: str  # "chat" | "completion" | "text"
    source: str  # "file:line" (JSON arrays: "file:line (record N)")
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI-style tool definitions, passed to the chat template
    system: str | None = None  # a completion record's system prompt (Alpaca's `system`)
    trained: list[bool] | None = None  # per message: does the loss cover it (None: every assistant turn)
    segments: list[tuple[str, bool]] | None = None  # template-free text: (piece, supervised) (Axolotl input_output)
    convention: str = ""  # the convention it was read as, e.g. "sharegpt (conversations)"

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation the chat template renders (completion records become system? + user + assistant)."""
        if self.messages is not None:
            return self.messages
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": self.prompt or ""},
                         {"role": "assistant", "content": self.completion or ""}]

    def supervised_turns(self) -> list[bool]:
        """Per message of `chat_messages()`: is it a target of the loss."""
        messages = self.chat_messages()
        if self.trained is not None and self.messages is not None:
            return list(self.trained)
        return [m["role"] == "assistant" for m in messages]


class RecordError(UsageError):
    """A problem with one record: `where` is its file:line, `detail` the message without the location."""

    def __init__(self, where: str, detail: str, hint: str | None = None):
        super().__init__(f"{where}: {detail}", hint)
        self.where = where
        self.detail = detail


# ---------------------------------------------------------------------------------------------------------------
# Files


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
        registered = [name for name in _dataset_info_files(path) if (path / name).is_file()]
        if registered:
            raise UsageError(
                f"no train.jsonl or train.json in {path} (its {DATASET_INFO} lists {', '.join(registered[:4])})",
                f"give one of those files: --data {path / registered[0]}",
            )
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
            lines.append((number, RecordError(f"{path}:{number}", f"invalid UTF-8 (byte {exc.start} of the line)",
                                              "re-save the file as UTF-8")))
            continue
        if text.strip():
            lines.append((number, text))
    return lines


def json_error(message: str, column: int) -> str:
    """Python's JSON message with its column ("Invalid control character at" already ends in "at")."""
    return f"{message.removesuffix(' at')} at column {column}"


def _json_array_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    """Elements of a JSON array with the line each one starts on (a record index alone points nowhere useful)."""
    decoder = json.JSONDecoder()
    rows: list[tuple[str, Any]] = []
    position = text.index("[") + 1
    line = text.count("\n", 0, position) + 1
    whitespace = re.compile(r"\s*")

    def skip(at: int) -> int:
        nonlocal line
        end = whitespace.match(text, at).end()
        line += text.count("\n", at, end)
        return end

    def fail(at: int, what: str):
        column = at - (text.rfind("\n", 0, at) + 1) + 1
        raise UsageError(f"{path}:{line}: invalid JSON ({json_error(what, column)})", "fix the JSON array") from None

    position = skip(position)
    if text.startswith("]", position):
        return rows
    while True:
        try:
            row, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            line += text.count("\n", position, exc.pos)
            fail(exc.pos, exc.msg)
        except RecursionError:
            raise UsageError(f"{path}:{line}: record {len(rows) + 1} is nested too deeply to read",
                             TOO_DEEP_HINT) from None
        rows.append((f"{path}:{line} (record {len(rows) + 1})", row))
        line += text.count("\n", position, end)
        position = skip(end)
        if text.startswith(",", position):
            position = skip(position + 1)
            continue
        if text.startswith("]", position):
            if text[position + 1:].strip():
                fail(position + 1, "extra data after the array")
            return rows
        fail(position, "expected ',' or ']'")


def _raw_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, decoded row or an error) pairs; `where` is "file:line" with the real line of the record."""
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
        return _json_array_rows(path, path.read_bytes().decode("utf-8-sig"))
    rows: list[tuple[str, Any]] = []
    for number, text in lines:
        where = f"{path}:{number}"
        if isinstance(text, UsageError):
            rows.append((where, text))
            continue
        try:
            rows.append((where, json.loads(text)))
        except json.JSONDecodeError as exc:
            rows.append((where, RecordError(where, f"invalid JSON ({json_error(exc.msg, exc.colno)})",
                                            "each line must be one complete JSON object")))
        except RecursionError:  # Python's JSON decoder recurses once per nesting level
            rows.append((where, RecordError(where, "nested too deeply to read", TOO_DEEP_HINT)))
    return rows


JSON_COLUMNS = ("messages", "conversations", "tools", "prompt", "completion", "chosen", "rejected", "history")


def _from_table_row(row: dict) -> dict:
    """CSV/Parquet cells holding conversations are JSON strings; empty cells are absent."""
    clean = {}
    for key, value in row.items():
        if value is None or value == "":
            continue
        if key in JSON_COLUMNS and isinstance(value, str) and value.lstrip().startswith(("[", "{")):
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                pass  # reported by the record parser as a wrong type
        clean[key] = value
    return clean


def _csv_rows(path: Path) -> list[tuple[str, Any]]:
    import csv

    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = []
            start = 2  # the header is line 1; a quoted cell can span lines
            for row in reader:
                rows.append((f"{path}:{start}", _from_table_row(row)))
                start = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: invalid UTF-8 ({exc.reason})", "re-save the file as UTF-8") from None
    except csv.Error as exc:
        raise UsageError(f"{path}: invalid CSV ({exc})", "check quoting and the header line") from None
    return rows


def _parquet_rows(path: Path) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{path}: reading Parquet needs pyarrow", "pip install pyarrow, or convert to .jsonl") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for a bad file
        raise UsageError(f"{path}: unreadable Parquet ({exc})", "check the file, or convert to .jsonl") from None
    rows = table.to_pylist()
    return [(f"{path}:{number}", _from_table_row(row)) for number, row in enumerate(rows, start=1)]  # row numbers


# ---------------------------------------------------------------------------------------------------------------
# LLaMA-Factory's dataset_info.json


@dataclass
class Mapping:
    """Column names and role tags of one dataset, from a dataset_info.json entry (LLaMA-Factory's defaults)."""

    formatting: str = "alpaca"  # alpaca | sharegpt | openai
    columns: dict[str, str] = field(default_factory=dict)  # our name → the file's column
    tags: dict[str, str] = field(default_factory=dict)
    ranking: bool = False


def _dataset_info_files(directory: Path) -> list[str]:
    info = directory / DATASET_INFO
    try:
        entries = json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}
    except (OSError, ValueError):
        return []
    return [e["file_name"] for e in entries.values() if isinstance(e, dict) and isinstance(e.get("file_name"), str)]


def dataset_info_mapping(path: Path) -> Mapping | None:
    """The mapping a dataset_info.json next to `path` declares for it, or None."""
    info = path.parent / DATASET_INFO
    if not info.is_file():
        return None
    try:
        entries = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{info}: unreadable ({exc})", f"fix the JSON, or move {DATASET_INFO} away") from None
    if not isinstance(entries, dict):
        raise UsageError(f"{info}: expected an object of dataset entries", "see LLaMA-Factory's data/README.md")
    for name, entry in entries.items():
        if isinstance(entry, dict) and entry.get("file_name") == path.name:
            formatting = str(entry.get("formatting", "alpaca"))
            if formatting not in ("alpaca", "sharegpt", "openai"):
                raise UsageError(f"{info}: dataset {name!r} has formatting {formatting!r}",
                                 "mlxtune reads alpaca, sharegpt and openai formatting")
            columns = entry.get("columns") or {}
            tags = entry.get("tags") or {}
            if not isinstance(columns, dict) or not isinstance(tags, dict):
                raise UsageError(f"{info}: dataset {name!r}: 'columns' and 'tags' must be objects",
                                 "see LLaMA-Factory's data/README.md")
            return Mapping(formatting, {str(k): str(v) for k, v in columns.items()},
                           {str(k): str(v) for k, v in tags.items()}, bool(entry.get("ranking")))
    return None


def _apply_mapping(row: dict, mapping: Mapping) -> dict:
    """Rename the file's columns to the names LLaMA-Factory documents by default, so one parser reads both."""
    if mapping.formatting == "alpaca":
        defaults = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                    "history": "history", "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag",
                    "tools": "tools"}
    else:
        defaults = {"messages": "conversations", "system": "system", "tools": "tools", "chosen": "chosen",
                    "rejected": "rejected", "kto_tag": "kto_tag"}
    renamed = {}
    for ours, canonical in defaults.items():
        column = mapping.columns.get(ours, canonical)
        if column in row:
            renamed[canonical] = row[column]
    return renamed


# ---------------------------------------------------------------------------------------------------------------
# Pieces of records


def _text(value: Any, where: str, key: str, owner: str = "") -> str:
    """A field's text: a string, or content parts [{"type": "text", "text"|"value": …}] joined."""
    if owner:
        key_label = f"{owner} {key!r}"
    else:
        key_label = repr(key)
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        pieces = []
        for number, part in enumerate(value, start=1):
            if isinstance(part, str):
                pieces.append(part)
                continue
            if not isinstance(part, dict):
                raise RecordError(where, f"{key_label} part {number} is a {type(part).__name__}",
                                  'content parts are objects like {"type": "text", "text": "…"}')
            kind = part.get("type", "text")
            if kind not in ("text", "input_text", "output_text"):
                raise RecordError(where, f"{key_label} part {number} has type {kind!r}; only text parts train",
                                  "remove image/audio parts or describe them in text")
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                found = ", ".join(sorted(map(str, part))) or "nothing"
                raise RecordError(where, f'expected "text" or "value" in {key_label} part {number}, found {found}',
                                  'write the part as {"type": "text", "text": "…"}')
            pieces.append(text)
        return "".join(pieces)
    raise RecordError(where, f"{key_label} must be text or a list of text parts, got {type(value).__name__}",
                      "use a string, or [{\"type\": \"text\", \"text\": \"…\"}]")


def _json_value(value: Any, where: str, key: str, convention: str) -> Any:
    """A value some tools store as a JSON string (LLaMA-Factory's `tools`, OpenAI's tool-call `arguments`)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else None
    except json.JSONDecodeError as exc:
        raise RecordError(where, f"{key!r} is a string but not JSON ({json_error(exc.msg, exc.colno)})",
                          f"{convention} writes it as JSON text; fix the quoting") from None
    except RecursionError:
        raise RecordError(where, f"{key!r} is nested too deeply to read", TOO_DEEP_HINT) from None


def _tools(value: Any, where: str) -> list[dict] | None:
    """Tool definitions as the chat template expects them: [{"type": "function", "function": {name, parameters}}]."""
    value = _json_value(value, where, "tools", "LLaMA-Factory")
    if value is None or value == []:
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(where, f"'tools' must be a list of tool definitions (or its JSON text), got "
                                 f"{type(value).__name__}", "use the OpenAI tools format")
    tools = []
    for number, tool in enumerate(value, start=1):
        if not isinstance(tool, dict):
            raise RecordError(where, f"tool {number} is not an object", 'write {"name": …, "parameters": {…}}')
        if "type" not in tool and "name" in tool:  # LLaMA-Factory/OpenAI `functions`: the bare function schema
            tool = {"type": "function", "function": tool}
        tools.append(tool)
    return tools


def _tool_call(call: Any, where: str, position: int) -> dict:
    """One tool call as chat templates take it: {"type": "function", "function": {"name", "arguments": {…}}}."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        function = dict(call["function"])
        normalised = {k: v for k, v in call.items() if k != "function"}
        normalised.setdefault("type", "function")
    elif isinstance(call, dict) and "name" in call:  # LLaMA-Factory function_call text, OpenAI's function_call
        function = {"name": call["name"], "arguments": call.get("arguments", {})}
        normalised = {"type": "function"}
    else:
        raise RecordError(where, f"message {position}: expected a tool call "
                                 '{"type": "function", "function": {"name": …, "arguments": …}}, found '
                                 f"{json.dumps(call)[:60]}", "see the OpenAI tool_calls format")
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise RecordError(where, f"message {position}: a tool call has no function name",
                          'write {"name": "tool_name", "arguments": {…}}')
    # OpenAI writes arguments as JSON text; templates take the object (and write it as JSON themselves).
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
            arguments = parsed if isinstance(parsed, dict) else arguments
        except json.JSONDecodeError:
            pass  # free-form arguments stay text
    function["arguments"] = arguments if arguments is not None else {}
    normalised["function"] = function
    return normalised


def _weight(item: dict, where: str, position: int) -> bool | None:
    """Whether a message is trained on, from OpenAI's `weight`, `loss_weight`, or Axolotl's `train`/`training`."""
    for key in ("weight", "loss_weight", "train", "training"):
        if key in item and item[key] is not None:
            value = item[key]
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value >= 0:
                return value > 0
            raise RecordError(where, f"message {position}: {key!r} must be 0 or 1 (or true/false), got {value!r}",
                              "OpenAI's weight is 0 (not trained on) or 1 (trained on)")
    return None


ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "bot": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool", "function": "tool",
                "observation": "tool", "ipython": "tool", "function_call": "tool_call"}


def _role_map(tags: dict[str, str] | None) -> dict[str, str]:
    if not tags:
        return ROLE_ALIASES
    roles = dict(ROLE_ALIASES)
    for tag, role in (("user_tag", "user"), ("assistant_tag", "assistant"), ("observation_tag", "tool"),
                      ("function_tag", "tool_call"), ("system_tag", "system")):
        if tag in tags:
            roles[tags[tag].lower()] = role
    return roles


def _messages(items: Any, where: str, key: str, tags: dict[str, str] | None = None
              ) -> tuple[list[dict[str, Any]], list[bool | None]]:
    """Messages in our form ({role, content, tool_calls?}) and each one's explicit weight (None: the default)."""
    if isinstance(items, str):
        items = _json_value(items, where, key, "this convention")
    if not isinstance(items, list) or not items:
        raise RecordError(where, f"{key!r} holds no messages", "give at least one user and one assistant message")
    roles = _role_map(tags)
    role_keys = (tags["role_tag"],) if tags and "role_tag" in tags else ("role", "from")
    content_keys = (tags["content_tag"],) if tags and "content_tag" in tags else ("content", "value", "text")
    messages, weights = [], []
    for position, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise RecordError(where, f"message {position} is not an object",
                              'each message is {"role": …, "content": …} (ShareGPT: {"from": …, "value": …})')
        role_key = next((k for k in role_keys if k in item), None)
        if role_key is None:
            found = ", ".join(sorted(map(str, item))) or "nothing"
            raise RecordError(where, f"message {position} has no role: expected {' or '.join(map(repr, role_keys))}, "
                                     f"found {found}", "write the speaker under \"role\" (or ShareGPT's \"from\")")
        raw_role = str(item[role_key])
        role = roles.get(raw_role.lower())
        if role is None:
            raise RecordError(where, f"message {position} has unknown role {raw_role!r}",
                              "use system, user, assistant or tool (ShareGPT: human, gpt, function_call, "
                              "observation)")
        content_key = next((k for k in content_keys if k in item), None)
        if content_key is None and not (item.get("tool_calls") or item.get("function_call")):
            found = ", ".join(sorted(map(str, item)))
            raise RecordError(where, f"message {position} ({raw_role}) has no text: expected "
                                     f"{' or '.join(map(repr, content_keys))}, found {found}",
                              "write the message text under \"content\" (or ShareGPT's \"value\")")
        content = _text(item.get(content_key) if content_key else None, where, content_key or "content",
                        f"message {position}")
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "tool_call":  # LLaMA-Factory: the assistant's call, as {"name", "arguments"} JSON (or a list)
            calls = _json_value(content, where, f"message {position} ({raw_role})", "LLaMA-Factory")
            calls = calls if isinstance(calls, list) else [calls]
            message = {"role": "assistant", "content": "",
                       "tool_calls": [_tool_call(c, where, position) for c in calls]}
        elif role == "assistant":
            calls = item.get("tool_calls")
            if calls is None and isinstance(item.get("function_call"), dict):  # OpenAI's deprecated form
                calls = [item["function_call"]]
            if calls:
                if not isinstance(calls, list):
                    raise RecordError(where, f"message {position}: 'tool_calls' must be a list",
                                      "see the OpenAI tool_calls format")
                message["tool_calls"] = [_tool_call(c, where, position) for c in calls]
        elif role == "tool":
            for extra in ("tool_call_id", "name"):
                if isinstance(item.get(extra), str):
                    message[extra] = item[extra]
        if item.get("reasoning_content") and role == "assistant" and isinstance(item["reasoning_content"], str):
            message["reasoning_content"] = item["reasoning_content"]
        messages.append(message)
        weights.append(_weight(item, where, position) if message["role"] == "assistant" else None)
    return messages, weights


def _chat(messages: list[dict], weights: list[bool | None], where: str, *, tools=None, system: str | None = None,
          convention: str, prompt_messages: int = 0) -> Record:
    """A chat record; the first `prompt_messages` are context only (TRL's conversational prompt)."""
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}] + messages
        weights = [None] + weights
        prompt_messages += 1 if prompt_messages else 0
    trained = [m["role"] == "assistant" and (w if w is not None else True) and i >= prompt_messages
               for i, (m, w) in enumerate(zip(messages, weights))]
    if not any(t and (m["content"].strip() or m.get("tool_calls")) for t, m in zip(trained, messages)):
        has_reply = any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in messages)
        detail = ("every assistant turn has weight 0" if has_reply
                  else "no assistant turn with content (expected at least one assistant message)")
        raise RecordError(where, f"nothing to learn: {detail}", "give the record a reply to train on, or remove it")
    explicit = any(w is not None for w in weights) or prompt_messages
    return Record("chat", where, messages=messages, tools=tools, trained=trained if explicit else None,
                  convention=convention)


def _completion(row: dict, where: str, prompt_key: str, completion_key: str, convention: str,
                system: str | None = None) -> Record:
    for key in (prompt_key, completion_key):
        if key not in row:
            raise RecordError(where, f"missing {key!r} ({convention} records have {prompt_key!r} and "
                                     f"{completion_key!r})", f"add {key!r}, or name the fields with "
                                                             "--prompt-key/--completion-key")
    completion = _text(row[completion_key], where, completion_key)
    if not completion.strip():
        raise RecordError(where, f"nothing to learn: empty {completion_key!r}",
                          "give the record a reply to train on, or remove it")
    return Record("completion", where, prompt=_text(row[prompt_key], where, prompt_key), completion=completion,
                  system=system, convention=convention)


def _alpaca(row: dict, where: str, response_key: str, convention: str) -> Record:
    """LLaMA-Factory's alpaca: the prompt is `instruction` + "\\n" + `input`; `history` turns are trained on too."""
    prompt = _text(row.get("instruction"), where, "instruction")
    extra = _text(row.get("input"), where, "input")
    if extra:
        prompt = f"{prompt}\n{extra}" if prompt else extra
    system = _text(row.get("system"), where, "system") or None
    output = _text(row.get(response_key), where, response_key)
    if not output.strip():
        raise RecordError(where, f"nothing to learn: empty {response_key!r}",
                          "give the record a reply to train on, or remove it")
    history = row.get("history")
    tools = _tools(row.get("tools"), where) if row.get("tools") else None
    if not history and not tools:
        return Record("completion", where, prompt=prompt, completion=output, system=system, convention=convention)
    if not isinstance(history, list) and history:
        raise RecordError(where, "'history' must be a list of [instruction, response] pairs",
                          'write "history": [["question", "answer"], …]')
    messages = []
    for number, pair in enumerate(history or [], start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RecordError(where, f"history item {number} is not an [instruction, response] pair",
                              'write "history": [["question", "answer"], …]')
        messages += [{"role": "user", "content": _text(pair[0], where, "history")},
                     {"role": "assistant", "content": _text(pair[1], where, "history")}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return _chat(messages, [None] * len(messages), where, tools=tools, system=system, convention=convention)


def _segments(row: dict, where: str) -> Record:
    """Axolotl's template-free input_output: text pieces concatenated as they are, `label` says which are trained."""
    segments = row["segments"]
    if not isinstance(segments, list) or not segments:
        raise RecordError(where, "'segments' holds no segments", 'write [{"label": true, "text": "…"}, …]')
    pieces = []
    for number, segment in enumerate(segments, start=1):
        if not isinstance(segment, dict) or not isinstance(segment.get("text"), str):
            raise RecordError(where, f"segment {number}: expected {{\"label\": true|false, \"text\": \"…\"}}",
                              "Axolotl's input_output segments each have text and a boolean label")
        pieces.append((segment["text"], bool(segment.get("label", True))))
    if not any(label and text.strip() for text, label in pieces):
        raise RecordError(where, "nothing to learn: no segment with \"label\": true has text",
                          "label the part to train on with \"label\": true")
    return Record("text", where, text="".join(t for t, _ in pieces), segments=pieces,
                  convention="input_output (segments)")


# ---------------------------------------------------------------------------------------------------------------
# Preference data: recognised so `lora` can refuse it clearly (mlxtune/data/preference.py reads it for training)

PAIRED = "paired"  # prompt + chosen + rejected (DPO, ORPO)
UNPAIRED = "unpaired"  # one reply + a boolean label (KTO)


def detect_preference(row: Any) -> str | None:
    """PAIRED, UNPAIRED or None for one decoded record.

    PAIRED: `chosen` and `rejected` (TRL's explicit/implicit prompt, LLaMA-Factory's alpaca and sharegpt ranking
    data). UNPAIRED: a reply with a boolean `label` (TRL's unpaired preference) or `kto_tag` (LLaMA-Factory's KTO).
    """
    if not isinstance(row, dict):
        return None
    if "chosen" in row and "rejected" in row:
        return PAIRED
    if isinstance(row.get("label"), bool) and any(k in row for k in ("completion", "messages", "conversations",
                                                                         "output", "response")):
        return UNPAIRED
    if "kto_tag" in row:
        return UNPAIRED
    return None


PREFERENCE_DESCRIPTION = {
    PAIRED: ("preference pairs (chosen/rejected, for DPO or ORPO)",
             "train on them with `mlxtune dpo` or `mlxtune orpo`; for supervised finetuning keep only the chosen "
             "replies, e.g. as prompt/completion"),
    UNPAIRED: ("unpaired preference data (a reply with a true/false label, for KTO)",
               "mlxtune has no KTO trainer yet; for supervised finetuning keep the replies labelled true, "
               "e.g. as prompt/completion"),
}


# ---------------------------------------------------------------------------------------------------------------
# One record

SHAPES = ('messages (OpenAI/TRL chat), conversations (ShareGPT), prompt+completion, instruction+output (Alpaca), '
          'text, segments (Axolotl input_output)')


def parse_record(row: Any, where: str, keys: tuple[str, str] | None = None, mapping: Mapping | None = None) -> Record:
    """Detect the convention of one decoded row and normalise it.

    `keys`: custom (prompt, completion) field names. `mapping`: a dataset_info.json entry for the file.
    """
    if not isinstance(row, dict):
        raise RecordError(where, f"expected a JSON object, got {type(row).__name__}", "one object per line")
    if keys is not None:
        return _completion(row, where, *keys, convention=f"{keys[0]}/{keys[1]}")
    tags = None
    if mapping is not None:
        row = _apply_mapping(row, mapping)
        tags = mapping.tags
        if mapping.formatting == "openai":
            tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                    "system_tag": "system", "observation_tag": "tool", "function_tag": "function_call", **tags}
    shape = detect_preference(row)
    if shape is not None:
        description, hint = PREFERENCE_DESCRIPTION[shape]
        raise RecordError(where, f"this is {description}, which lora does not train on", hint)
    system = row.get("system")
    system = _text(system, where, "system") if system is not None else None
    for key, convention in (("messages", "chat (messages)"), ("conversations", "sharegpt (conversations)")):
        if key in row:
            tools = row.get("tools", row.get("functions"))
            messages, weights = _messages(row[key], where, key, tags)
            return _chat(messages, weights, where, tools=_tools(tools, where), system=system, convention=convention)
    if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):  # TRL conversational
        if not (isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list)):
            raise RecordError(where, "conversational prompt/completion needs both as message lists, found "
                                     f"prompt: {type(row.get('prompt')).__name__}, completion: "
                                     f"{type(row.get('completion')).__name__}",
                              'write "prompt": [{"role": "user", …}], "completion": [{"role": "assistant", …}]')
        prompt, prompt_weights = _messages(row["prompt"], where, "prompt", tags)
        completion, completion_weights = _messages(row["completion"], where, "completion", tags)
        return _chat(prompt + completion, prompt_weights + completion_weights, where,
                     tools=_tools(row.get("tools"), where), system=system,
                     convention="prompt/completion (conversational)", prompt_messages=len(prompt))
    if "prompt" in row or "completion" in row:
        return _completion(row, where, "prompt", "completion", "prompt/completion", system)
    if "segments" in row:
        return _segments(row, where)
    if "instruction" in row and ("output" in row or "response" in row):
        key = "output" if "output" in row else "response"
        return _alpaca(row, where, key, "alpaca (instruction/output)" if key == "output"
                       else "alpaca (instruction/response)")
    if "INSTRUCTION" in row and "RESPONSE" in row:  # OpenAssistant (Axolotl's oasst)
        return _completion(row, where, "INSTRUCTION", "RESPONSE", "oasst (INSTRUCTION/RESPONSE)")
    if "question" in row and ("answer" in row or "response" in row):  # GSM8K, Axolotl's open_orca
        answer = "answer" if "answer" in row else "response"
        system = row.get("system_prompt")
        return _completion(row, where, "question", answer, f"question/{answer}",
                           _text(system, where, "system_prompt") if system else None)
    if "text" in row:
        text = _text(row["text"], where, "text")
        if not text.strip():
            raise RecordError(where, "nothing to learn: empty 'text'", "give the record text, or remove it")
        return Record("text", where, text=text, convention="text")
    keys_found = ", ".join(sorted(map(str, row))) or "none"
    texts = [str(k) for k, v in row.items() if isinstance(v, str)]
    example = f", e.g. --prompt-key {texts[0]} --completion-key {texts[1]}" if len(texts) >= 2 else ""
    raise RecordError(
        where,
        f"unrecognised record (keys: {keys_found})",
        f"expected one of: {SHAPES}; for other field names pass --prompt-key/--completion-key{example} "
        f"(found: {keys_found})",
    )


# ---------------------------------------------------------------------------------------------------------------
# One file


def _line_of(where: str) -> str:
    """The line part of "file:line (record N)" → "line"."""
    tail = where.rsplit(":", 1)[-1]
    return tail.split(" ", 1)[0]


def format_runs(records: list[Record]) -> list[tuple[str, str, str, int]]:
    """Consecutive runs of one convention: (convention, first line, last line, records)."""
    runs: list[list] = []
    for record in records:
        line = _line_of(record.source)
        if runs and runs[-1][0] == record.convention:
            runs[-1][2] = line
            runs[-1][3] += 1
        else:
            runs.append([record.convention, line, line, 1])
    return [tuple(run) for run in runs]


def _mixed_formats_error(path: Path, records: list[Record]) -> UsageError:
    runs = format_runs(records)
    shown = [f"lines {a}-{b}: {c}" if a != b else f"line {a}: {c}" for c, a, b, _ in runs[:6]]
    more = f"; and {len(runs) - 6} more changes" if len(runs) > 6 else ""
    counts: dict[str, int] = {}
    for convention, _, _, n in runs:
        counts[convention] = counts.get(convention, 0) + n
    main = max(counts, key=counts.get)
    return UsageError(f"{path}: the records change format ({'; '.join(shown)}{more})",
                      f"keep one format per file: most records are {main}; convert the others or put them in "
                      "their own file")


def _preference_error(path: Path, found: list[tuple[str, str]]) -> UsageError:
    shape = found[0][1]
    description, hint = PREFERENCE_DESCRIPTION[shape]
    lines = ", ".join(_line_of(where) for where, _ in found[:3]) + (" …" if len(found) > 3 else "")
    if shape == PAIRED:  # the exact command, ready to paste
        hint = hint.replace("`mlxtune dpo`", f"`mlxtune dpo --data {path}`", 1)
    return UsageError(f"{path}: {len(found):,} record(s) are {description} (lines {lines}); lora trains on one "
                      "reply per prompt", hint)


def read_records(path: str | Path, problems: list[UsageError] | None = None,
                 keys: tuple[str, str] | None = None) -> list[Record]:
    """All records of one file, all of one convention (mixed conventions are an error naming the line ranges).

    With `problems`, bad records are collected there and skipped instead of stopping at the first. `keys` names
    the prompt and completion fields when they are not the usual ones (e.g. ("question", "answer")).
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UsageError(f"{path}: unsupported file type {path.suffix!r}", f"use one of {', '.join(SUFFIXES)}")
    mapping = dataset_info_mapping(path) if keys is None else None
    rows = _raw_rows(path)
    if not rows:
        raise UsageError(f"{path}: the file is empty", "add at least one record, one JSON object per line")
    if mapping is not None and mapping.ranking:
        preference = [(where, PAIRED) for where, row in rows if not isinstance(row, UsageError)]
    else:
        preference = [(where, shape) for where, row in rows if keys is None and isinstance(row, dict)
                      and (shape := detect_preference(_apply_mapping(row, mapping) if mapping else row))]
    if preference:  # one error for the file, not one per record
        error = _preference_error(path, preference)
        if problems is None:
            raise error
        problems.append(error)
        return []
    records = []
    for where, row in rows:
        try:
            if isinstance(row, UsageError):
                raise row
            records.append(parse_record(row, where, keys, mapping))
        except UsageError as error:
            if problems is None:
                raise
            problems.append(error)
    if len({r.convention for r in records}) > 1:
        error = _mixed_formats_error(path, records)
        if problems is None:
            raise error
        problems.append(error)
        return []
    return records


def dataset_kind(records: list[Record]) -> str:
    """One kind for a set of records: text, or chat when any record is a conversation, else completion."""
    kinds = {r.kind for r in records}
    if not kinds or kinds == {"text"}:
        return "text"
    return "chat" if "chat" in kinds else "completion"
