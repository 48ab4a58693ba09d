"""Preference accuracy of the base model and of a tuned run on held-out pairs, with bootstrap intervals.

Accuracy here is the share of pairs where the model gives the chosen answer a higher log-probability than the
rejected one (a tie counts one half). The base is the run's own model with its adapter switched off, so one model
is loaded and the two are compared on exactly the same pairs (a paired comparison: the interval of the gain
resamples pairs, not the two accuracies apart).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlxtune.data.preference import load_preference_sets
from mlxtune.errors import UsageError
from mlxtune.train.preference.objective import adapters_off, answer_logps, likelihood_accuracy

RESAMPLES = 2000


@dataclass
class PreferenceComparison:
    pairs: int
    base_accuracy: float
    base_interval: tuple[float, float]
    tuned_accuracy: float
    tuned_interval: tuple[float, float]
    gain: float
    gain_interval: tuple[float, float]
    confidence: float
    source: str  # which pairs

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_interval(values: np.ndarray, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean (pairs resampled with replacement)."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (RESAMPLES, len(values)))].mean(axis=1)
    tail = (1.0 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def compare_preference_accuracy(run_dir: str | Path, data: str | Path | None = None, checkpoint: str = "last",
                                batch_size: int = 8, confidence: float = 0.95) -> PreferenceComparison:
    """Base vs tuned preference accuracy on `data`'s validation pairs (default: the run's own)."""
    from mlxtune.runs import open_for_inference

    loaded = open_for_inference(run_dir, checkpoint)
    if loaded.run is None:
        raise UsageError(f"{run_dir} is a model, not a run", "give a run directory written by mlxtune dpo/orpo/lora")
    settings = loaded.run.settings
    source = data or settings.data
    sets = load_preference_sets(source, loaded.tokenizer, max_seq_length=settings.max_seq_length,
                                chat_template=settings.chat_template, seed=settings.seed)
    pairs = sets.valid or sets.train
    tuned = likelihood_accuracy(answer_logps(loaded.model, pairs, batch_size))
    with adapters_off(loaded.model):
        base = likelihood_accuracy(answer_logps(loaded.model, pairs, batch_size))
    return PreferenceComparison(
        len(pairs), float(base.mean()), bootstrap_interval(base, confidence), float(tuned.mean()),
        bootstrap_interval(tuned, confidence), float((tuned - base).mean()),
        bootstrap_interval(tuned - base, confidence), confidence,
        f"{source} ({'validation' if sets.valid else 'training'} pairs)")
