"""Render an Ollama Modelfile TEMPLATE the way Ollama does: Go's text/template, the subset chat templates use.

Supported, with Go's semantics: text and `{{ }}` actions with `{{-`/`-}}` whitespace trimming and `{{/* */}}`
comments; `if`/`else if`/`else`/`end`, `range` (with `$i, $v :=` and `else`), `with`; variables (`$x := …`,
`$x = …`, scoped to their block, `$` the root); fields (`.Role`, `$.Messages`, `$m.Content`); string, number and
boolean literals; parenthesised pipelines and `|` pipes; Go's built-in functions `eq ne lt le gt ge and or not len
index slice print` and Ollama's `json`. Anything else (`template`, `define`, `block`, `printf`, …) is refused with
its name, rather than rendered differently from Ollama. Truth is Go's: false, 0, "", nil and empty lists are false.
"""

from __future__ import annotations

import json
import re

from mlxtune.errors import UsageError

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(`[^`]*`)|(:=|=|\||\(|\)|,)|([^\s|(),=:]+(?::(?!=))?))')
NO_VALUE = "<no value>"


class TemplateError(UsageError):
    def __init__(self, message: str):
        super().__init__(f"Modelfile TEMPLATE: {message}", "mlxtune export --format ollama writes one it can check")


def _truth(value) -> bool:
    return not (value is None or value is False or value == 0 and not isinstance(value, bool) or value in ("",)
                or (isinstance(value, (list, dict, tuple)) and not value))


def _text(value) -> str:
    if value is None:
        return NO_VALUE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{_text(v)}" for k, v in sorted(value.items())) + "]"
    return str(value)


def _and(*args):
    for arg in args:
        if not _truth(arg):
            return arg
    return args[-1]


def _or(*args):
    for arg in args:
        if _truth(arg):
            return arg
    return args[-1]


def _slice(value, *bounds):
    return value[bounds[0]:bounds[1]] if len(bounds) == 2 else value[bounds[0]:] if bounds else value


FUNCTIONS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "and": _and, "or": _or, "not": lambda a: not _truth(a), "len": len,
    "index": lambda v, *keys: _index(v, keys), "slice": _slice, "print": lambda *a: "".join(_text(x) for x in a),
    "json": lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":")),
}


def _index(value, keys):
    for key in keys:
        value = value[key] if isinstance(value, (list, tuple)) else (value or {}).get(key)
    return value


def _tokens(source: str) -> list[str]:
    out, at = [], 0
    source = source.strip()
    while at < len(source):
        match = _TOKEN.match(source, at)
        if not match or match.end() == at:
            raise TemplateError(f"can't read {source[at:]!r}")
        out.append(next(g for g in match.groups() if g is not None))
        at = match.end()
    return out


class _Parser:
    """Template text → a tree of ("text", s) | ("action", pipeline) | ("if", [(pipe, body)], else) |
    ("range"/"with", vars, pipe, body, else) nodes."""

    def __init__(self, template: str):
        self.items = self._lex(template)
        self.at = 0

    @staticmethod
    def _lex(template: str) -> list[tuple[str, str]]:
        items, at = [], 0
        for match in _ACTION.finditer(template):
            text = template[at:match.start()]
            if match.group(1):
                text = text.rstrip(" \t\r\n")
            items.append(("text", text))
            items.append(("action", match.group(2).strip()))
            at = match.end()
            if match.group(3):
                while at < len(template) and template[at] in " \t\r\n":
                    at += 1
        items.append(("text", template[at:]))
        return [item for item in items if item != ("text", "")]

    def parse(self, until=()) -> tuple[list, str | None]:
        body = []
        while self.at < len(self.items):
            kind, value = self.items[self.at]
            self.at += 1
            if kind == "text":
                body.append(("text", value))
                continue
            if value.startswith("/*"):
                continue
            word = value.split(None, 1)[0] if value else ""
            rest = value[len(word):].strip()
            if word in until or (word == "else" and "else" in until):
                return body, value
            if word == "if":
                body.append(self._if(rest))
            elif word in ("range", "with"):
                body.append(self._block(word, rest))
            elif word in ("end", "else"):
                raise TemplateError(f"unexpected {{{{{value}}}}}")
            elif word in ("template", "define", "block", "break", "continue", "printf"):
                raise TemplateError(f"{{{{{word}}}}} is not supported by this renderer")
            else:
                body.append(("action", _tokens(value)))
        if until:
            raise TemplateError("missing {{end}}")
        return body, None

    def _if(self, condition: str):
        branches, otherwise = [], []
        while True:
            body, closer = self.parse(("end", "else"))
            branches.append((_tokens(condition), body))
            if closer == "end":
                return ("if", branches, otherwise)
            if closer.startswith("else if"):
                condition = closer[len("else if"):]
                continue
            otherwise, closer = self.parse(("end",))
            return ("if", branches, otherwise)

    def _block(self, word: str, header: str):
        tokens = _tokens(header)
        names = []
        if ":=" in tokens:
            split = tokens.index(":=")
            names, tokens = [t for t in tokens[:split] if t != ","], tokens[split + 1:]
        body, closer = self.parse(("end", "else"))
        otherwise = self.parse(("end",))[0] if closer != "end" else []
        return (word, names, tokens, body, otherwise)


class _Scope:
    def __init__(self, root):
        self.frames = [{"$": root}]

    def get(self, name):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise TemplateError(f"undefined variable {name}")

    def set(self, name, value):
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise TemplateError(f"undefined variable {name}")


def _field(value, path: list[str]):
    for name in path:
        if not name:
            continue
        if not isinstance(value, dict):
            raise TemplateError(f"can't evaluate field {name} in {type(value).__name__}")
        value = value.get(name)
    return value


def _operand(token: str, dot, scope: _Scope):
    if token.startswith('"'):
        return json.loads(token)
    if token.startswith("`"):
        return token[1:-1]
    if token in ("true", "false"):
        return token == "true"
    if token == "nil":
        return None
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token == ".":
        return dot
    if token.startswith("."):
        return _field(dot, token[1:].split("."))
    if token.startswith("$"):
        name, _, path = token.partition(".")
        return _field(scope.get(name), path.split(".") if path else [])
    raise TemplateError(f"unknown function {token!r}")


