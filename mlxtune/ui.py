"""Consoles, progress bars and tables shared by every command.

Human output goes to stdout, or to stderr when `--json` reserves stdout for the machine-readable result.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

SPARK = "▁▂▃▄▅▆▇█"
GB = 10**9  # one meaning of GB everywhere (memory, sizes, limits): 10^9 bytes, as macOS reports memory


@contextlib.contextmanager
def quiet_stdout():
    """mlx-lm prints [INFO] lines on stdout; keep stdout clean for --json (MLXTUNE_VERBOSE=1 shows them)."""
    if os.environ.get("MLXTUNE_VERBOSE"):
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def make_console(json_mode: bool = False, quiet: bool = False) -> Console:
    # emoji=False: ":100:" in "file.jsonl:100:" is a line number, not 💯; user text is escape()d where printed.
    return Console(stderr=json_mode, quiet=quiet, highlight=False, soft_wrap=True, emoji=False)


def sparkline(values: list[float], width: int = 24) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)][-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * (len(SPARK) - 1) + 0.5))] for v in values)


def training_progress(console: Console):
    """The training loop's progress: a live bar on a terminal, a plain line per report in a log (nohup, `> log`, CI).

    Both take the same calls (`add_task`, `update`), so the loop doesn't care which it has."""
    if not console.is_terminal:
        return PlainProgress(console)
    compact = console.width < 110  # e.g. 80 columns: no bar, times first, metrics last (cut first if too long)
    return Progress(
        TextColumn("[bold]step[/] {task.completed}/{task.total}", table_column=Column(no_wrap=True, min_width=14)),
        *([] if compact else [BarColumn(bar_width=24)]),
        TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7)),
        TextColumn("ETA", table_column=Column(no_wrap=True, min_width=3)),
        TimeRemainingColumn(table_column=Column(no_wrap=True, min_width=7)),
        TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[speed]} tok/s  "
                   + ("{task.fields[memory]}" if compact else "mem {task.fields[memory]}  {task.fields[spark]}"),
                   table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        console=console,
        transient=False,
    )


class PlainProgress:
    """One plain line per step that brought news (a training report or a validation), with elapsed time and ETA."""

    def __init__(self, console: Console):
        self.console = console
        self.fields: dict = {}
        self.total = 0
        self.completed = 0
        self.started_at = self.start_step = None
        self.news = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: int, completed: int = 0, **fields) -> int:
        self.total, self.completed, self.fields = total, completed, dict(fields)
        self.started_at, self.start_step = time.monotonic(), completed
        return 0

    def update(self, task: int, completed: int | None = None, **fields) -> None:
        if fields:
            self.fields.update(fields)
            self.news = True
        if completed is not None:
            self.completed = completed
            if self.news:
                self.console.print(self.line(), markup=False, highlight=False, soft_wrap=True)
                self.news = False

    def line(self) -> str:
        elapsed = time.monotonic() - self.started_at
        done = self.completed - self.start_step
        eta = "—" if done <= 0 else fmt_duration(elapsed / done * (self.total - self.completed))
        f = self.fields
        return (f"step {self.completed}/{self.total}  loss {f.get('loss', '—')}  val {f.get('val', '—')}  "
                f"{f.get('speed', '—')} tok/s  mem {f.get('memory', '—')}  elapsed {fmt_duration(elapsed)}  "
                f"ETA {eta}")


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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


GROUP_SHOWN = 3  # lines shown per group of identical problems before "and N more like this"


