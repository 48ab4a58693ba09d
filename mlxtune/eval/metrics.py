"""Task metrics on generations: exact match after normalising whitespace, containment, or a regex-extracted answer."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlxtune.errors import UsageError


def normalise(text: str) -> str:
    """Runs of whitespace become one space; ends trimmed."""
    return " ".join(text.split())


@dataclass(frozen=True)
class Metric:
    name: str  # exact | contains | regex
    pattern: re.Pattern | None = None

    @property
    def label(self) -> str:
        return f"regex:{self.pattern.pattern}" if self.pattern is not None else self.name

    def extract(self, text: str) -> str | None:
        """The answer in `text`: the regex's first group (or whole match), None if it doesn't match."""
        if self.pattern is None:
            return normalise(text)
        match = self.pattern.search(text)
        if match is None:
            return None
        return normalise(match.group(1) if match.groups() else match.group(0))

    def score(self, generation: str, reference: str) -> float:
        if self.name == "contains":
            return float(normalise(reference) in normalise(generation))
        expected = self.extract(reference)
        if expected is None:  # the reference itself has no answer the regex can find: count it as a miss
            return 0.0
        return float(self.extract(generation) == expected)


def parse_metric(spec: str) -> Metric:
    """`exact`, `contains` or `regex:PATTERN` (PATTERN's first group is the answer when it has one)."""
    if spec in ("exact", "contains"):
        return Metric(spec)
    if spec.startswith("regex:"):
        try:
            return Metric("regex", re.compile(spec.removeprefix("regex:")))
        except re.error as exc:
            raise UsageError(f"bad --metric regex: {exc}", r"e.g. --metric 'regex:####\s*(-?[\d.,]+)'") from None
    raise UsageError(f"unknown metric {spec!r}", "use exact, contains or regex:PATTERN")
