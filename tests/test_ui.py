"""Training progress as people see it: a live line that keeps its ETA in an 80-column terminal, and plain lines (one
per report, with elapsed time and ETA) when the output goes to a log."""

from __future__ import annotations

import json
import io
import re
import time

from rich.console import Console

from mlxtune.ui import sparkline, training_progress

FIELDS = {"loss": "—", "val": "5.711", "speed": "—", "memory": "—", "spark": ""}
REPORT = {"loss": "2.916", "speed": "1238", "memory": "0.10GB", "spark": sparkline([3.0, 2.0, 1.0])}


def _train(console: Console, total: int, steps: int, report_every: int = 1) -> str:
    with training_progress(console) as progress:
        task = progress.add_task("train", total=total, completed=0, **FIELDS)
        for step in range(1, steps + 1):
            time.sleep(0.05)  # the ETA needs measured steps
            if step % report_every == 0:
                progress.update(task, **REPORT)
            if step == 4:
                progress.update(task, val="2.799")
            progress.update(task, completed=step)
    return console.file.getvalue()


def _last_frame(output: str) -> str:
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", output).replace("\r", "\n").splitlines()
    return [frame for frame in frames if frame.strip()][-1]


def test_live_line_keeps_the_eta_readable_in_80_columns():
    for width in (80, 120):
        console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
        frame = _last_frame(_train(console, total=1200, steps=3))
        assert len(frame) <= width
        assert re.search(r"step 3/1200 .*\d:\d\d:\d\d ETA \d:\d\d:\d\d loss 2\.916", frame), frame
        assert "…" not in frame.split("loss")[0], frame  # only the metrics may be cut, never the times


def test_plain_lines_when_output_is_not_a_terminal():
    console = Console(file=io.StringIO(), width=80)  # a file: `> log`, nohup, CI
    lines = _train(console, total=120, steps=6, report_every=2).splitlines()
    assert len(lines) == 3, lines  # one per step with news: reports at 2, 4 (with a validation too) and 6
    pattern = (r"^step (\d+)/120  loss 2\.916  val (\S+)  1238 tok/s  mem 0\.10GB  elapsed \d:\d\d:\d\d  "
               r"ETA \d:\d\d:\d\d$")
    parsed = [re.match(pattern, line) for line in lines]
    assert all(parsed), lines
    assert [(m.group(1), m.group(2)) for m in parsed] == [("2", "5.711"), ("4", "2.799"), ("6", "2.799")]
    assert "\x1b" not in "".join(lines) and "━" not in "".join(lines)


def test_a_repeated_validation_loss_is_marked_with_the_step_it_was_measured_at():
    from mlxtune.ui import TrainingReporter

    reporter = TrainingReporter(Console(file=io.StringIO(), width=200))  # a log: one line per step with news
    with reporter.training(total_steps=6, start_step=0, val_loss=5.711):
        for step in range(1, 7):
            if step % 2 == 0:
                reporter.train_report(2.5, 1000.0, 0.1)
            if step == 4:
                reporter.val_report(2.799)
            reporter.step_done(step)
    vals = re.findall(r"val (\S+(?: \(step \d+\))?)  ", reporter.console.file.getvalue())
    assert vals == ["5.711 (step 0)", "2.799", "2.799 (step 4)"]


def test_user_text_is_printed_as_it_is_never_as_markup_or_emoji(tmp_path):
    from conftest import run_cli

    data = tmp_path / "file[bold].jsonl"
    lines = [json.dumps({"text": f"record {n}"}) for n in range(99)] + ['{"text": "[red]broken']
    data.write_text("\n".join(lines) + "\n")
    result = run_cli("data", "check", data)
    assert f"{data}:100: invalid JSON" in result.stdout + result.stderr  # not file[bold].jsonl💯
    from mlxtune.ui import TrainingReporter, make_console

    console = make_console()
    console.file = io.StringIO()
    TrainingReporter(console).note("held out 9 of 91 records from data:1234:[bold]x[/bold].jsonl")
    assert console.file.getvalue() == "note: held out 9 of 91 records from data:1234:[bold]x[/bold].jsonl\n"


def test_a_huge_perplexity_reads_as_a_number():
    from mlxtune.eval.stats import format_interval

    assert format_interval({"value": 6477956970.09, "low": 1.2e9, "high": 3.5e10}, digits=2) == \
        "6.48e+09 [1.2e+09, 3.5e+10]"
    assert format_interval({"value": 12.3456, "low": 11.0, "high": 13.5}, digits=2) == "12.35 [11.00, 13.50]"
