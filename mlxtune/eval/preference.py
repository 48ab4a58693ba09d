"""`mlxtune eval` on preference pairs: preference accuracy of base vs tuned (which answer each model finds more
likely) and the loss of the chosen answers, with the same bootstrap intervals as every other evaluation.

The base is the run's model with its adapter switched off (train/preference: one model in memory), so both are
scored on exactly the same pairs and the differences are paired.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxtune.data.dataset import fingerprint
from mlxtune.data.formats import find_splits
from mlxtune.data.preference import load_preference_sets
from mlxtune.data.preference_check import is_preference_data
from mlxtune.errors import UsageError
from mlxtune.eval.stats import exp_interval, mean_interval, paired_ratio_difference, ratio_interval
from mlxtune.runs import Run, open_for_inference
from mlxtune.train.preference.objective import SequenceLogProbs, adapters_off, answer_logps, likelihood_accuracy
from mlxtune.ui import quiet_stdout

METRIC = "preference accuracy"


def _pair_print(pair) -> tuple[str, str]:
    return fingerprint(pair.chosen), fingerprint(pair.rejected)


def preference_scores(run: Run, data: str | Path | None, checkpoint: str, limit: int | None) -> dict | None:
    """EvalResult's fields for preference data (`data`, else the run's own); None when the data is not pairs."""
    source = Path(data or run.settings.data)
    if not is_preference_data(find_splits(source)):
        return None
    with quiet_stdout():
        loaded = open_for_inference(run.path, checkpoint, float32_on_cpu=True)
    settings = run.settings
    from mlxtune.train.preference.run import is_preference_run, load_preference_settings

    skip_invalid = is_preference_run(run.path) and load_preference_settings(run.path).skip_invalid
    options = dict(max_seq_length=settings.max_seq_length, chat_template=settings.chat_template, seed=settings.seed,
                   skip_invalid=skip_invalid)
    sets = load_preference_sets(source, loaded.tokenizer, **options)
    split, pairs = next((name, found) for name, found in (("test", sets.test), ("valid", sets.valid),
                                                           ("train", sets.train)) if found)
    pairs = pairs[:limit] if limit else pairs
    if split == "valid" and "valid" not in sets.files:
        split = "held-out validation"  # the pairs training held out of the one file (same seed)
    own = Path(settings.data)
    try:  # what the run trained on, split and tokenized as training did: overlap by content
        trained = (sets if own.resolve() == source.resolve() else
                   load_preference_sets(own, loaded.tokenizer, **options)).train
        prints = {_pair_print(p) for p in trained}
        trained_on = [p.source for p in pairs if _pair_print(p) in prints]
        overlap = {"checked": True, "examples": len(trained_on), "sources": trained_on[:20]}
    except UsageError:  # the run's data is gone or changed: not checked
        overlap = None
    logps = SequenceLogProbs(loaded.model)
    tuned = answer_logps(loaded.model, pairs, logps=logps)
    with adapters_off(loaded.model):
        base = answer_logps(loaded.model, pairs, logps=logps)
    counts = np.array([int(p.chosen.supervised[1:].sum()) for p in pairs], dtype=np.float64)
    base_loss, tuned_loss = ratio_interval(-base[:, 0], counts), ratio_interval(-tuned[:, 0], counts)
    base_hits, tuned_hits = likelihood_accuracy(base), likelihood_accuracy(tuned)
    return {
        "overlap": overlap, "data": str(source), "split": split, "kind": "preference", "examples": len(pairs),
        "supervised_tokens": int(counts.sum()),
        # the loss of the chosen answers: a preference run should not forget how to say them
        "loss": {"base": base_loss.to_dict(), "tuned": tuned_loss.to_dict(),
                 "difference": paired_ratio_difference(-tuned[:, 0], -base[:, 0], counts).to_dict()},
        "perplexity": {"base": exp_interval(base_loss).to_dict(), "tuned": exp_interval(tuned_loss).to_dict()},
        "task": {"metric": METRIC, "examples": len(pairs), "base": mean_interval(base_hits).to_dict(),
                 "tuned": mean_interval(tuned_hits).to_dict(),
                 "difference": paired_ratio_difference(tuned_hits, base_hits, np.ones(len(pairs))).to_dict()},
    }
