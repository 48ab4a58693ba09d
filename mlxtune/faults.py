"""Test-only fault injection: `MLXTUNE_FAULT=NAME[:N[:SIGNAL]]` sends this process SIGKILL (or SIGNAL, e.g. INT;
with `raise`, raises `InjectedFault` there instead) the Nth time (default: the first) it reaches the point NAME. The
reliability suite uses it to kill inside a checkpoint write, an evaluation or a fuse at exactly the moment it wants,
and to make a `serve` generation fail (docs/RELIABILITY.md lists the points). Unset, it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "MLXTUNE_FAULT"
POINTS = ("checkpoint.adapter", "checkpoint.optimizer", "checkpoint.manifest", "checkpoint.rename",
          "checkpoint.latest", "eval.batch", "train.step", "fuse.saved", "export.written", "serve.token")
_reached: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """What `raise` injects: an error where the code never expects one (e.g. inside a generation)."""


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    nth, _, sig = rest.partition(":")
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        if sig == "raise":
            raise InjectedFault(f"fault injected at {name}")
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}") if sig else signal.SIGKILL)
