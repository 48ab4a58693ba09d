"""The memory budget a run may use, in the one unit shown to users (GB = 10^9 bytes).

`--memory` parsed (`parse_memory`), or what this machine can give (`machine_budget`): `memory_budget` decides.
"""

from __future__ import annotations

import os
import re

from mlxtune.errors import UsageError
from mlxtune.ui import GB  # the one unit shown to users: 10^9 bytes

LARGEST_BUDGET = 2048 * GB  # beyond any Mac: a typo, not a budget
MACHINE_RESERVE = 0.2  # of RAM left to the OS and other programs when there is no Metal working-set figure
MIN_RESERVE = 2 * GB


def fmt_gb(n_bytes: float | None, digits: int = 2) -> str:
    return "—" if n_bytes is None else f"{n_bytes / GB:.{digits}f} GB"


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": GB, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": GB, "gb": GB, "t": 10**12,
          "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
          "ti": 2**40, "tib": 2**40}


def parse_memory(text: str | int | float) -> int:
    """Bytes of a budget such as `16GB`, `16`, `12.5 GB`, `800MB` or `16GiB` (a bare number means GB)."""
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"--memory {text!r} is not an amount of memory",
                         "give a size such as --memory 16GB or --memory 8 (GB = 10^9 bytes)")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if value <= 0:
        raise UsageError(f"--memory {text} leaves nothing to train in",
                         "give the memory the run may use, e.g. --memory 16GB (omit it to use this machine's)")
    if value > LARGEST_BUDGET:
        raise UsageError(f"--memory {text} is more than any machine mlxtune runs on ({fmt_gb(LARGEST_BUDGET, 0)})",
                         "give the memory the run may use, e.g. --memory 64GB")
    return int(value)


def _total_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_budget() -> tuple[int, str]:
    """(bytes, where from) that this machine can give a training run.

    With Metal: the GPU's recommended working set (`mx.device_info()`), the most macOS lets the GPU keep resident
    without paging. Elsewhere: total RAM minus a reserve for the OS and other programs (20%, at least 2 GB).
    """
    import mlx.core as mx

    if mx.metal.is_available():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        size = int(info.get("max_recommended_working_set_size", 0))
        if size:
            return size, "Metal's recommended working set"
    ram = _total_ram()
    if not ram:
        return 8 * GB, "assumed 8 GB (this system doesn't report its RAM)"
    reserve = max(MIN_RESERVE, int(MACHINE_RESERVE * ram))
    return max(ram - reserve, ram // 2), f"{fmt_gb(ram, 1)} RAM minus {fmt_gb(reserve, 1)} for the system"


def memory_budget(memory: str | None) -> tuple[int, str]:
    """(bytes, source) of the budget: `--memory` when given, else what this machine can give."""
    if memory is not None and str(memory).strip() != "":
        return parse_memory(memory), "--memory"
    return machine_budget()
