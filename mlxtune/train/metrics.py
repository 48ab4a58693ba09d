"""metrics.jsonl (one JSON object per report), optionally mirrored to Weights & Biases."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mlxtune.errors import UsageError
from mlxtune.train.checkpoint import atomic_write_text


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not one (cut short by a crash mid-write, a bad byte, a step
    that is no number, a loss that is text) is skipped, not fatal: the log is a report, the checkpoints are the run.
    A metrics.jsonl that is not a file reads as empty."""
    try:
        lines = Path(path).read_bytes().splitlines() if Path(path).is_file() else []
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        if isinstance(record, dict) and _well_formed(record):
            records.append(record)
    return records


def _well_formed(record: dict) -> bool:
    """A step that is a whole number, and every loss-like value a number (or None)."""
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return False
    return all(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
               for key, value in record.items() if key.endswith(("loss", "accuracy")))


class MetricsLog:
    """Appends records to `path`; with `path` None (a data-parallel rank other than 0) it writes nothing."""

    def __init__(self, path: Path | None, report_to: str | None = None, run_name: str = "", config: dict | None = None):
        self.path = path
        if path is not None and (path.is_symlink() or (path.exists() and not path.is_file())):
            raise UsageError(f"{path} is {'a link' if path.is_symlink() else 'not a file'}: the run's metrics log "
                             "must be a plain file", f"move {path} away, then run again")
        self._wandb = None
        if report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise UsageError("--report-to wandb needs the wandb package", "pip install wandb") from None
            self._wandb = wandb.init(project="mlxtune", name=run_name, config=config or {}, dir=str(path.parent))

    def write(self, record: dict) -> None:
        """Appends `record` with `time`: when it was written (Unix seconds), so that a reader can time the steps
        from the log itself instead of watching it being written (scripts/bench_grpo.py)."""
        if self.path is None:
            return
        record = {**record, "time": round(time.time(), 3)}
        # appended, never through a link (O_NOFOLLOW): the log is the run's own file
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=record["step"])

    def trim(self, after_step: int) -> None:
        """On resume, forget what was logged after the checkpoint we restart from."""
        if self.path is None or not self.path.exists():
            return
        kept = [record for record in read_metrics(self.path) if record.get("step", 0) <= after_step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
