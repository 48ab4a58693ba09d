"""The terminal view of a verify result: one row per hop, then what broke where."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table


def _mark(ok: bool) -> str:
    return "[green]✓[/]" if ok else "[red]✗[/]"


def _teacher_forced(hop) -> str:
    forced = hop.teacher_forced
    if not forced or forced.get("agreement") is None:
        return "— (same weights as the reference)" if hop.name == "serve" else "—"
    return (f"{forced['agreement']:.1%} · Δloss {forced['loss_delta']:+.1e}\n"
            f"[dim](≥ {hop.thresholds['agreement']:.0%}, ≤ {hop.thresholds['loss_delta']:g})[/]")


def print_verify(console, result) -> None:
    eot = result.end_of_turn
    console.print(f"verify {escape(result.run)} ({result.checkpoint}) · template: {escape(result.template)} · "
                  f"end of turn {escape(repr(eot['text']))} · {len(result.probes)} probes", highlight=False)
    table = Table(show_lines=False)
    for column in ("hop", "template", "rendering", "stops", "teacher-forced", "greedy", ""):
        table.add_column(column)
    for hop in result.hops:
        greedy = hop.greedy
        table.add_row(
            escape(hop.name), escape(hop.template.replace("mlxtune's fallback template", "fallback")),
            _mark(hop.rendering["ok"]), _mark(hop.stopping["ok"]),
            _teacher_forced(hop),
            (f"{greedy['same']}/{greedy['probes']} same · {greedy['prefix']:.0%}\n"
             f"[dim](≥ {hop.thresholds['greedy']:.0%})[/]") if hop.thresholds else "—",
            "[green]pass[/]" if hop.ok else "[red]FAIL[/]")
    console.print(table)
    for hop in result.hops:
        for problem in hop.problems:
            console.print(f"[red]{escape(hop.name)}[/]: {escape(problem)}", highlight=False)
        difference = hop.rendering.get("difference")
        if difference and "diff" in difference:
            console.print(f"  first difference at character {difference['position']}:\n"
                          f"    training {escape(repr(difference['training']))}\n"
                          f"    hop      {escape(repr(difference['hop']))}", highlight=False)
        parted = hop.greedy.get("first_divergence")
        if parted and not hop.ok:
            at = f"token {parted['token']}" if "token" in parted else f"character {parted['char']}"
            console.print(f"  greedy replies part on {escape(parted['probe'])} at {at} after "
                          f"{escape(repr(parted['agreed']))}: reference {escape(repr(parted['reference']))}, "
                          f"hop {escape(repr(parted['hop']))}", highlight=False)
    verdict = "every hop renders, stops and answers like base + adapter" if result.ok else \
        f"{sum(not h.ok for h in result.hops)} of {len(result.hops)} hops broken"
    console.print(("[green]" if result.ok else "[red]") + escape(verdict) + "[/]")
    console.print(f"written: {escape(result.files['verify'])}", highlight=False)
