"""`mlxtune pull` from the models users already run: a GGUF file, `ollama:NAME[:TAG]`, `lmstudio:PUBLISHER/NAME`.

The GGUF becomes an MLX model directory in the library (weights and config from `gguf_model`, tokenizer and chat
template from `gguf_tokenizer`), with Ollama's TEMPLATE and parameters kept beside it in `ollama.json`.
"""

from __future__ import annotations

import json
import re

from mlxtune.importers.gguf_model import convert
from mlxtune.importers.gguf_tokenizer import build_tokenizer
from mlxtune.importers.stores import GGUFSource, fingerprint, is_gguf_reference, resolve
from mlxtune.library import ModelEntry, check_entry_name, library_dir, write_entry
from mlxtune.model_config import DTYPE_TAGS, check_dtype

OLLAMA_SETTINGS = "ollama.json"

__all__ = ["is_gguf_reference", "pull_gguf", "OLLAMA_SETTINGS"]


def default_name(source: GGUFSource, quantize: str | None, dtype: str | None = None) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", source.base_name).strip("-.") or "gguf-model"
    name += "-mlx" if quantize is None else f"-mlx-q{quantize}"
    return name + f"-{DTYPE_TAGS[dtype or 'float16']}" if quantize == "none" or dtype else name


def pull_gguf(reference: str, quantize: str | None = None, name: str | None = None, force: bool = False,
              console=None, dtype: str | None = None) -> ModelEntry:
    """Import the GGUF that `reference` names into the library. `quantize` ("4", "8", "none", None for the
    default: exact types kept, see gguf_model) decides which tensors are quantized, `dtype` ("f16"/"float16" by
    default, "f32", "bf16") the precision of the float ones."""
    from rich.console import Console

    from mlxtune.hub import describe_entry, existing_entry, input_fault
    from mlxtune.storage import staged

    console = console or Console(stderr=True)
    dtype = check_dtype(dtype, "float16, as GGUF files hold their float tensors")
    if name is not None:
        check_entry_name(name)
    source = resolve(reference)
    name = check_entry_name(name) if name is not None else default_name(source, quantize, dtype)
    dest = library_dir() / name
    # The same GGUF under another path (a second clone's venv, a copy) is the same source: compared by content.
    identity: dict = {}

    def identify(recorded: dict | None) -> dict:  # an unchanged file reuses the entry's recorded digest
        identity.update(fingerprint(source.path, recorded))
        return identity

    existing = existing_entry(dest, source.source, force, console, identify)
    if existing is not None:
        return existing
    identity = identity or fingerprint(source.path)
    library_dir().mkdir(parents=True, exist_ok=True)
    with staged(dest, overwrite=True, need=2 * source.path.stat().st_size) as staging:
        try:
            with console.status(f"converting {source.source} ({source.path.stat().st_size / 1e6:.0f} MB GGUF) to MLX"):
                summary = convert(source.path, staging, quantize, dtype)
                ids = build_tokenizer(summary["metadata"], staging)
            config = {**summary["config"], **{k: v for k, v in ids.items() if v is not None}}
            (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            if source.ollama:
                (staging / OLLAMA_SETTINGS).write_text(json.dumps(source.ollama, indent=2) + "\n", encoding="utf-8")
            for note in summary["notes"]:
                console.print(f"[yellow]note:[/] {note}")
            entry = describe_entry(staging, name, source.source, None, config["model_type"])
        except Exception as exc:
            raise input_fault(exc, dest, f"could not import {source.source}",
                              "the GGUF may be damaged or of a variant this importer doesn't handle "
                              "(the library is unchanged)") from None
        entry.extra = {"gguf": {"file": str(source.path), "types": summary["types"], "notes": summary["notes"]},
                       "fingerprint": identity}
        write_entry(staging, entry)
    entry.path = str(dest)
    return entry
