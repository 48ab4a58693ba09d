"""Reward functions, named on the command line, with TRL's calling convention.

A reward is `fn(prompts, completions, **columns) -> list[float | None]`: `prompts` and `completions` are lists
(text, or message lists when the record's prompt is a message list: then each completion is
`[{"role": "assistant", "content": text}]`), and every other field of the records is passed as a list by its
name (`answer=[...]`). None means "does not apply to this completion"; it counts 0 in the sum and is left out of
that reward's mean. A reward written for TRL's GRPOTrainer works unchanged.

Specs (`--reward SPEC`, repeatable; several are summed, each times its weight):
    exact[:FIELD]          1 if the completion, stripped, equals the record's FIELD (default `answer`)
    contains[:FIELD]       1 if the completion contains FIELD's text
    number[:FIELD]         1 if the completion's number equals FIELD's: the one after the last `####` if there is
                           one, else the last number in the text (commas and a leading $ ignored), on both sides —
                           so GSM8K's `answer` field (reasoning, then `#### 72`) works as is
    regex:PATTERN          1 if PATTERN's first group (the whole match without groups), stripped, equals `answer`;
    regex@FIELD:PATTERN    ... equals FIELD
    json                   1 if the completion (an optional ``` fence stripped) parses as JSON
    json:SCHEMA_FILE       ... and validates against the JSON schema (the `jsonschema` library when installed,
                           else the subset in `_validate`: type, enum, const, properties, required,
                           additionalProperties, items, minItems/maxItems, minLength/maxLength, minimum/maximum,
                           pattern; a schema with another keyword is refused when loaded, never half-checked)
    format                 1 if the completion's last line is `#### N` (GSM8K's answer format)
    format:think           1 if the completion is `<think>…</think>` then `<answer>…</answer>` (DeepSeek-R1's)
    FILE.py:NAME           the function NAME of the Python file FILE.py
A weight goes in front: `0.5*number`, `2*format:think` (in front because a pattern or a path may end in `*N`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlxtune.backend import unhide_torch
from mlxtune.errors import RunFailed, UsageError

DEFAULT_FIELD = "answer"
BUILTINS = ("exact", "contains", "number", "regex", "json", "format")
WEIGHT = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\*(.+)$", re.DOTALL)
USER_FUNCTION = re.compile(r"^[^:]+\.py:[A-Za-z_]\w*$")  # FILE.py:NAME
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
FORMATS = {
    "####": re.compile(r"^####[ \t]*\$?-?[\d,]*\.?\d+[ \t]*$"),  # the last non-empty line
    "think": re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL),
}


class RewardError(RunFailed):
    """A reward function failed on real completions: the run stops (its last checkpoint resumes)."""


@dataclass
class Reward:
    spec: str  # as written, without the weight
    weight: float
    function: Callable[..., Any]
    fields: tuple[str, ...] = ()  # record fields a built-in reads (checked before a run)


@dataclass
class RewardScores:
    names: list[str]
    values: np.ndarray  # [rewards, completions], NaN where a reward returned None
    total: np.ndarray  # [completions]: Σ weight·value, a None counting 0

    def summary(self) -> dict[str, dict[str, float]]:
        """Per reward: mean and std over the completions it applied to (None left out)."""
        out = {}
        for name, row in zip(self.names, self.values):
            applied = row[~np.isnan(row)]
            out[name] = {"mean": float(applied.mean()) if applied.size else float("nan"),
                         "std": float(applied.std()) if applied.size else float("nan")}
        return out


# ---------------------------------------------------------------------------------------------------------------
# Built-ins: each maps (completion text, field value) to a float


def completion_text(completion: Any) -> str:
    """The text of a completion given as text or as TRL's conversational message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def as_completions(texts: list[str], prompts: list) -> list:
    """Completions as TRL passes them: text, or `[{"role": "assistant", "content": text}]` for a message-list
    prompt."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for t, p in zip(texts, prompts)]


def final_number(text: str) -> float | None:
    """The number after the last `####`, else the last number in the text."""
    found = FINAL_ANSWER.findall(text) or NUMBER.findall(text.replace("$", ""))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _strip_fence(text: str) -> str:
    text = text.strip()
    fenced = re.match(r"^```[a-zA-Z]*\n(.*?)\n?```$", text, re.DOTALL)
    return fenced.group(1) if fenced else text


def _per_completion(score: Callable[[str, Any], float], field: str | None) -> Callable[..., list[float]]:
    def reward(prompts, completions, **columns):
        values = columns[field] if field else [None] * len(completions)
        return [score(completion_text(c), v) for c, v in zip(completions, values)]
    return reward


def _number_score(text: str, expected: Any) -> float:
    want = expected if isinstance(expected, (int, float)) else final_number(str(expected))
    if want is None:
        raise ValueError(f"the field holds no number: {str(expected)[:60]!r}")
    got = final_number(text)
    return float(got is not None and math.isclose(got, float(want), rel_tol=1e-9, abs_tol=1e-9))


def _regex_score(pattern: re.Pattern) -> Callable[[str, Any], float]:
    def score(text: str, expected: Any) -> float:
        match = pattern.search(text)
        if match is None:
            return 0.0
        found = match.group(1) if pattern.groups else match.group(0)
        return float(found is not None and found.strip() == str(expected).strip())
    return score


def _format_score(style: str) -> Callable[[str, Any], float]:
    pattern = FORMATS[style]

    def score(text: str, _expected: Any) -> float:
        if style == "####":
            lines = [line for line in text.strip().splitlines() if line.strip()]
            return float(bool(lines) and bool(pattern.match(lines[-1].strip())))
        return float(bool(pattern.match(text)))
    return score


SCHEMA_KEYWORDS = {"type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems",
                   "maxItems", "minLength", "maxLength", "minimum", "maximum", "pattern",
                   "$schema", "title", "description", "$id", "default", "examples"}
JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _check_schema_subset(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise UsageError(f"{where}: a JSON schema must be an object", "see https://json-schema.org")
    unknown = sorted(set(schema) - SCHEMA_KEYWORDS)
    if unknown:
        raise UsageError(f"{where}: schema keyword(s) {', '.join(unknown)} need the jsonschema library",
                         "pip install jsonschema, or keep to: " + ", ".join(sorted(SCHEMA_KEYWORDS - {"$schema"})))
    for child in list((schema.get("properties") or {}).values()) + ([schema["items"]] if "items" in schema else []):
        _check_schema_subset(child, where)
    if isinstance(schema.get("additionalProperties"), dict):
        _check_schema_subset(schema["additionalProperties"], where)


def _validate(value: Any, schema: dict) -> bool:
    """The documented subset of JSON Schema (used when the jsonschema library is not installed)."""
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not any((k == "number" and is_number) or (k == "integer" and is_number and float(value).is_integer())
                   or (k in JSON_TYPES and isinstance(value, JSON_TYPES[k]) and not
                       (k != "boolean" and isinstance(value, bool)))
                   for k in kinds):
            return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "const" in schema and value != schema["const"]:
        return False
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", [])):
            return False
        for key, item in value.items():
            if key in properties:
                if not _validate(item, properties[key]):
                    return False
            elif schema.get("additionalProperties") is False:
                return False
            elif isinstance(schema.get("additionalProperties"), dict):
                if not _validate(item, schema["additionalProperties"]):
                    return False
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf):
            return False
        if "items" in schema and not all(_validate(item, schema["items"]) for item in value):
            return False
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf):
            return False
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf):
            return False
    return True


def _json_score(schema_file: str | None) -> Callable[[str, Any], float]:
    validate: Callable[[Any], bool] = lambda value: True
    if schema_file:
        path = Path(schema_file)
        if not path.is_file():
            raise UsageError(f"json reward: no schema file {schema_file}", "write json:PATH/TO/schema.json")
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"json reward: {schema_file} is not JSON ({exc})", "the schema file is one JSON object")
        try:
            import jsonschema
        except ImportError:
            _check_schema_subset(schema, schema_file)
            validate = lambda value: _validate(value, schema)
        else:
            validator = jsonschema.validators.validator_for(schema)(schema)
            validate = validator.is_valid

    def score(text: str, _expected: Any) -> float:
        try:
            value = json.loads(_strip_fence(text))
        except (json.JSONDecodeError, RecursionError):
            return 0.0
        return float(validate(value))
    return score


def _builtin(spec: str) -> tuple[Callable[..., list[float]], tuple[str, ...]]:
    name, _, argument = spec.partition(":")
    name, _, regex_field = name.partition("@")
    if regex_field and name != "regex":
        raise UsageError(f"reward {spec!r}: only regex takes @FIELD", f"write {name}:FIELD")
    if name in ("exact", "contains", "number"):
        field = argument or DEFAULT_FIELD
        score = {"exact": lambda text, want: float(text.strip() == str(want).strip()),
                 "contains": lambda text, want: float(str(want).strip() in text),
                 "number": _number_score}[name]
        return _per_completion(score, field), (field,)
    if name == "regex":
        if not argument:
            raise UsageError(f"reward {spec!r} has no pattern", r"write regex:PATTERN, e.g. 'regex:answer is (\d+)'")
        try:
            pattern = re.compile(argument)
        except re.error as exc:
            raise UsageError(f"reward {spec!r}: bad regular expression ({exc})", "check the pattern's brackets")
        field = regex_field or DEFAULT_FIELD
        return _per_completion(_regex_score(pattern), field), (field,)
    if name == "json":
        return _per_completion(_json_score(argument or None), None), ()
    if name == "format":
        style = argument or "####"
        if style not in FORMATS:
            raise UsageError(f"reward {spec!r}: unknown format {style!r}", "use format (#### N) or format:think")
        return _per_completion(_format_score(style), None), ()
    raise UsageError(f"unknown reward {spec!r}",
                     f"use one of {', '.join(BUILTINS)} or a user function FILE.py:NAME")


def _user_function(spec: str) -> Callable[..., Any]:
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise UsageError(f"reward {spec!r}: no file {file}", "write FILE.py:FUNCTION with an existing file")
    module_spec = importlib.util.spec_from_file_location(f"mlxtune_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    unhide_torch()  # the command hides torch from transformers (backend.py); a user's reward may import it
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: any error it raises on import is theirs to see
        raise UsageError(f"reward {spec!r}: {file} failed to load: {_last_line(exc)}", "run the file with python "
                         "to see the whole traceback")
    function = getattr(module, name, None)
    if not callable(function):
        found = ", ".join(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UsageError(f"reward {spec!r}: {file} has no function {name!r}", f"functions found: {found or 'none'}")
    return function


def parse_reward(spec: str) -> Reward:
    """One `--reward` value (with an optional `WEIGHT*` in front) as a Reward."""
    weight = 1.0
    weighted = WEIGHT.match(spec.strip())
    if weighted:
        weight, spec = float(weighted.group(1)), weighted.group(2)
    spec = spec.strip()
    if not spec:
        raise UsageError("empty --reward", "name a reward: exact, number, format, FILE.py:NAME, ...")
    if USER_FUNCTION.match(spec):
        return Reward(spec, weight, _user_function(spec))
    function, fields = _builtin(spec)
    return Reward(spec, weight, function, fields)


def parse_rewards(specs: list[str]) -> list[Reward]:
    if not specs:
        raise UsageError("no reward given", "pass --reward, e.g. --reward number --reward 0.5*format")
    return [parse_reward(spec) for spec in specs]


def reward_files(rewards: list[Reward]) -> list[str]:
    """The files the rewards read (user functions, JSON schemas), absolute: what every host of a data-parallel run
    must have at the same path (train/distributed.py's preflight checks them)."""
    files = []
    for reward in rewards:
        if USER_FUNCTION.match(reward.spec):
            files.append(reward.spec.rpartition(":")[0])
        elif reward.spec.startswith("json:"):
            files.append(reward.spec.partition(":")[2])
    return [str(Path(f).resolve()) for f in files]


def check_fields(rewards: list[Reward], records: list[dict], sources: list[str]) -> None:
    """Every field a built-in compares with is in every record (before any rollout)."""
    for reward in rewards:
        for field in reward.fields:
            for record, source in zip(records, sources):
                if record.get(field) is None:
                    keys = ", ".join(sorted(record)) or "none"
                    raise UsageError(f"{source}: reward {reward.spec!r} compares with field {field!r}, which this "
                                     f"record lacks (fields: {keys})", f"name another field, e.g. "
                                     f"{reward.spec.split(':')[0].split('@')[0]}:FIELD")


# ---------------------------------------------------------------------------------------------------------------
# Scoring


def _last_line(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def _raised_at(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


def _columns(records: list[dict]) -> dict[str, list]:
    names = list(dict.fromkeys(key for record in records for key in record))
    return {name: [record.get(name) for record in records] for name in names}


def _call(reward: Reward, prompts: list, completions: list, records: list[dict], sources: list[str]) -> list:
    try:
        values = reward.function(prompts, completions, **_columns(records))
    except Exception as exc:  # the reward's own bug or bad data: find the record that triggers it
        culprit, error = None, exc
        if len(completions) > 1:
            for row in range(len(completions)):
                try:
                    reward.function(prompts[row:row + 1], completions[row:row + 1], **_columns(records[row:row + 1]))
                except Exception as single:
                    culprit, error = row, single
                    break
        where = sources[culprit] if culprit is not None else _batch(sources)
        raise RewardError(f"reward {reward.spec} failed on {where}: {_last_line(error)}{_raised_at(error)}",
                          "fix the function or the record; the run resumes from its last checkpoint")
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward {reward.spec} returned {type(values).__name__} for {_batch(sources)}, not a "
                          "list", "return one float (or None) per completion")
    if len(values) != len(completions):
        raise RewardError(f"reward {reward.spec} returned {len(values)} values for {len(completions)} completions "
                          f"({_batch(sources)})", "return one float (or None) per completion, in order")
    out = []
    for value, source in zip(values, sources):
        if value is None:
            out.append(float("nan"))
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RewardError(f"reward {reward.spec} returned {value!r} on {source}",
                              "return a float (or None when the reward does not apply)")
        if not math.isfinite(number):
            raise RewardError(f"reward {reward.spec} returned {number} on {source}",
                              "return a finite float, or None when the reward does not apply")
        out.append(number)
    return out


def _batch(sources: list[str]) -> str:
    return sources[0] if len(set(sources)) == 1 else f"the batch of {len(sources)} completions from {sources[0]} on"


def score(rewards: list[Reward], prompts: list, completions: list, records: list[dict],
          sources: list[str]) -> RewardScores:
    """Every reward on every completion; `records` are each completion's record fields (its prompt's), `sources`
    their file:line."""
    values = np.array([_call(r, prompts, completions, records, sources) for r in rewards], dtype=np.float64)
    weights = np.array([r.weight for r in rewards])[:, None]
    total = np.nansum(values * weights, axis=0) if len(rewards) else np.zeros(len(completions))
    return RewardScores([r.spec for r in rewards], values.reshape(len(rewards), len(completions)), total)