def group_by(items: list, key) -> list[list]:
    """Items with the same key together, groups in first-seen order."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def grouped_lines(items: list[dict], key) -> list[tuple[list[dict], int]]:
    """Identical problems together: (the first few, how many more) per group, in first-seen order."""
    return [(g[:GROUP_SHOWN], len(g) - GROUP_SHOWN) for g in group_by(items, key)]


def print_data_problems(console: Console, problems: list[dict], warnings: list[dict]) -> None:
    """Errors and warnings of a data check, identical ones grouped: a 7,488-line flood becomes a few lines."""

    if problems:
        console.print(f"[red]{len(problems):,} problem(s)[/] (records that can't be trained on):")
        for shown, more in grouped_lines(problems, lambda p: (p.get("detail") or p["message"], p["hint"])):
            for problem in shown:
                console.print(f"  [red]error:[/] {escape(problem['message'])}")
            if more > 0:
                console.print(f"  [red]error:[/] … and {more:,} more like this")
            if shown[0]["hint"]:
                console.print(f"    [dim]hint: {escape(shown[0]['hint'])}[/]")
    if warnings:
        console.print(f"[yellow]{len(warnings):,} warning(s)[/] (records that would hurt the run):")
        for shown, more in grouped_lines(warnings, lambda w: w["code"]):
            for warning in shown:
                console.print(f"  [yellow]warning:[/] {escape(warning['where'])}: {escape(warning['message'])}")
            if more > 0:
                console.print(f"  [yellow]warning:[/] … and {more:,} more like this")


def print_data_report(console: Console, report, max_seq_length: int) -> None:
    from rich.text import Text

    table = Table(title=escape(f"{report.path} ({report.unit})"), title_justify="left")
    for column in ("split", "n", "min", "med", "p95", "max", "histogram", "sup", "dup", f">{max_seq_length}"):
        table.add_column(column, justify="left" if column in ("split", "histogram") else "right", no_wrap=True)
    for s in report.splits:
        share = "—" if s.supervised_share is None else f"{100 * s.supervised_share:.0f}%"
        over = str(s.over_max_length) if report.unit == "tokens" else "—"
        cap = report.measured_up_to  # a length measured only this far is a lower bound
        longest = f"≥{s.lengths['max']}" if cap and s.lengths["max"] >= cap else str(s.lengths["max"])
        table.add_row(s.split, str(s.records), str(s.lengths["min"]), f"{s.lengths['median']:.0f}",
                      f"{s.lengths['p95']:.0f}", longest, sparkline(s.histogram, 10),
                      share, str(s.duplicates), over)
    if report.splits:
        console.print(table)
        conventions = list(dict.fromkeys(s.convention or s.kind for s in report.splits))
        files = [f"{s.split}: {Path(s.file).name}" if s.file else f"{s.split}: held out from "
                 f"{Path(s.held_out_from).name}" for s in report.splits]
        console.print(escape(f"format: {', '.join(conventions)} · {' · '.join(files)}"))
        console.print("[dim]n records · lengths min/median/p95/max · sup = supervised share of tokens · "
                      "dup = repeats of an earlier record[/]")
    else:
        console.print(escape(f"{report.path}: no usable records"))
    if report.template:
        console.print(escape(f"template: {report.template_name}"))
    if report.context_length:
        console.print(f"model context: {report.context_length} tokens")
    if report.unit == "characters" and report.splits:
        console.print("lengths are in characters: pass --model to measure in tokens and see the supervised share")
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    # Piped or colourless, the highlight is lost: mark the supervised part in the text itself (wdiff's {+ +}).
    plain = console.no_color or not console.is_terminal
    for example in report.examples:
        console.rule(escape(example["source"]))
        text = Text()
        for piece, supervised in example["segments"]:
            if plain and supervised:
                text.append("{+" + piece + "+}")
            else:
                text.append(piece, style="bold green" if supervised else "dim")
        console.print(text)
    if report.examples:
        console.rule("{+ … +} = trained on (supervised), the rest is context only" if plain
                     else "[bold green]green[/] = trained on (supervised), dim = context only")
    print_data_problems(console, report.problems, report.warnings)
    if not report.problems and not report.warnings:
        console.print("[green]no problems found[/]")


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB", "TB"):  # decimal units: 1 GB = 10^9 bytes (GB above)
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def print_models_table(console: Console, entries) -> None:
    table = Table(title="model library", title_justify="left")
    longest = max(len(e.name) for e in entries)
    for column in ("name", "arch", "params", "quant", "size", "added"):
        table.add_column(column, no_wrap=True, min_width=longest if column == "name" else None)
    wide = console.width >= 110
    if wide:
        table.add_column("source", overflow="fold")
    for e in entries:
        row = [e.name, e.architecture, fmt_count(e.parameters), e.quantization_label, fmt_bytes(e.size_bytes),
               e.created[:10]]
        table.add_row(*row, *([_short_source(e.source)] if wide else []))
    console.print(table)
    if not wide:  # long paths would squeeze the table to nothing in a narrow terminal
        for e in entries:
            console.print(f"[dim]{e.name} ← {_short_source(e.source)}[/]")


def _short_source(source: str) -> str:
    home = str(Path.home())
    return "~" + source[len(home):] if source.startswith(home + "/") else source


def print_fuse_result(console: Console, result) -> None:
    quant = (f"{result.quantization['bits']}-bit, group {result.quantization['group_size']}"
             if result.quantization else "none")
    rows = [
        ("written to", escape(str(result.out))),
        ("quantization", quant),
        ("checked", f"{result.checked_tokens} held-out tokens"),
        ("merge check", f"max |Δ log-prob| {result.merge_diff:.2e} ≤ {result.tolerance:g} ✓  [dim](merged, before writing, "
                        "vs base+adapter)[/]"),
        *([("file check", f"max |Δ log-prob| {result.file_diff:.2e} ≤ {result.tolerance:g} ✓  [dim](read back vs "
                          f"as written, {result.stored_dtype})[/]")] if result.file_diff is not None else []),
        ("written vs base+adapter", f"max |Δ log-prob| {result.max_abs_diff:.2e} · mean KL {result.mean_kl:.2e} nats"
                                    + ("" if result.quantization or result.stored_dtype == "float32" else
                                       f"  [dim](rounding to {result.stored_dtype})[/]")),
        ({"valid": "validation loss", "chosen": "chosen-answer loss", "prompts": "prompt-text loss"}.get(
            result.loss_split, "train-data loss"),
         f"base {fmt_loss(result.loss_base)} · base+adapter {fmt_loss(result.loss_adapter)} · "
         f"fused {fmt_loss(result.loss_fused)}  [dim]({result.loss_examples} {result.loss_split} examples, "
         "as training measures it)[/]"),
        ("finetune kept", "—" if result.survival is None else f"{100 * result.survival:.1f}% of the loss gain"),
    ]
    console.print(summary_table("fuse", rows))
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")


def print_model_info(console: Console, info: dict) -> None:
    memory, quant = info["memory"], info["quantization"]
    assumed = memory["assumptions"]
    rows = [
        ("path", escape(str(info["path"]))),
        ("source", escape(str(info["source"]))),
        ("architecture", f"{info['architecture']} · {info['layers']} layers · hidden {info['hidden_size']} · "
                         f"{info['attention_heads']} heads ({info['kv_heads']} KV) · vocab {info['vocab_size']}"),
        ("context", str(info["context_length"])),
        ("quantization", f"{quant['bits']}-bit, group {quant['group_size']}" if quant else "none"),
        ("size on disk", fmt_bytes(info["size_bytes"])),
        ("chat template", "yes" if info["has_chat_template"] else "no (mlxtune's fallback template is used)"),
        ("inference needs", f"≈{fmt_bytes(memory['inference_bytes'])} at {assumed['context']} tokens of context"),
        ("LoRA needs", f"≈{fmt_bytes(memory['lora_bytes'])} (rank {assumed['rank']}, batch {assumed['batch_size']}"
                       f" × {assumed['seq_len']} tokens on the {assumed.get('device', 'cpu').upper()}; "
                       f"`mlxtune plan` for your data)"),
    ]
    console.print(summary_table(info["name"], rows))


class TrainingReporter:
    """What a training run tells the person watching it: notes, the run table, live progress, the summary.

    The loop calls these methods with plain values; `--json` sends all of it to stderr (see `make_console`)."""

    def __init__(self, console: Console):
        self.console = console
        self._progress: Progress | None = None
        self._task = None
        self._history: list[float] = []
        self._done = 0  # the last step finished
        self._val: tuple[float, int] | None = None  # the last validation loss and the step it was measured at

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]note:[/] {escape(text)}")

    def info(self, text: str) -> None:
        self.console.print(escape(text))

    def warning(self, text: str) -> None:
        self.console.print(f"[yellow]warning:[/] {escape(text)}")

    def data_problems(self, warnings: list[dict]) -> None:
        print_data_problems(self.console, [], warnings)

    def default_model(self, name: str, quantize: str) -> None:
        self.console.print(f"no --model given: using the default base model [cyan]{escape(name)}[/] "
                           f"({quantize}-bit, pulled once into the model library)")

    def start(self, method: str, model_path, run_dir) -> None:
        self.console.print(f"[bold]mlxtune[/] {method} · model [cyan]{escape(str(model_path))}[/] · "
                           f"run [cyan]{escape(str(run_dir))}[/]")

    def resumed(self, checkpoint_name: str, step: int, total_steps: int) -> None:
        self.console.print(escape(f"resuming from {checkpoint_name} (step {step} of {total_steps})"))

    def header(self, settings, *, data_kind: str, train_examples: int, valid_examples: int, template: str,
               data_warnings: str, trainable: int, total: int, steps: int, quantization: dict | None, loss_mode: str, batching: str,
               device: str, ranks: str | None = None) -> None:
        method = settings.method if not quantization or settings.method == "full" else f"Q{settings.method.upper()}"
        base = f" on a {quantization.get('bits')}-bit base" if quantization else ""
        targets = f", modules {','.join(settings.target_modules)}" if settings.target_modules else ""
        rows = [
            ("method", f"{method}{base} rank {settings.rank} alpha {settings.alpha:g} (scale {settings.scale:g})"
                       f"{targets}" if settings.method != "full" else f"full{base}"),
            ("trainable", f"{trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"),
            ("data", f"{data_kind}: {train_examples} train / {valid_examples} valid examples"),
            ("data warnings", data_warnings),
            ("template", template),
            ("steps", f"{steps} optimizer steps × {settings.grad_accumulation} micro-batch(es), "
                      f"lr {settings.learning_rate:g} {settings.schedule}"),
            ("batching", batching),
            ("loss", loss_mode),
            ("device", device),
        ]
        if ranks:  # a data-parallel run (train/distributed.py)
            rows.append(("ranks", ranks))
        self.console.print(summary_table("run", rows))

    def initial_validation(self, val: dict) -> None:
        if "reward" in val:  # grpo: the mean reward of greedy completions of the held-out prompts
            self.console.print(f"validation mean reward before training: {val['reward']:.3f}")
            return
        accuracy = f", preference accuracy {val['accuracy']:.3f}" if "accuracy" in val else ""
        self.console.print(f"validation loss before training: {fmt_loss(val['loss'])}{accuracy}")

    @contextlib.contextmanager
    def training(self, total_steps: int, start_step: int, val_loss: float | None):
        """Live progress (step, loss, validation loss, tokens/s, memory, sparkline, ETA) while the loop runs."""
        self._done = start_step
        self._val = None if val_loss is None else (val_loss, start_step)
        with training_progress(self.console) as progress:
            self._progress = progress
            self._task = progress.add_task("train", total=total_steps, completed=start_step, loss="—",
                                           val=fmt_loss(val_loss), speed="—", memory="—", spark="")
            try:
                yield self
            finally:
                self._progress = self._task = None

    def train_report(self, train_loss: float, tokens_per_second: float, peak_memory_gb: float,
                     note: str = "") -> None:
        self._history.append(train_loss)
        # A validation loss of an earlier step is shown with its step: it is not this step's measurement.
        shown = None if self._val is None else fmt_loss(self._val[0])
        val = {} if shown in (None, "—") else {"val": f"{shown} (step {self._val[1]})"}
        self._progress.update(self._task, loss=fmt_loss(train_loss) + (f" · {note}" if note else ""), speed=f"{tokens_per_second:.0f}",
                              memory=f"{peak_memory_gb:.2f}GB", spark=sparkline(self._history), **val)

    def val_report(self, val_loss: float) -> None:
        self._val = (val_loss, self._done + 1)  # measured during the step being run
        self._progress.update(self._task, val=fmt_loss(val_loss))

    def step_done(self, step: int) -> None:
        self._done = step
        self._progress.update(self._task, completed=step)

    def early_stop(self, patience: int, best_step: int | None, best_dir, watch: str = "loss") -> None:
        self.console.print(escape(f"early stop: no validation {watch} gain in {patience} evaluations; "
                                  f"best step {best_step} is in {best_dir}"))

    def interrupted(self, signal_name: str, step: int, run_dir, command: str = "lora") -> None:
        self.console.print(f"[yellow]{signal_name}:[/] " + escape(f"checkpoint saved at step {step}; "
                                                                 f"continue with: mlxtune {command} --resume {run_dir}"))

    def summary(self, result, adapter_file) -> None:
        rows = [
            ("steps", f"{result.steps}/{result.total_steps} ({result.stopped})"),
            ("val loss", f"{fmt_loss(result.initial_val_loss)} → {fmt_loss(result.final_val_loss)} "
                         f"(best {fmt_loss(result.best_val_loss)})"),
            ("train loss", fmt_loss(result.final_train_loss)),
            ("speed", f"{result.tokens_per_second or 0:.0f} tokens/s"),
            ("peak memory", f"{result.peak_memory_gb or 0:.2f} GB"),
            ("adapter", escape(str(adapter_file))),
        ]
        self.console.print(summary_table("result", rows))


def print_memory_plan(console: Console, report: dict) -> None:
    """`mlxtune plan`: verdict, what the estimate is made of, and the settings that fit."""
    gb = lambda value: "—" if value is None else f"{value:.2f} GB"  # noqa: E731
    settings = report["settings"]
    batch = report.get("worst_batch") or {}
    rows = [
        ("model", escape(str(report["model"]))),
        ("data", escape(str(report["data"]))),
        ("settings", ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)),
        ("largest batch", f"{batch.get('rows')} × {batch.get('length')} tokens" if batch else "—"),
        ("budget", f"{gb(report['budget_gb'])} ({report['budget_source']})"),
        ("estimated peak", f"{gb(report['estimate_gb'])} — "
                           + ("[green]fits[/]" if report["fits"] else "[red]does not fit[/]")),
    ]
    rows += [(f"  {name}", gb(value)) for name, value in report["parts_gb"].items() if value >= 0.0005]
    for name, phase in (report.get("phases") or {}).items():  # grpo: the step's peak is the larger phase
        shape = phase["worst_batch"]
        what = (f"{shape['rows']} samples × {shape['length']} tokens" if name == "rollout" else
                f"chunks of {shape['rows']} rows × {shape['length']} tokens")
        rows.append((f"{name} phase", f"{gb(phase['estimate_gb'])} ({what})"))
    timing = report.get("timing")
    if timing and timing.get("expected_seconds"):
        minutes = timing["expected_seconds"] / 60
        rows.append(("expected duration", f"≈{minutes:.0f} min for {timing['steps']} steps "
                                          f"({timing['tokens_per_second']:.0f} tokens/s measured)"))
    console.print(summary_table("memory plan", rows))
    if not report["fits"]:
        fits = report["suggested_fits"]
        console.print(("[green]settings that fit[/]" if fits else "[yellow]the closest this planner gets[/]")
                      + f" (≈{gb(report['suggested_estimate_gb'])}):")
        for reason in report["reasons"]:
            console.print(f"  {reason}")
        flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                         for k, v in report["suggested"].items() if k != "quantize")
        if flags:
            console.print(f"try: mlxtune {report.get('objective', 'lora')} ... {flags}")
