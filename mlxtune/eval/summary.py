"""The terminal answer to "did it help?": a table with intervals and one plain sentence."""

from __future__ import annotations


from rich.console import Console
from rich.table import Table

from mlxtune.eval.stats import format_interval


def _interval(values: dict, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    return format_interval(values, scale, digits, signed, markup=("[dim]", "[/]"))


def print_summary(console: Console, result) -> None:
    table = Table(title=f"base vs tuned · {result.examples} {result.split} examples of {result.data}",
                  title_justify="left")
    table.add_column("")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    table.add_column("tuned − base", justify="right")
    table.add_row("loss (nats/token)", _interval(result.loss["base"]), _interval(result.loss["tuned"]),
                  _interval(result.loss["difference"], signed=True))
    table.add_row("perplexity", _interval(result.perplexity["base"], digits=2),
                  _interval(result.perplexity["tuned"], digits=2), "")
    if result.task:
        task = result.task
        table.add_row(f"{task['metric']} %", _interval(task["base"], 100, 1), _interval(task["tuned"], 100, 1),
                      _interval(task["difference"], 100, 1, signed=True))
    console.print(table)
    console.print("[dim]95% bootstrap intervals over examples; the difference is paired (same examples).[/]")
    verdict = result.verdict
    colour = "green" if verdict["better"] else "red" if verdict["worse"] else "yellow"
    console.print(f"[bold {colour}]{verdict['text']}[/]")
    if verdict.get("task_text"):
        console.print(verdict["task_text"])
    for number, sample in enumerate(result.samples[:3], start=1):
        console.print(f"[dim]sample {number}[/] reference: {sample['reference']!r}\n"
                      f"          base:      {sample['base']!r}\n          tuned:     {sample['tuned']!r}")
    console.print(f"written: {result.files['eval']}, {result.files['report']}")
