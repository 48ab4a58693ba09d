"""Bootstrap confidence intervals over examples: for one model's mean, and for the paired base − tuned difference.

Examples are the unit of resampling (tokens within an example are not independent). The percentile bootstrap with
a fixed seed makes the numbers reproducible; the same resampled example sets serve both models of a pair, so the
difference's interval reflects the pairing (much narrower than comparing two separate intervals).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


@dataclass
class Interval:
    value: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return asdict(self)

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _resample_indices(count: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def ratio_interval(numerators, denominators, *, resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = SEED) -> Interval:
    """Σ numerators / Σ denominators (e.g. nats over supervised tokens) with a bootstrap interval over examples."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if len(num) == 0 or den.sum() == 0:
        return Interval(math.nan, math.nan, math.nan)
    index = _resample_indices(len(num), resamples, seed)
    samples = num[index].sum(axis=1) / np.maximum(den[index].sum(axis=1), 1e-12)
    return Interval(float(num.sum() / den.sum()), *_percentiles(samples, level))


def mean_interval(values, **kwargs) -> Interval:
    """The mean of per-example values (e.g. 0/1 exact matches) with a bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    return ratio_interval(values, np.ones_like(values), **kwargs)


def paired_ratio_difference(num_a, num_b, denominators, *, resamples: int = RESAMPLES, level: float = LEVEL,
                            seed: int = SEED) -> Interval:
    """(Σa − Σb) / Σden over the same resampled examples: the paired difference of two per-token means."""
    a = np.asarray(num_a, dtype=np.float64)
    b = np.asarray(num_b, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if len(a) == 0 or den.sum() == 0:
        return Interval(math.nan, math.nan, math.nan)
    index = _resample_indices(len(a), resamples, seed)
    samples = (a[index].sum(axis=1) - b[index].sum(axis=1)) / np.maximum(den[index].sum(axis=1), 1e-12)
    return Interval(float((a.sum() - b.sum()) / den.sum()), *_percentiles(samples, level))


def exp_interval(interval: Interval) -> Interval:
    """Perplexity from a loss interval (exp is monotonic, so the percentiles map through)."""
    return Interval(*(math.exp(min(v, 700)) if math.isfinite(v) else math.nan
                      for v in (interval.value, interval.low, interval.high)))


def format_interval(interval: dict, scale: float = 1.0, digits: int = 3, signed: bool = False,
                    markup: tuple[str, str] = ("", "")) -> str:
    """`value [low, high]` of an interval's dict form, scaled (100 for percentages); `markup` wraps the bracket
    (rich's dim style in the terminal summary, nothing in the HTML report)."""
    if not math.isfinite(interval["value"]):
        return "—"
    sign = "+" if signed else ""
    opening, closing = markup

    def number(value: float) -> str:  # an untrained model's perplexity is ~6e9: 3 significant digits, not 13
        return f"{value:{sign}.3g}" if abs(value) >= 1e5 else f"{value:{sign}.{digits}f}"

    return (f"{number(interval['value'] * scale)} {opening}"
            f"[{number(interval['low'] * scale)}, {number(interval['high'] * scale)}]{closing}")

