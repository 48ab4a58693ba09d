"""The terminal answer to "did it help?": a table with intervals and one plain sentence."""

from __future__ import annotations


from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlxtune.eval.stats import format_interval


def _interval(values: dict, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    return format_interval(values, scale, digits, signed, markup=("[dim]", "[/]"))


def print_summary(console: Console, result) -> None:
    table = Table(title=escape(f"base vs tuned · {result.split} · {result.examples} examples of {result.data}"),
                  title_justify="left")
    table.add_column("")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    table.add_column("tuned − base", justify="right")
    if result.loss is not None:  # a GRPO run has no reference answers: its task (mean reward) is the comparison
        table.add_row("loss (nats/token)", _interval(result.loss["base"]), _interval(result.loss["tuned"]),
                      _interval(result.loss["difference"], signed=True))
        table.add_row("perplexity", _interval(result.perplexity["base"], digits=2),
                      _interval(result.perplexity["tuned"], digits=2), "")
    if result.task and result.kind == "prompts":
        task = result.task
        table.add_row(escape(task["metric"]), _interval(task["base"]), _interval(task["tuned"]),
                      _interval(task["difference"], signed=True))
        for name, each in task.get("rewards", {}).items():  # each reward alone, unweighted, with its own interval
            table.add_row(escape(f"  {name}"), _interval(each["base"]), _interval(each["tuned"]),
                          _interval(each["difference"], signed=True))
    elif result.task:
        task = result.task
        table.add_row(escape(f"{task['metric']} %"), _interval(task["base"], 100, 1), _interval(task["tuned"], 100, 1),
                      _interval(task["difference"], 100, 1, signed=True))
    console.print(table)
    console.print("[dim]95% bootstrap intervals over examples; the difference is paired (same examples).[/]")
    verdict = result.verdict
    colour = "green" if verdict["better"] else "red" if verdict["worse"] else "yellow"
    console.print(f"[bold {colour}]{escape(verdict['text'])}[/]")
    if verdict.get("task_text"):
        console.print(escape(verdict["task_text"]))
    console.print(overlap_line(result.overlap, result.examples), markup=False)
    for number, sample in enumerate(result.samples[:3], start=1):
        rewards = ("tuned_reward" in sample and
                   (f" (reward {sample['base_reward']:.3g})", f" (reward {sample['tuned_reward']:.3g})")) or ("", "")
        console.print(f"[dim]sample {number}[/] " + escape(f"reference: {sample['reference']!r}\n"
                      f"          base:      {sample['base']!r}{rewards[0]}\n"
                      f"          tuned:     {sample['tuned']!r}{rewards[1]}"))
    console.print(escape(f"written: {result.files['eval']}, {result.files['report']}"))


def overlap_line(overlap: dict | None, examples: int) -> str:
    """One sentence on whether the scored examples were trained on (terminal and report say the same)."""
    if overlap is None:
        return "overlap with the training data: not checked (preference pairs, RL prompts, or the run's data is gone)"
    if not overlap["examples"]:
        return f"overlap with the training data: none of the {examples} scored examples was trained on"
    shown = ", ".join(overlap["sources"][:5]) + (" …" if overlap["examples"] > 5 else "")
    return (f"overlap with the training data: {overlap['examples']} of {examples} scored examples were trained on "
            f"(same content): {shown}")
