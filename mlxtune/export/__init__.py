"""Exports of a run or a model: GGUF (full model or LoRA adapter), Ollama, LM Studio, Hugging Face safetensors.

`export(...)` is what `mlxtune export` calls; each format lives in its own module.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlxtune.errors import UsageError
from mlxtune.faults import fault_point
from mlxtune.storage import check_free_space, create_file, staged
from mlxtune.library import find_entry, models_in_use
from mlxtune.model_config import text_config
from mlxtune.runs import check_output, is_run_dir, open_run

FORMATS = ("gguf", "gguf-adapter", "ollama", "lmstudio", "hf")
OUTTYPES = ("f16", "q8_0", "f32")  # GGUF tensor types, the default first


@dataclass
class ExportResult:
    format: str
    path: str  # the file or directory written
    files: list[str] = field(default_factory=list)
    next_step: str | None = None  # the command that uses it
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def lmstudio_models_dir() -> Path:
    """LM Studio's models folder: LMSTUDIO_MODELS_DIR, else ~/.lmstudio/models (or the older ~/.cache/lm-studio)."""
    if os.environ.get("LMSTUDIO_MODELS_DIR"):
        return Path(os.environ["LMSTUDIO_MODELS_DIR"]).expanduser()
    legacy = Path.home() / ".cache" / "lm-studio" / "models"
    current = Path.home() / ".lmstudio" / "models"
    return legacy if legacy.is_dir() and not current.is_dir() else current


def _default_name(run_or_model: str | Path) -> str:
    return Path(str(run_or_model).rstrip("/")).name or "model"


def default_output(run_or_model: str | Path, fmt: str, outtype: str = "f16") -> Path:
    """Where an export goes without --out: beside the run (runs/demo → runs/demo-f16.gguf), so a run's exports stay
    with it; a model's go to the current directory. Absolute, so the message says exactly where."""
    name = _default_name(run_or_model)
    filename = {"gguf": f"{name}-{outtype}.gguf", "gguf-adapter": f"{name}-lora.gguf"}.get(fmt, f"{name}-{fmt}")
    folder = Path(run_or_model).resolve().parent if is_run_dir(run_or_model) else Path.cwd()
    return folder / filename


OUTTYPE_BYTES = {"f32": 4, "f16": 2, "q8_0": 34 / 32}


def _listing(target: Path) -> list[str]:
    return sorted(str(p) for p in target.iterdir()) if target.is_dir() else [str(target)]


def check_export_output(run_or_model: str | Path, target: Path) -> None:
    """Refuse a `target` that is, holds or lies in what the export reads (runs.check_output)."""
    if is_run_dir(run_or_model):
        run = open_run(run_or_model)
        check_output(target, run=run.path, base_model=run.base_model, library_entries=models_in_use())
        return
    source = Path(run_or_model).expanduser()
    entry = None if source.exists() else find_entry(str(run_or_model))
    check_output(target, base_model=source if source.exists() else entry.path if entry else None,
                 library_entries=models_in_use())


def export(run_or_model: str | Path, fmt: str, out: str | Path | None = None, outtype: str = "f16",
           checkpoint: str = "last", overwrite: bool = False, keep_template: bool = False,
           console=None) -> ExportResult:
    """Write `run_or_model` in format `fmt` to `out` (a .gguf file for gguf/gguf-adapter, else a directory).
    `keep_template` (ollama): write the TEMPLATE an Ollama import came with even where it renders otherwise than
    training's chat template (export/ollama.modelfile).

    Each output is written under a hidden staging name beside `out` and renamed into place complete: a failed or
    killed export leaves no partial file, and with `overwrite` the old output stays until the new one is there."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    if keep_template and fmt != "ollama":
        raise UsageError(f"--keep-template is for --format ollama, not {fmt}", "leave out --keep-template")
    name = _default_name(run_or_model)
    if out is None and fmt != "lmstudio":
        out = default_output(run_or_model, fmt, outtype)

    if fmt == "gguf-adapter":
        from mlxtune.export.gguf_adapter import export_gguf_adapter

        if not is_run_dir(run_or_model):
            raise UsageError(f"{run_or_model} is not a run directory", "gguf-adapter exports a run's adapter")
        run = open_run(run_or_model)
        target = Path(out)
        check_export_output(run_or_model, target)
        with staged(target, overwrite) as staging:
            export_gguf_adapter(run, staging, checkpoint)
        return ExportResult(fmt, str(target), [str(target)],
                            f"llama-cli -m BASE.gguf --lora {target}   (BASE.gguf: mlxtune export "
                            f"{run.base_model} --format gguf)")

    from mlxtune.export.source import open_source

    if fmt == "lmstudio":
        target = Path(out) if out else lmstudio_models_dir() / "mlxtune" / name
    else:
        target = Path(out)
    check_export_output(run_or_model, target)
    if fmt in ("gguf", "ollama"):
        from mlxtune.export.gguf import vocabulary
        from mlxtune.model_config import read_config
        from mlxtune.models import resolve_model

        # Refuse a tokenizer llama.cpp can't reproduce before loading or fusing anything (a run's comes from its base).
        tokenizer_dir = open_run(run_or_model).base_model if is_run_dir(run_or_model) else resolve_model(
            run_or_model, console=console)
        vocabulary(tokenizer_dir, read_config(tokenizer_dir))
        if keep_template:
            from mlxtune.export.ollama import kept_settings

            if kept_settings(Path(tokenizer_dir)) is None:
                raise UsageError(f"--keep-template: {run_or_model} has no Ollama TEMPLATE to keep (its model was not "
                                 "pulled from Ollama)", "leave out --keep-template: a TEMPLATE is derived from the "
                                 "chat template")

    notes: list[str] = []
    with staged(target, overwrite) as staging, open_source(run_or_model, checkpoint, console) as source:
        parameters = sum(v.size for v in source.weights.values())
        per_parameter = OUTTYPE_BYTES[outtype] if fmt in ("gguf", "ollama") else 4
        check_free_space(target, int(parameters * per_parameter), f"the {fmt} export")
        if fmt == "gguf":
            from mlxtune.export.gguf import export_gguf

            export_gguf(source, staging, outtype, name=name, warnings=notes)
            next_step = f"llama-cli -m {target} -cnv"
        elif fmt == "hf":
            from mlxtune.export.hf import export_hf

            export_hf(source, staging)
            next_step = f"AutoModelForCausalLM.from_pretrained({str(target)!r})"
        elif fmt == "ollama":
            from mlxtune.export.gguf import export_gguf
            from mlxtune.export.ollama import modelfile

            staging.mkdir()
            gguf_file = export_gguf(source, staging / f"{name}-{outtype}.gguf", outtype, name=name, warnings=notes)
            context = text_config(source.config).get("max_position_embeddings")
            text = modelfile(gguf_file.name, source.tokenizer, source.chat_template, source.path, context,
                             base_dir=tokenizer_dir, keep_template=keep_template,
                             notes=notes)  # an Ollama import's own TEMPLATE and stops where they render as trained
            create_file(staging / "Modelfile", text)
            tag = name.lower().replace("_", "-")
            next_step = f"cd {target} && ollama create {tag} -f Modelfile && ollama run {tag}"
        else:
            # lmstudio: LM Studio runs MLX models directly on a Mac; install the (fused, full-precision) MLX model.
            shutil.copytree(source.path, staging, ignore=shutil.ignore_patterns("*.partial*"))
            next_step = "open LM Studio: the model is listed under mlxtune/" + name
        fault_point("export.written")
    return ExportResult(fmt, str(target), _listing(target), next_step, notes)
