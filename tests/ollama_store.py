"""A fake Ollama store laid out as Ollama lays it out: manifests/registry.ollama.ai/library/NAME/TAG naming the model,
template and params blobs in blobs/sha256-<digest>. (A helper module, not a conftest.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

# A legacy Ollama TEMPLATE (.System/.Prompt: the last user message alone, no earlier turns) and its parameters.
TEMPLATE = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n")
PARAMS = {"stop": ["<|im_start|>", "<|im_end|>"], "temperature": 0.2}


def place(source: Path, dest: Path) -> None:
    if dest.exists():  # a blob another tag already named (blobs are named by their content)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, dest)  # the real 98 MB file, without copying it where the filesystem allows
    except OSError:
        shutil.copyfile(source, dest)


def _blob(root: Path, data: bytes | None = None, file: Path | None = None) -> dict:
    digest = hashlib.sha256(data if data is not None else file.read_bytes()).hexdigest()
    path = root / "blobs" / f"sha256-{digest}"
    if data is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        place(file, path)
    return {"digest": f"sha256:{digest}", "size": path.stat().st_size}


def make_ollama_store(root: Path, gguf: Path, name: str = "smollm2", tag: str = "135m", template: str = TEMPLATE,
                      params: dict = PARAMS) -> None:
    """manifests/registry.ollama.ai/library/NAME/TAG naming the model, template and params blobs."""
    layers = [{"mediaType": "application/vnd.ollama.image.model", **_blob(root, file=gguf)},
              {"mediaType": "application/vnd.ollama.image.template", **_blob(root, template.encode())},
              {"mediaType": "application/vnd.ollama.image.params", **_blob(root, json.dumps(params).encode())}]
    config = _blob(root, b'{"model_format":"gguf","model_family":"llama"}')
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
                "layers": layers}
    path = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
