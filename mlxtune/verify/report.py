"""The views of a verify result: a terminal table (one row per hop, then what broke where) and the section of the
run's report.html. Both read the same per-hop figures, so they say the same thing."""

from __future__ import annotations

import html

from rich.markup import escape
from rich.table import Table

FEATURE_MARKS = {"same": "✓", "differs": "✗", "unsupported": "—"}


def _mark(ok: bool) -> str:
    return "[green]✓[/]" if ok else "[red]✗[/]"


def teacher_forced_text(hop: dict) -> tuple[str, str]:
    """(figures, thresholds) of a hop's teacher-forced comparison, as plain text."""
    forced, limits = hop.get("teacher_forced"), hop.get("thresholds") or {}
    if not forced or forced.get("agreement") is None:
        return ("— (same weights as the reference)" if hop["name"] == "serve" else "—"), ""
    figures = f"{forced['agreement']:.1%} · Δloss {forced['loss_delta']:+.1e}"
    if forced.get("kept") is not None:
        figures += f" · kept {forced['kept']:.0%}"
    wanted = [f"≥ {limits['agreement']:.0%}" if "agreement" in limits else "",
              f"≤ {limits['loss_delta']:g}" if "loss_delta" in limits else "",
              f"kept ≥ {limits['kept']:.0%}" if "kept" in limits else ""]
    return figures, ", ".join(w for w in wanted if w)


def greedy_text(hop: dict) -> tuple[str, str]:
    greedy, limits = hop["greedy"], hop.get("thresholds") or {}
    if not hop.get("thresholds"):
        return "—", ""
    return (f"{greedy['same']}/{greedy['probes']} same · {greedy['prefix']:.0%}",
            f"≥ {limits['greedy']:.0%}" if "greedy" in limits else "shown, not judged")


def features_text(hop: dict) -> str:
    """`tool call ✓ · thinking off —`: how the hop took each feature probe."""
    return " · ".join(f"{name} {FEATURE_MARKS[f['status']]}" for name, f in (hop.get("features") or {}).items())


def print_verify(console, result) -> None:
    eot = result.end_of_turn
    console.print(f"verify {escape(result.run)} ({result.checkpoint}) · template: {escape(result.template)} · "
                  f"end of turn {escape(repr(eot['text']))} · {len(result.probes)} probes", highlight=False)
    hops = [hop.to_dict() for hop in result.hops]
    with_features = any(hop["features"] for hop in hops)
    table = Table(show_lines=False)
    for column in ("hop", "template", "rendering", "stops", "teacher-forced", "greedy",
                   *(["tools / thinking"] if with_features else []), ""):
        table.add_column(column)
    for hop in hops:
        cells = []
        for figures, limits in (teacher_forced_text(hop), greedy_text(hop)):
            cells.append(escape(figures) + (f"\n[dim]({escape(limits)})[/]" if limits else ""))
        table.add_row(
            escape(hop["name"]), escape(hop["template"].replace("mlxtune's fallback template", "fallback")),
            _mark(hop["rendering"]["ok"]), _mark(hop["stopping"]["ok"]), *cells,
            *([escape(features_text(hop))] if with_features else []),
            "[green]pass[/]" if hop["ok"] else "[red]FAIL[/]")
    console.print(table)
    for hop in result.hops:
        for name, feature in hop.features.items():
            if feature["status"] == "unsupported":
                console.print(f"[dim]{escape(hop.name)}: {escape(name)} not taken: {escape(feature['detail'])}[/]",
                              highlight=False)
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
    console.print(("[green]" if result.ok else "[red]") + escape(verdict(result.to_dict())) + "[/]")
    console.print(f"written: {escape(result.files['verify'])}", highlight=False)


def verdict(data: dict) -> str:
    broken = [hop["name"] for hop in data["hops"] if not hop["ok"]]
    if not broken:
        return "every hop renders, stops and answers like base + adapter"
    return f"{len(broken)} of {len(data['hops'])} hops broken: {', '.join(broken)}"


def verify_html(data: dict) -> str:
    """report.html's section: the verify.json of the run, one row per hop, then each problem."""
    e = html.escape
    with_features = any(hop.get("features") for hop in data["hops"])
    rows = []
    for hop in data["hops"]:
        cells = [e(hop["name"]), e(hop["template"]), "✓" if hop["rendering"]["ok"] else "✗",
                 "✓" if hop["stopping"]["ok"] else "✗"]
        for figures, limits in (teacher_forced_text(hop), greedy_text(hop)):
            cells.append(e(figures) + (f"<br><span class=meta>({e(limits)})</span>" if limits else ""))
        if with_features:
            cells.append(e(features_text(hop)))
        cells.append("<span class=pass>pass</span>" if hop["ok"] else "<span class=fail>FAIL</span>")
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    problems = "".join(f"<li><strong>{e(hop['name'])}</strong>: {e(problem)}</li>"
                       for hop in data["hops"] for problem in hop["problems"])
    notes = "".join(f"<li>{e(hop['name'])}: {e(name)} not taken: {e(f['detail'])}</li>"
                    for hop in data["hops"] for name, f in (hop.get("features") or {}).items()
                    if f["status"] == "unsupported")
    head = ["hop", "template", "rendering", "stops", "teacher-forced", "greedy",
            *(["tools / thinking"] if with_features else []), ""]
    eot = data["end_of_turn"]
    return (f"<h2 id=verify>Round trip (verify)</h2>"
            f"<p class=meta>{e(data['created'])} · checkpoint {e(data['checkpoint'])} · template "
            f"{e(data['template'])} · end of turn {e(repr(eot['text']))} · {len(data['probes'])} probes</p>"
            f"<div class=\"verdict {'better' if data['ok'] else 'worse'}\"><p><strong>{e(verdict(data))}"
            f"</strong></p></div>"
            f"<table id=verify-hops><thead><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
            + (f"<ul id=verify-problems>{problems}</ul>" if problems else "")
            + (f"<ul class=meta>{notes}</ul>" if notes else "")
            + "<p class=meta>Teacher-forced: the hop's top token equals the reference's on the reference answers; "
              "Δloss in nats per supervised token; kept: the share of the finetune's loss gain the hop keeps. "
              "Greedy: replies identical to base + adapter's, and the mean share reproduced before parting.</p>")
