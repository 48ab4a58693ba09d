"""Consoles, progress bars and tables shared by every command.

Human output goes to stdout, or to stderr when `--json` reserves stdout for the machine-readable result.
"""

from __future__ import annotations

import json
import math
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

SPARK = "▁▂▃▄▅▆▇█"


def make_console(json_mode: bool = False, quiet: bool = False) -> Console:
    return Console(stderr=json_mode, quiet=quiet, highlight=False, soft_wrap=True)


def sparkline(values: list[float], width: int = 24) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)][-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * (len(SPARK) - 1) + 0.5))] for v in values)


def training_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]step[/] {task.completed}/{task.total}"),
        BarColumn(bar_width=24),
        TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[speed]} tok/s  "
                   "mem {task.fields[memory]}  {task.fields[spark]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def step_progress(console: Console, description: str) -> Progress:
    return Progress(
        TextColumn(description),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def print_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fmt_loss(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.3f}"
