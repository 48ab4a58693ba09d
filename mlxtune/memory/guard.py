"""During a run: the memory guard (MLX's limit, the measured peak after every step, smaller micro-batches when the
run overshoots its budget), and how its changes are reported."""

from __future__ import annotations

import math

from mlxtune.data.batching import PAD_MULTIPLE
from mlxtune.errors import RunFailed
from mlxtune.memory.budget import GB, fmt_gb
from mlxtune.settings import TrainSettings

GUARD_RETRIES = 2


def is_out_of_memory(exc: BaseException) -> bool:
    """MLX's allocation failures: `[malloc] Unable to allocate …` (CPU and Metal), Metal's `Insufficient Memory`."""
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "unable to allocate" in text or "insufficient memory" in text or "out of memory" in text
        or isinstance(exc, MemoryError))


class MemoryGuard:
    """Holds a run to its budget: MLX's memory limit, and a check of the measured peak after every step.

    On Metal, MLX treats the limit as a guideline: an evaluation past it waits for scheduled work to finish and free
    memory, and only an allocation the system can't satisfy fails. On the CPU backend the limit only paces the
    scheduler: nothing fails until the OS itself runs out (then the OOM killer, not an exception). So the guard
    compares MLX's peak with the budget after each optimizer step and treats an overshoot like an allocation
    failure: the run shrinks its micro-batches before the machine starts swapping.
    """

    def __init__(self, budget: int, retries: int = GUARD_RETRIES):
        import mlx.core as mx

        self.budget = budget
        self.retries_left = retries
        self.previous_limit = mx.set_memory_limit(budget)
        mx.reset_peak_memory()

    def peak(self) -> int:
        import mlx.core as mx

        return mx.get_peak_memory()

    def close(self) -> None:
        """MLX's memory limit back to what it was before the guard set it."""
        import mlx.core as mx

        mx.set_memory_limit(self.previous_limit)

    def overshoot(self) -> int | None:
        peak = self.peak()
        return peak if peak > self.budget else None

    def shrink(self, settings: TrainSettings, current_tokens: int | None, longest: int, peak: int | None,
               step: int, fixed_batches: bool = False) -> dict:
        """Halve the micro-batch (doubling accumulation, so a step sees the same tokens); the change as a record."""
        import mlx.core as mx

        if self.retries_left <= 0:
            raise RunFailed(
                f"the run exceeded its memory budget of {fmt_gb(self.budget)} again at step {step + 1} after "
                f"shrinking its batches {GUARD_RETRIES} times; the last good weights (step {step}) are saved",
                "raise --memory, or resume with --grad-checkpoint / a smaller --max-seq-length "
                "(`mlxtune plan` shows what fits)")
        def sizes() -> dict:  # fixed batches of pairs have no token budget (their settings hold none)
            return {"batch_tokens": None if fixed_batches else settings.batch_tokens,
                    "batch_size": settings.batch_size, "grad_accumulation": settings.grad_accumulation}

        before = sizes()
        fixed = fixed_batches or (settings.pack is False and not settings.batch_tokens)  # preference: pairs
        if fixed:
            if settings.batch_size <= 1:
                raise self._cannot_shrink(step)
            settings.batch_size = max(1, settings.batch_size // 2)
        else:
            current = settings.batch_tokens or current_tokens
            smallest = PAD_MULTIPLE * math.ceil((longest - 1) / PAD_MULTIPLE)
            if current <= smallest:
                raise self._cannot_shrink(step)
            settings.batch_tokens = max(smallest, current // 2)
        settings.grad_accumulation *= 2
        self.retries_left -= 1
        mx.clear_cache()
        mx.reset_peak_memory()
        after = sizes()
        return {"step": step, "memory_event": "over budget" if peak else "out of memory",
                "peak_memory_gb": None if peak is None else round(peak / GB, 4),
                "budget_gb": round(self.budget / GB, 4), "before": before, "after": after}

    def _cannot_shrink(self, step: int) -> RunFailed:
        return RunFailed(f"one example alone exceeds the memory budget of {fmt_gb(self.budget)} (step {step + 1}); "
                         f"the last good weights (step {step}) are saved",
                         "resume with --grad-checkpoint or a smaller --max-seq-length, or raise --memory")


def describe_change(event: dict) -> str:
    before, after = event["before"], event["after"]
    what = ("peak " + fmt_gb(event["peak_memory_gb"] * GB) if event["peak_memory_gb"] is not None
            else "an allocation failed")
    key = "batch_tokens" if after["batch_tokens"] else "batch_size"
    return (f"memory: {what} over the {fmt_gb(event['budget_gb'] * GB)} budget at step {event['step']}: "
            f"{key.replace('_', ' ')} {before[key]} → {after[key]}, grad accumulation "
            f"{before['grad_accumulation']} → {after['grad_accumulation']} (about the same tokens per step); continuing")
