"""`mlxtune eval` on a GRPO run: the mean reward of base vs tuned on held-out prompts, with the same bootstrap
intervals as every other evaluation.

Each prompt gets one completion (`--generations K`: K) from each model, sampled at the run's temperature and top-p
with fixed keys per prompt (the same for both models; temperature 0: greedy), scored by the run's own rewards
(grpo.yaml) — what the run's validation measures. With K > 1 a prompt's reward is the mean of its K completions':
the interval is still over prompts (the unit that was sampled), and narrower, since each prompt's reward under the
sampling policy is estimated from K draws instead of one. The base is the run's model with its adapter switched off
(one model in memory, as for preference runs), so both are scored on the same prompts with the same keys and the
difference is paired. Prompts: `--data`, else the run's test split, else its validation split (held out of
training: a file, or the fixed-seed 10% training held out).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np

from mlxtune.data.prompts import PROMPT_KEY, prompt_ids, read_prompt_splits
from mlxtune.errors import UsageError
from mlxtune.eval.stats import Interval, mean_interval, paired_ratio_difference
from mlxtune.inference import prompt_format
from mlxtune.runs import Run, open_for_inference
from mlxtune.ui import quiet_stdout, step_progress

METRIC = "mean reward"


def reward_scores(run: Run, data: str | Path | None, checkpoint: str, limit: int | None, generations: int = 1,
                  console=None, samples: int = 5) -> dict | None:
    """EvalResult's fields for a GRPO run; None for any other run. `generations` completions per prompt (each
    prompt's reward is their mean: the same paired interval over prompts, narrower)."""
    from mlxtune.train.grpo.objective import GrpoObjective, mean_reward
    from mlxtune.train.grpo.rewards import check_fields, parse_rewards
    from mlxtune.train.grpo.run import eos_ids, is_grpo_run, load_grpo_settings
    from mlxtune.train.preference.objective import adapters_off

    if not is_grpo_run(run.path):
        return None
    settings = load_grpo_settings(run.path)
    if generations > 1 and settings.temperature == 0:
        raise UsageError(f"--generations {generations} at the run's temperature 0 would be {generations} identical "
                         "greedy completions", "leave --generations out for a greedy run")
    source = Path(data or settings.data)
    records, _ = read_prompt_splits(source, settings.seed, prompt_key=settings.prompt_key or PROMPT_KEY)
    split = next(name for name in ("test", "valid", "train") if records.get(name))
    chosen = records[split][:limit] if limit else records[split]
    rewards = parse_rewards(settings.reward or [])
    check_fields(rewards, [r.fields for r in chosen], [r.source for r in chosen])
    with quiet_stdout():
        loaded = open_for_inference(run.path, checkpoint, float32_on_cpu=True)
    template = prompt_format(loaded).template  # the run's saved template, else the model's: what it trained with
    items = [(r, prompt_ids(r, loaded.tokenizer, template)) for r in chosen]
    scorer = GrpoObjective(loaded.model, loaded.tokenizer, None, None, settings, rewards, [], [],
                           eos_ids(loaded.tokenizer))
    progress = step_progress(console, "{task.description}") if console is not None else None
    if progress:
        progress.start()
    try:
        scored = {}
        for label in ("tuned", "base"):
            task = progress.add_task(f"{label}: {generations} completion(s) per prompt", total=len(items)) \
                if progress else None
            with adapters_off(loaded.model) if label == "base" else nullcontext():
                # prompts per batch: as many rows as the run's rollout (--batch-size × G), at least one prompt
                rows = max(1, settings.batch_size * settings.group_size // generations)
                scored[label] = mean_reward(scorer, items, rows, completions=generations,
                                            advance=(lambda n, t=task: progress.advance(t, n)) if progress else None)
    finally:
        if progress:
            progress.stop()
    tuned, base = scored["tuned"], scored["base"]
    base_totals, tuned_totals = np.array(base["totals"]), np.array(tuned["totals"])
    own = Path(settings.data).resolve() == source.resolve()
    task = {"metric": METRIC, "examples": len(items), "generations": generations,
            "base": mean_interval(base_totals).to_dict(),
            "tuned": mean_interval(tuned_totals).to_dict(),
            "difference": paired_ratio_difference(tuned_totals, base_totals, np.ones(len(items))).to_dict(),
            "rewards": {name: reward_intervals(base["values"][name], tuned["values"][name])
                        for name in base["values"]},  # by spec without its weight, as metrics.jsonl names them
            # each prompt's mean total reward (over its completions), in the data's order: which prompts moved
            "per_prompt": {"base": base_totals.tolist(), "tuned": tuned_totals.tolist()}}
    difference = Interval(**task["difference"])
    better, worse = difference.low > 0, difference.high < 0
    per_prompt = f" ({generations} completions per prompt)" if generations > 1 else ""
    text = (f"mean reward{per_prompt}: base {task['base']['value']:.3f} → tuned {task['tuned']['value']:.3f} "
            f"({difference.value:+.3f}, 95% CI {difference.low:+.3f} to {difference.high:+.3f}): "
            + ("the tuned model scores higher, beyond the noise" if better else
               "the tuned model scores lower, beyond the noise" if worse else "no clear difference (the interval "
                                                                              "includes zero)"))
    if own and split == "train":
        text += "; scored on training prompts: evaluate on held-out ones (--data)"
    return {"data": str(source), "split": split if split != "valid" or "valid" in _files(source) else
            "held-out validation", "kind": "prompts", "examples": len(items), "supervised_tokens": 0,
            "loss": None, "perplexity": None, "task": task, "metric": METRIC, "overlap": None,
            "verdict": {"better": better and not (own and split == "train"), "worse": worse, "trained_on": 0,
                        "beyond_interval": difference.excludes_zero(), "intervals_overlap": True, "text": text},
            "samples": [{"prompt": prompt_text(record.prompt), "reference": _reference(record.fields),
                         "base": base_text, "tuned": tuned_text, "base_reward": base_total,
                         "tuned_reward": tuned_total}
                        for record, base_text, tuned_text, base_total, tuned_total in
                        zip(chosen[:samples], base["texts"], tuned["texts"], base["firsts"], tuned["firsts"])]}


def prompt_text(prompt) -> str:
    """A prompt as a person reads it in a sample: text as it is, a message list as its last user turn."""
    if isinstance(prompt, list):
        turns = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(turns[-1]) if turns else str(prompt)
    return str(prompt)


def _reference(fields: dict) -> str | None:
    """The record's `answer` (what the built-in rewards compare with by default), when it has one."""
    value = fields.get("answer")
    return None if value is None else str(value)


def reward_intervals(base: list[float], tuned: list[float]) -> dict:
    """One reward's base and tuned means with their intervals and the paired difference's, over the prompts it
    applied to for both (a None, NaN here, leaves the prompt out)."""
    base_values, tuned_values = np.array(base, dtype=np.float64), np.array(tuned, dtype=np.float64)
    both = ~np.isnan(base_values) & ~np.isnan(tuned_values)
    base_values, tuned_values = base_values[both], tuned_values[both]
    return {"base": mean_interval(base_values).to_dict(), "tuned": mean_interval(tuned_values).to_dict(),
            "difference": paired_ratio_difference(tuned_values, base_values, np.ones(len(base_values))).to_dict(),
            "examples": int(both.sum())}


def _files(source: Path) -> dict:
    from mlxtune.data.formats import find_splits

    return find_splits(source)
