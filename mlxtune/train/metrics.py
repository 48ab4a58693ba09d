"""metrics.jsonl (one JSON object per report), optionally mirrored to Weights & Biases."""

from __future__ import annotations

import json
from pathlib import Path

from mlxtune.errors import UsageError
from mlxtune.train.checkpoint import atomic_write_text


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash mid-write is skipped, not fatal."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLog:
    """Appends records to `path`; with `path` None (a data-parallel rank other than 0) it writes nothing."""

    def __init__(self, path: Path | None, report_to: str | None = None, run_name: str = "", config: dict | None = None):
        self.path = path
        self._wandb = None
        if report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise UsageError("--report-to wandb needs the wandb package", "pip install wandb") from None
            self._wandb = wandb.init(project="mlxtune", name=run_name, config=config or {}, dir=str(path.parent))

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def trim(self, after_step: int) -> None:
        """On resume, forget what was logged after the checkpoint we restart from."""
        if self.path is None or not self.path.exists():
            return
        kept = [record for record in read_metrics(self.path) if record.get("step", 0) <= after_step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