def _split_parens(tokens: list[str]) -> list:
    """Group parenthesised sub-pipelines into nested lists."""
    out, stack = [], []
    for token in tokens:
        if token == "(":
            stack.append(out)
            out = []
        elif token == ")":
            inner, out = out, stack.pop()
            out.append(inner)
        else:
            out.append(token)
    if stack:
        raise TemplateError("unclosed (")
    return out


def _pipeline(tokens, dot, scope: _Scope):
    if isinstance(tokens, list) and len(tokens) >= 2 and isinstance(tokens[0], str) and tokens[0].startswith("$") \
            and tokens[1] in (":=", "="):
        value = _pipeline(tokens[2:], dot, scope)[0]
        if tokens[1] == ":=":
            scope.frames[-1][tokens[0]] = value
        else:
            scope.set(tokens[0], value)
        return None, False
    grouped = _split_parens(tokens) if all(isinstance(t, str) for t in tokens) else tokens
    commands, current = [], []
    for token in grouped:
        if token == "|":
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    value, piped = None, False
    for command in commands:
        value = _command(command, dot, scope, [value] if piped else [])
        piped = True
    return value, True


def _arg(token, dot, scope):
    return _pipeline(token, dot, scope)[0] if isinstance(token, list) else _operand(token, dot, scope)


def _command(command: list, dot, scope: _Scope, piped: list):
    if not command:
        raise TemplateError("empty command")
    head = command[0]
    if isinstance(head, str) and head in FUNCTIONS:
        args = [_arg(t, dot, scope) for t in command[1:]] + piped
        try:
            return FUNCTIONS[head](*args)
        except (TypeError, IndexError, KeyError) as exc:
            raise TemplateError(f"{head}: {exc}") from None
    if len(command) > 1 or piped:
        raise TemplateError(f"{head!r} is not a function")
    return _arg(head, dot, scope)


def _execute(nodes: list, dot, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "action":
            value, prints = _pipeline(node[1], dot, scope)
            if prints:
                out.append(_text(value))
        elif kind == "if":
            for condition, body in node[1]:
                scope.frames.append({})
                try:
                    if _truth(_pipeline(condition, dot, scope)[0]):
                        _execute(body, dot, scope, out)
                        break
                finally:
                    scope.frames.pop()
            else:
                scope.frames.append({})
                _execute(node[2], dot, scope, out)
                scope.frames.pop()
        else:
            _block(node, dot, scope, out)


def _block(node, dot, scope: _Scope, out: list[str]) -> None:
    kind, names, tokens, body, otherwise = node
    value = _pipeline(tokens, dot, scope)[0]
    scope.frames.append({})
    try:
        if kind == "with":
            if _truth(value):
                if names:
                    scope.frames[-1][names[-1]] = value
                _execute(body, value, scope, out)
            else:
                _execute(otherwise, dot, scope, out)
            return
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value or []))
        if not items:
            _execute(otherwise, dot, scope, out)
        for key, item in items:
            if len(names) == 2:
                scope.frames[-1][names[0]], scope.frames[-1][names[1]] = key, item
            elif names:
                scope.frames[-1][names[0]] = item
            _execute(body, item, scope, out)
    finally:
        scope.frames.pop()


def render(template: str, data: dict) -> str:
    """`template` executed on `data` (a dict with Go field names: Messages, System, Prompt, …)."""
    nodes, _ = _Parser(template).parse()
    out: list[str] = []
    _execute(nodes, data, _Scope(data), out)
    return "".join(out)


def _ollama_message(message: dict) -> dict:
    out = {"Role": message["role"], "Content": message["content"]}
    if message.get("tool_calls"):
        out["ToolCalls"] = [{"Function": {"Name": call["function"]["name"], "Arguments": call["function"]["arguments"]}}
                            for call in message["tool_calls"]]
    return out


def with_modelfile_system(messages: list[dict], system: str | None) -> list[dict]:
    """Ollama's chat handler: the Modelfile's SYSTEM goes first as a system message when the chat starts without one."""
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def ollama_data(messages: list[dict], tools: list[dict] | None = None, think: bool | None = None,
                system: str | None = None) -> dict:
    """What Ollama hands a chat template: .Messages (Role, Content, ToolCalls) plus the legacy .System/.Prompt/
    .Response, .Tools, and .Think (the request's think switch); `system` is the Modelfile's SYSTEM."""
    messages = with_modelfile_system(messages, system)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    data = {"Messages": [_ollama_message(m) for m in messages],
            "System": system, "Prompt": prompt, "Response": "", "Tools": list(tools or [])}
    if think is not None:
        data["Think"] = think
    return data
