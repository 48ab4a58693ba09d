"""A run directory as the other commands see it: its settings, its data facts, its adapter and template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlxtune.errors import UsageError
from mlxtune.settings import LoraSettings, load_settings

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
TEMPLATE_FILE = "chat_template.jinja"
ADAPTER_FILE = "adapters.safetensors"


@dataclass
class Run:
    path: Path
    settings: LoraSettings
    info: dict

    @property
    def base_model(self) -> Path:
        return Path(self.settings.model)

    @property
    def data_kind(self) -> str:
        return self.info.get("data_kind", "text")

    @property
    def chat_template(self) -> str | None:
        """The template training used when it was not the model's own (fallback or --chat-template file)."""
        path = self.path / TEMPLATE_FILE
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def adapter_dir(self, checkpoint: str = "last") -> Path:
        if checkpoint == "last":
            folder = self.path
        elif checkpoint == "best":
            folder = self.path / "best"
        else:
            try:
                folder = self.path / "checkpoints" / f"step-{int(checkpoint):07d}"
            except ValueError:
                raise UsageError(f"unknown checkpoint {checkpoint!r}", "use best, last or a step number") from None
        if not (folder / ADAPTER_FILE).is_file():
            available = sorted(p.name for p in (self.path / "checkpoints").glob("step-*"))
            raise UsageError(f"no adapter for checkpoint {checkpoint!r} in {self.path}",
                             f"available: best, last{', ' if available else ''}{', '.join(available)}")
        return folder


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / RUN_FILE).is_file()


def open_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"run directory not found: {path}", "give the directory `mlxtune lora` wrote (runs/<name>)")
    if not is_run_dir(path):
        raise UsageError(f"{path} is not an mlxtune run (no {CONFIG_FILE}/{RUN_FILE})",
                         "give the directory `mlxtune lora` wrote")
    info = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
    return Run(path.resolve(), load_settings(path / CONFIG_FILE), info)
