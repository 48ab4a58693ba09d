"""report.html: one self-contained page (no network: charts are inline SVG drawn by matplotlib, styles inline).

A small inline script records, once the page is laid out, how many charts and table rows the browser actually
rendered (`data-charts-rendered`, `data-table-rows` on <body>), so a headless browser's DOM dump can prove it.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

from mlxtune.eval.stats import format_interval
from mlxtune.eval.summary import overlap_line
from mlxtune.train.checkpoint import atomic_write_text

BASE_COLOUR = "#8c8c8c"
TUNED_COLOUR = "#1f77b4"

STYLE = """
body { font: 15px/1.45 -apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #666; font-size: 0.9em; }
.verdict { padding: 0.8em 1em; border-radius: 6px; background: #f3f6fa; border-left: 5px solid #999; }
.verdict.better { background: #eef8ee; border-color: #2e7d32; } .verdict.worse { background: #fbeeee; border-color: #c62828; }
table { border-collapse: collapse; width: 100%; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; } figure.chart { margin: 0; flex: 1 1 480px; }
figure.chart svg { width: 100%; height: auto; }
pre { white-space: pre-wrap; margin: 0; font: 13px/1.35 ui-monospace, Menlo, Consolas, monospace; }
.hit { background: #eef8ee; }
.pass { color: #2e7d32; font-weight: 600; } .fail { color: #c62828; font-weight: 600; }
"""

SCRIPT = """
window.addEventListener('load', function () {
  var charts = Array.prototype.filter.call(document.querySelectorAll('figure.chart svg'), function (svg) {
    var box = svg.getBoundingClientRect(); return box.width > 100 && box.height > 100;
  }).length;
  var rows = Array.prototype.filter.call(document.querySelectorAll('#comparison tbody tr'), function (row) {
    return row.getBoundingClientRect().height > 0;
  }).length;
  document.body.setAttribute('data-charts-rendered', String(charts));
  document.body.setAttribute('data-table-rows', String(rows));
});
"""


def _svg(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "mlxtune"  # stable ids: the same result gives the same file
    return plt


def loss_curve_chart(curves: dict, loss: dict) -> str | None:
    plt = _pyplot()
    if not curves.get("train") and not curves.get("valid"):
        return None
    figure, axes = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    if curves.get("train"):
        axes.plot(*zip(*curves["train"]), label="train", color=TUNED_COLOUR, alpha=0.8)
    if curves.get("valid"):
        axes.plot(*zip(*curves["valid"]), label="validation", color="#d62728", marker="o", markersize=3)
    for name, colour, style in (("base", BASE_COLOUR, "--"), ("tuned", TUNED_COLOUR, ":")):
        axes.axhline(loss[name]["value"], color=colour, linestyle=style, label=f"eval: {name}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats / supervised token)")
    axes.set_title("training run")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _svg(figure)


def _bars(axes, values: dict, scale: float, ylabel: str, title: str):
    names = ["base", "tuned"]
    heights = [values[n]["value"] * scale for n in names]
    errors = [[(values[n]["value"] - values[n]["low"]) * scale for n in names],
              [(values[n]["high"] - values[n]["value"]) * scale for n in names]]
    axes.bar(names, heights, yerr=errors, capsize=8, color=[BASE_COLOUR, TUNED_COLOUR])
    for x, height in enumerate(heights):
        axes.annotate(f"{height:.3g}", (x, height), textcoords="offset points", xytext=(14, 3), fontsize=9)
    axes.set_ylabel(ylabel)
    if scale == 100.0:
        axes.set_ylim(0, 105)
    axes.set_title(title)
    axes.grid(alpha=0.3, axis="y")


def comparison_chart(loss: dict | None, task: dict | None) -> str:
    plt = _pyplot()
    if loss is None:  # a GRPO run: the mean reward alone, on its own scale
        figure, axes = plt.subplots(figsize=(4.6, 3.8), dpi=100)
        _bars(axes, task, 1.0, task["metric"], f"{task['metric']} (95% CI)")
        figure.tight_layout()
        return _svg(figure)
    panels = 2 if task else 1
    figure, axes_list = plt.subplots(1, panels, figsize=(3.4 * panels + 1.2, 3.8), dpi=100, squeeze=False)
    bars = _bars
    bars(axes_list[0][0], loss, 1.0, "nats / supervised token", "loss (95% CI)")
    if task:
        bars(axes_list[0][1], task, 100.0, "% of examples", f"{task['metric']} (95% CI)")
    figure.tight_layout()
    return _svg(figure)


def _comparison_rows(result) -> list[tuple[str, str, str, str]]:
    loss, ppl = result.loss, result.perplexity
    fmt = format_interval
    if loss is None:  # a GRPO run: the mean reward (not a share of examples)
        task = result.task
        return [(f"{task['metric']} ({task['examples']} prompts)", fmt(task["base"]), fmt(task["tuned"]),
                 fmt(task["difference"], signed=True))] + [
            (f"  {name}", fmt(each["base"]), fmt(each["tuned"]), fmt(each["difference"], signed=True))
            for name, each in task.get("rewards", {}).items()]
    rows = [("loss (nats/token)", fmt(loss["base"]), fmt(loss["tuned"]), fmt(loss["difference"], signed=True)),
            ("perplexity", fmt(ppl["base"], digits=2), fmt(ppl["tuned"], digits=2), "")]
    if result.task:
        task = result.task
        rows.append((f"{task['metric']} (% of {task['examples']})", fmt(task["base"], 100, 1),
                     fmt(task["tuned"], 100, 1), fmt(task["difference"], 100, 1, signed=True)))
    return rows


def _verify_section(run: str) -> str:
    """The run's verify.json (`mlxtune verify`, `export --verify`) as a section, when there is one."""
    import json

    from mlxtune.runs import VERIFY_FILE
    from mlxtune.verify.report import verify_html

    path = Path(run) / VERIFY_FILE
    if not path.is_file():
        return ""
    try:
        return verify_html(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError):
        return "<h2>Round trip (verify)</h2><p class=meta>verify.json is unreadable: run mlxtune verify again.</p>"


def render_report(result) -> str:
    e = html.escape
    verdict = result.verdict
    klass = "better" if verdict.get("better") else "worse" if verdict.get("worse") else ""
    charts = [comparison_chart(result.loss, result.task)]
    curve = loss_curve_chart(result.curves, result.loss) if result.loss is not None else None
    if curve:
        charts.append(curve)
    table_rows = "".join(
        f"<tr><th>{e(name)}</th><td class=num>{e(base)}</td><td class=num>{e(tuned)}</td><td class=num>{e(diff)}</td></tr>"
        for name, base, tuned, diff in _comparison_rows(result))
    samples = ""
    if result.samples:
        rewarded = "tuned_reward" in result.samples[0]  # a GRPO run: each completion with its reward

        def answer(sample, k):  # a model's cell: marked when it scored (GRPO) or equals the reference
            text = sample[k] or ""
            if rewarded:
                hit, note = sample[k + "_reward"] > 0, f"<span class=num>reward {sample[k + '_reward']:.3g}</span>"
            else:
                hit, note = text.strip() == (sample["reference"] or "").strip(), ""
            return f"<td class=\"{'hit' if hit else ''}\"><pre>{e(text)}</pre>{note}</td>"

        sample_rows = "".join(
            "<tr>" + "".join(f"<td><pre>{e(sample[k] or '')}</pre></td>" for k in ("prompt", "reference"))
            + "".join(answer(sample, k) for k in ("base", "tuned")) + "</tr>" for sample in result.samples)
        title, reference = (("Samples (each prompt's first completion, sampled at the run's temperature)", "answer")
                            if rewarded else ("Samples (greedy)", "reference"))
        samples = (f"<h2>{title}</h2><table id=samples><thead><tr><th>prompt</th><th>{reference}</th>"
                   f"<th>base</th><th>tuned</th></tr></thead><tbody>{sample_rows}</tbody></table>")
    task_line = f"<p>{e(verdict['task_text'])}</p>" if verdict.get("task_text") else ""
    overlap = f"<p id=overlap>{e(overlap_line(result.overlap, result.examples))}</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mlxtune eval — {e(Path(result.run).name)}</title>
<style>{STYLE}</style></head>
<body>
<h1>Did it help? {e(Path(result.run).name)}</h1>
<p class=meta>run {e(result.run)} · checkpoint {e(result.checkpoint)} · data {e(result.data)} ({e(result.split)},
{result.examples} examples, {result.supervised_tokens} supervised tokens) · {e(result.created)}</p>
<div class="verdict {klass}"><p><strong>{e(verdict['text'])}</strong></p>{task_line}{overlap}</div>
<h2>Base vs tuned</h2>
<table id=comparison><thead><tr><th></th><th>base</th><th>tuned</th><th>tuned − base</th></tr></thead>
<tbody>{table_rows}</tbody></table>
<p class=meta>Values with 95% bootstrap intervals over examples ({e('paired')} for the difference).</p>
<div class=charts>{''.join(f'<figure class=chart>{chart}</figure>' for chart in charts)}</div>
{samples}
{_verify_section(result.run)}
<script>{SCRIPT}</script>
</body></html>
"""


def write_report(result, path: Path) -> Path:
    atomic_write_text(path, render_report(result))
    return path

