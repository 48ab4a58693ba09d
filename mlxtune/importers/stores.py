"""Where the GGUF files users already run live: a path, Ollama's store (`ollama:NAME[:TAG]`) or LM Studio's models
folder (`lmstudio:PUBLISHER/NAME`). Resolves a reference to the GGUF file plus what the app keeps beside it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from mlxtune.errors import UsageError
from mlxtune.paths import lmstudio_models_dir, ollama_models_dir

OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_MODEL = "application/vnd.ollama.image.model"
OLLAMA_TEXT_LAYERS = {"application/vnd.ollama.image.template": "template",
                      "application/vnd.ollama.image.system": "system"}
OLLAMA_PARAMS = "application/vnd.ollama.image.params"


@dataclass
class GGUFSource:
    """A GGUF file to import, the name the library entry starts from, and the app's own settings (Ollama's TEMPLATE,
    SYSTEM and parameters such as `stop`), kept with the model for `export --format ollama`."""

    path: Path
    source: str  # what the entry records as its origin
    base_name: str
    ollama: dict = field(default_factory=dict)


def is_gguf_reference(reference: str) -> bool:
    return str(reference).startswith(("ollama:", "lmstudio:")) or str(reference).lower().endswith(".gguf")


def resolve(reference: str) -> GGUFSource:
    reference = str(reference)
    if reference.startswith("ollama:"):
        return ollama_model(reference.removeprefix("ollama:"))
    if reference.startswith("lmstudio:"):
        return lmstudio_model(reference.removeprefix("lmstudio:"))
    path = Path(reference).expanduser()
    if not path.is_file():
        raise UsageError(f"{reference}: no such GGUF file", "give the path of a .gguf file, ollama:NAME or "
                                                           "lmstudio:PUBLISHER/NAME")
    return GGUFSource(path=path, source=str(path.resolve()), base_name=path.name[:-len(".gguf")])


def fingerprint(path: Path, recorded: dict | None = None) -> dict:
    """What makes the GGUF at `path` the same model wherever it lies: its size and the sha256 of its bytes (read in
    1 MiB pieces), with its resolved path and mtime. `recorded` is an earlier fingerprint: when it names this very
    file, unchanged (same path, size and mtime), its digest is reused instead of reading gigabytes again."""
    stat = path.stat()
    where = {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if recorded and recorded.get("sha256") and all(recorded.get(key) == value for key, value in where.items()):
        return {**where, "sha256": recorded["sha256"]}
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(1 << 20):
            digest.update(piece)
    return {**where, "sha256": digest.hexdigest()}


# ---------------------------------------------------------------------------------------------------- Ollama


def _ollama_manifest_path(root: Path, name: str) -> Path:
    """manifests/<host>/<namespace>/<model>/<tag>, as `ollama pull` lays it out (`library` for official models)."""
    model, _, tag = name.partition(":")
    parts = model.split("/")
    if len(parts) == 1:
        parts = [OLLAMA_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [OLLAMA_REGISTRY, *parts]
    return root / "manifests" / Path(*parts) / (tag or "latest")


def ollama_names(root: Path) -> list[str]:
    """The models in the store, as `ollama list` names them."""
    base = root / "manifests"
    names = []
    for manifest in sorted(base.glob("*/*/*/*")) if base.is_dir() else []:
        host, namespace, model, tag = manifest.relative_to(base).parts
        prefix = "" if (host, namespace) == (OLLAMA_REGISTRY, "library") else (
            f"{namespace}/" if host == OLLAMA_REGISTRY else f"{host}/{namespace}/")
        names.append(f"{prefix}{model}:{tag}")
    return names


def _blob(root: Path, digest: str) -> Path:
    return root / "blobs" / digest.replace(":", "-")


def ollama_model(name: str) -> GGUFSource:
    root = ollama_models_dir()
    if not name or ".." in name.split("/") or name.startswith("/"):
        raise UsageError(f"ollama:{name} is not an Ollama model name", "use ollama:NAME[:TAG], e.g. ollama:llama3.2:1b")
    manifest_file = _ollama_manifest_path(root, name)
    if not manifest_file.is_file():
        there = ollama_names(root)
        raise UsageError(f"ollama:{name} is not in Ollama's store ({root})",
                         f"it has: {', '.join(there)}" if there else
                         "it is empty; `ollama pull NAME` first, or set OLLAMA_MODELS to your store")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        layers = {layer["mediaType"]: layer["digest"] for layer in manifest["layers"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{manifest_file}: not an Ollama manifest ({type(exc).__name__}: {exc})".splitlines()[0],
                         "`ollama pull` the model again") from None
    if OLLAMA_MODEL not in layers:
        raise UsageError(f"ollama:{name} has no model layer in its manifest", "`ollama pull` the model again")
    settings = {}
    for media_type, key in OLLAMA_TEXT_LAYERS.items():
        if media_type in layers:
            settings[key] = _blob(root, layers[media_type]).read_text(encoding="utf-8")
    if OLLAMA_PARAMS in layers:
        settings["parameters"] = json.loads(_blob(root, layers[OLLAMA_PARAMS]).read_text(encoding="utf-8"))
    model_blob = _blob(root, layers[OLLAMA_MODEL])
    if not model_blob.is_file():
        raise UsageError(f"ollama:{name}: its model blob {model_blob} is missing", "`ollama pull` the model again")
    full = name if ":" in name else f"{name}:latest"
    base = full.rsplit("/", 1)[-1].replace(":", "-")
    return GGUFSource(path=model_blob, source=f"ollama:{full}", base_name=base, ollama=settings)


# ------------------------------------------------------------------------------------------------- LM Studio


def lmstudio_model(name: str) -> GGUFSource:
    """`PUBLISHER/NAME` (a folder with one model GGUF) or `PUBLISHER/NAME/FILE.gguf`."""
    root = lmstudio_models_dir()
    parts = name.split("/")
    if len(parts) not in (2, 3) or any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"lmstudio:{name} is not an LM Studio model name",
                         "use lmstudio:PUBLISHER/NAME or lmstudio:PUBLISHER/NAME/FILE.gguf")
    folder = root / parts[0] / parts[1]
    if not folder.is_dir():
        there = sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/*") if p.is_dir()) if root.is_dir() else []
        raise UsageError(f"lmstudio:{name} is not in LM Studio's models folder ({root})",
                         f"it has: {', '.join(there)}" if there else "download it in LM Studio first")
    # mmproj files are vision projectors that sit next to the language model, not models themselves.
    files = sorted(p for p in folder.glob("*.gguf") if not p.name.lower().startswith("mmproj"))
    if len(parts) == 3:
        files = [p for p in files if p.name == parts[2]]
    if len(files) != 1:
        listing = ", ".join(p.name for p in sorted(folder.glob("*.gguf"))) or "no .gguf files"
        raise UsageError(f"lmstudio:{name}: {'several' if files else 'no'} model GGUF files in {folder} ({listing})",
                         f"name one: lmstudio:{parts[0]}/{parts[1]}/FILE.gguf")
    return GGUFSource(path=files[0], source=f"lmstudio:{parts[0]}/{parts[1]}/{files[0].name}",
                      base_name=files[0].name[:-len(".gguf")])
