"""Errors a user can cause, each with a message and a hint.

The CLI turns them into exit codes in exactly one place: `UsageError` (bad input) → 2, `RunFailed` → 1.
"""

from __future__ import annotations


class MlxtuneError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(MlxtuneError):
    """The user's input (a path, a file, a flag) is wrong; nothing was run."""

    exit_code = 2


class RunFailed(MlxtuneError):
    """The input was fine but the run could not complete (e.g. the loss diverged)."""

    exit_code = 1
