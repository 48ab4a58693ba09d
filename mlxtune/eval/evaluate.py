"""`mlxtune eval`: did the finetune help? Base vs tuned on held-out data, with intervals that say whether it's noise."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mlxtune.inference import encode_messages, prompt_format
from mlxtune.errors import UsageError
from mlxtune.eval.cases import EvalData, load_cases
from mlxtune.eval.metrics import Metric, parse_metric
from mlxtune.eval.preference import preference_scores
from mlxtune.eval.rewards import reward_scores
from mlxtune.eval.scoring import example_losses, greedy_batch, tokens_containing
from mlxtune.eval.stats import Interval, exp_interval, mean_interval, paired_ratio_difference, ratio_interval
from mlxtune.runs import EVAL_FILE, EVAL_REPORT_FILE, METRICS_FILE, open_for_inference, open_run
from mlxtune.train.checkpoint import atomic_write_text
from mlxtune.train.metrics import read_metrics
from mlxtune.ui import quiet_stdout

MAX_NEW_TOKENS = 256


@dataclass
class ModelScores:
    loss: Interval
    perplexity: Interval
    task: Interval | None
    generations: list[str]
    loss_sums: list[float]
    loss_counts: list[int]


@dataclass
class EvalResult:
    run: str
    checkpoint: str
    data: str
    split: str
    kind: str
    examples: int
    supervised_tokens: int
    skipped: int
    metric: str | None
    loss: dict | None  # base / tuned / difference (tuned − base, nats/supervised token: negative = better); None: grpo
    perplexity: dict | None
    task: dict | None  # base / tuned / difference (tuned − base), share of examples
    verdict: dict
    samples: list[dict]
    curves: dict  # train / valid: [[step, loss], ...] from the run's metrics
    # scored examples the run trained on (same content): {"checked", "examples", "sources"}; None: not checked
    overlap: dict | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _score(loaded, data: EvalData, metric: Metric | None, max_tokens: int, progress, label: str) -> ModelScores:
    examples = [case.example for case in data.cases]
    task_id = progress.add_task(f"{label}: loss", total=len(examples)) if progress else None
    sums, counts = example_losses(loaded.model, examples,
                                  (lambda n: progress.advance(task_id, n)) if progress else None)
    loss = ratio_interval(sums, counts)
    generations: list[str] = []
    task = None
    generating = [case for case in data.cases if case.reference is not None]
    if metric is not None and generating:
        fmt = prompt_format(loaded)
        prompts = [encode_messages(loaded, case.messages, fmt) if case.messages is not None
                   else list(loaded.tokenizer.encode(case.prompt)) for case in generating]
        gen_id = progress.add_task(f"{label}: generation", total=len(prompts)) if progress else None
        # A text record's reference is its last line: a newline ends the answer.
        stops = tokens_containing(loaded.tokenizer, "\n") if data.kind == "text" else []
        texts = greedy_batch(loaded.model, loaded.tokenizer, prompts, max_tokens,
                             (lambda n: progress.advance(gen_id, n)) if progress else None, stops)
        for text in texts:
            for stop in fmt.stops:
                text = text.split(stop)[0]
            if data.kind == "text":  # the reference is one line: so is the answer
                text = text.split("\n")[0]
            generations.append(text.strip())
        task = mean_interval([metric.score(g, c.reference) for g, c in zip(generations, generating)])
    return ModelScores(loss, exp_interval(loss), task, generations, sums, counts)


def verdict(loss: dict, task: dict | None, overlap: dict | None = None, examples: int = 0) -> dict:
    """Plain words: is the tuned model better, and is the difference more than noise (its 95% interval)?

    A gain measured on examples the run trained on is never called better: it can be memorising."""
    base, tuned, difference = (Interval(**loss[k]) for k in ("base", "tuned", "difference"))
    trained_on = (overlap or {}).get("examples", 0)
    better = difference.value < 0
    beyond = difference.excludes_zero()
    separate = not base.overlaps(tuned)
    change = 100 * (1 - math.exp(difference.value)) if math.isfinite(difference.value) else math.nan
    if better and beyond and trained_on:
        text = (f"Scored on training data: {trained_on} of {examples} examples were trained on, so the lower loss "
                f"({-difference.value:.3f} nats/token, 95% CI {-difference.high:.3f} to {-difference.low:.3f}) "
                "can be memorising and says nothing about new data; evaluate on held-out records.")
    elif better and beyond:
        text = (f"The tuned model is better: its loss is {-difference.value:.3f} nats/token lower "
                f"(95% CI {-difference.high:.3f} to {-difference.low:.3f}; perplexity {change:.0f}% lower). "
                f"The interval excludes zero, so the gain is larger than the noise"
                + (", and the two models' intervals do not overlap." if separate else "."))
    elif not better and beyond:
        text = (f"The tuned model is worse: its loss is {difference.value:.3f} nats/token higher "
                f"(95% CI {difference.low:.3f} to {difference.high:.3f}), beyond the noise.")
    else:
        text = (f"No clear difference: the loss changed by {difference.value:+.3f} nats/token but the 95% interval "
                f"({difference.low:+.3f} to {difference.high:+.3f}) includes zero.")
    if trained_on and not (better and beyond):
        text += f" ({trained_on} of {examples} examples were trained on.)"
    result = {"better": better and beyond and not trained_on, "trained_on": trained_on, "worse": (not better) and beyond, "beyond_interval": beyond,
              "intervals_overlap": not separate, "text": text}
    if task is not None:
        task_difference = Interval(**task["difference"])
        result["task_better"] = task_difference.low > 0
        result["task_text"] = (
            f"{task['metric']}: base {100 * task['base']['value']:.1f}% → tuned {100 * task['tuned']['value']:.1f}% "
            f"({100 * task_difference.value:+.1f} points, 95% CI {100 * task_difference.low:+.1f} to "
            f"{100 * task_difference.high:+.1f})" + (", beyond the noise" if task_difference.excludes_zero() else
                                                     ", within the noise"))
    return result


def _curves(run_dir: Path) -> dict:
    train, valid = [], []
    for record in read_metrics(run_dir / METRICS_FILE):
        if "train_loss" in record:
            train.append([record["step"], record["train_loss"]])
        if "val_loss" in record:
            valid.append([record["step"], record["val_loss"]])
    return {"train": train, "valid": valid}


def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    checkpoint: str = "last",
    samples: int = 5,
    metric: str = "exact",
    max_tokens: int | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    console=None,
    generations: int = 1,
) -> EvalResult:
    """Evaluate base vs tuned on the run's test split (else validation) or `data`; write eval.json and report.html
    into `out` (default: the run directory)."""
    from mlxtune.ui import step_progress

    if samples < 0:
        raise UsageError(f"--samples must be >= 0, got {samples}", "e.g. --samples 5")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}", "or leave it out to use every example")
    if generations < 1:
        raise UsageError(f"--generations must be at least 1, got {generations}", "e.g. --generations 4")
    parsed_metric = parse_metric(metric)
    run = open_run(run_dir)
    out_dir = Path(out) if out else run.path
    preference = preference_scores(run, data, checkpoint, limit)
    if preference is not None:  # chosen/rejected pairs: preference accuracy is the task, chosen answers the loss
        result = EvalResult(run=str(run.path), checkpoint=checkpoint, skipped=0, metric=preference["task"]["metric"],
                            verdict=verdict(preference["loss"], preference["task"], preference["overlap"],
                                            preference["examples"]), samples=[],
                            curves=_curves(run.path), **preference)
        return _write(result, out_dir)
    rewards = reward_scores(run, data, checkpoint, limit, generations, console, samples)
    if rewards is None and generations != 1:
        raise UsageError("--generations is for GRPO runs (several sampled completions per prompt)",
                         "leave it out: this run's task metric scores one greedy generation per example")
    if rewards is not None:  # a GRPO run: the mean reward of sampled completions is the task; no loss to compare
        return _write(EvalResult(run=str(run.path), checkpoint=checkpoint, skipped=0, curves=_curves(run.path),
                                 **rewards), out_dir)
    with quiet_stdout():
        tuned = open_for_inference(run.path, checkpoint, float32_on_cpu=True)
    cases = load_cases(run, tuned.tokenizer, prompt_format(tuned).template, data, limit)
    has_references = any(case.reference is not None for case in cases.cases)
    if not has_references:
        parsed_metric = None  # plain one-line text: nothing to compare a generation with
    longest_reference = max((len(tuned.tokenizer.encode(c.reference)) for c in cases.cases if c.reference), default=0)
    new_tokens = max_tokens or min(MAX_NEW_TOKENS, longest_reference + 16)

    progress = step_progress(console, "{task.description}") if console is not None else None
    if progress:
        progress.start()
    try:
        tuned_scores = _score(tuned, cases, parsed_metric, new_tokens, progress, "tuned")
        del tuned
        with quiet_stdout():
            base = open_for_inference(run.path, adapter=False, float32_on_cpu=True)
        base_scores = _score(base, cases, parsed_metric, new_tokens, progress, "base")
        del base
    finally:
        if progress:
            progress.stop()

    counts = tuned_scores.loss_counts
    overlap = None if cases.trained_on is None else {"checked": True, "examples": len(cases.trained_on),
                                                     "sources": cases.trained_on[:20]}
    loss = {"base": base_scores.loss.to_dict(), "tuned": tuned_scores.loss.to_dict(),
            "difference": paired_ratio_difference(tuned_scores.loss_sums, base_scores.loss_sums, counts).to_dict()}
    perplexity = {"base": base_scores.perplexity.to_dict(), "tuned": tuned_scores.perplexity.to_dict()}
    task = None
    if parsed_metric is not None and tuned_scores.task is not None:
        generating = [c for c in cases.cases if c.reference is not None]
        base_hits = [parsed_metric.score(g, c.reference) for g, c in zip(base_scores.generations, generating)]
        tuned_hits = [parsed_metric.score(g, c.reference) for g, c in zip(tuned_scores.generations, generating)]
        task = {"metric": parsed_metric.label, "examples": len(generating),
                "base": base_scores.task.to_dict(), "tuned": tuned_scores.task.to_dict(),
                "difference": paired_ratio_difference(tuned_hits, base_hits, [1] * len(generating)).to_dict()}
    generating = [c for c in cases.cases if c.reference is not None]
    sample_rows = [{"prompt": c.prompt, "reference": c.reference, "base": b, "tuned": t}
                   for c, b, t in zip(generating[:samples], base_scores.generations, tuned_scores.generations)]
    result = EvalResult(
        run=str(run.path), checkpoint=checkpoint, data=cases.path, split=cases.split, kind=cases.kind,
        examples=len(cases.cases), supervised_tokens=int(sum(counts)), skipped=cases.skipped,
        metric=task["metric"] if task else None, loss=loss, perplexity=perplexity, task=task,
        verdict=verdict(loss, task, overlap, len(cases.cases)), samples=sample_rows, curves=_curves(run.path),
        overlap=overlap,
    )
    return _write(result, out_dir)


def _write(result: EvalResult, out_dir: Path) -> EvalResult:
    from mlxtune.eval.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    result.files = {"eval": str(out_dir / EVAL_FILE), "report": str(out_dir / EVAL_REPORT_FILE)}
    atomic_write_text(out_dir / EVAL_FILE, json.dumps(result.to_dict(), indent=2) + "\n")
    write_report(result, out_dir / EVAL_REPORT_FILE)
    return result


def refresh_report(run_dir: Path) -> Path | None:
    """Write the run's report.html again from its eval.json (after `mlxtune verify` wrote verify.json); None when
    the run has not been evaluated into its own directory."""
    from mlxtune.eval.report import write_report

    data_file = Path(run_dir) / EVAL_FILE
    if not data_file.is_file():
        return None
    result = EvalResult(**json.loads(data_file.read_text(encoding="utf-8")))
    return write_report(result, Path(run_dir) / EVAL_REPORT_FILE)
