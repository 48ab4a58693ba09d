"""`mlxtune pull` by name from an Ollama store and an LM Studio folder laid out as the apps lay them out, and the
one-line refusals of bad inputs (nothing left in the library)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import MLXTUNE, MODEL
from ollama_store import PARAMS, TEMPLATE, make_ollama_store, place
from smollm import smollm2_gguf


@pytest.fixture
def smollm_gguf() -> Path:
    return smollm2_gguf()


def assert_one_error(stderr: str) -> None:
    """One error line and its hint, no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), stderr


def _pull(*args, env_extra: dict):
    """`mlxtune pull ... --json` in a subprocess with these environment variables (the stores' locations)."""
    return subprocess.run([*MLXTUNE, "pull", *args, "--json"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, COLUMNS="120", **env_extra))


def test_ollama_store_by_name_keeps_template_and_stops(tmp_path, smollm_gguf):
    store = tmp_path / "ollama"
    make_ollama_store(store, smollm_gguf)
    home = tmp_path / "home"
    env = {"OLLAMA_MODELS": str(store), "MLXTUNE_HOME": str(home)}

    missing = _pull("ollama:llama3.2", env_extra=env)
    assert missing.returncode == 2 and "smollm2:135m" in missing.stderr  # says what the store has
    assert_one_error(missing.stderr)

    result = _pull("ollama:smollm2:135m", env_extra=env)
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout)
    assert entry["source"] == "ollama:smollm2:135m" and entry["architecture"] == "llama"
    assert entry["quantization"] == {"bits": 4, "group_size": 32}
    kept = json.loads((Path(entry["path"]) / "ollama.json").read_text())
    assert kept == {"template": TEMPLATE, "parameters": PARAMS}


def test_lmstudio_folder_by_name(tmp_path, smollm_gguf):
    home = tmp_path / "user"
    folder = home / ".lmstudio" / "models" / "HuggingFaceTB" / "SmolLM2-135M-Instruct-GGUF"
    place(smollm_gguf, folder / smollm_gguf.name)
    (folder / "mmproj-model-f16.gguf").write_bytes(b"GGUF")  # a vision projector beside it is not the model
    env = {"HOME": str(home), "MLXTUNE_HOME": str(tmp_path / "lib")}
    result = _pull("lmstudio:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", env_extra=env)
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout)
    assert entry["source"] == f"lmstudio:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/{smollm_gguf.name}"
    assert (Path(entry["path"]) / "tokenizer.json").is_file()

    missing = _pull("lmstudio:nobody/nothing", env_extra=env)
    assert missing.returncode == 2 and "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF" in missing.stderr


def _unsupported_arch(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("case", ["not-gguf", "truncated", "architecture", "missing"])
def test_bad_input_is_one_line_and_leaves_no_entry(tmp_path, smollm_gguf, case):
    path = tmp_path / f"{case}.gguf"
    if case == "not-gguf":
        path.write_text("just text\n")
        expected = "not a GGUF file"
    elif case == "truncated":
        with open(smollm_gguf, "rb") as handle:
            path.write_bytes(handle.read(20_000_000))
        expected = "truncated"
    elif case == "architecture":
        _unsupported_arch(path)
        expected = "'gpt2' is not supported"
    else:
        expected = "no such GGUF file"
    home = tmp_path / "home"
    result = _pull(str(path), env_extra={"MLXTUNE_HOME": str(home)})
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr.splitlines()[0]
    assert_one_error(result.stderr)
    library = home / "models"
    assert not library.exists() or not [p for p in library.iterdir()]


def test_the_same_gguf_from_another_path_is_already_in_the_library(tmp_path):
    """A second clone's copy of the GGUF is the same source (compared by size and sha256, not by path): nothing to
    do. The recorded file changed in place is not: refused with the hint, the entry untouched."""
    from mlxtune.export.gguf import export_gguf
    from mlxtune.export.source import open_source

    first, copy = tmp_path / "clone-a" / "stories260K.gguf", tmp_path / "clone-b" / "stories260K.gguf"
    first.parent.mkdir()
    copy.parent.mkdir()
    with open_source(MODEL) as source:
        export_gguf(source, first, "f32")
    shutil.copyfile(first, copy)
    env = {"MLXTUNE_HOME": str(tmp_path / "home")}

    imported = _pull(str(first), env_extra=env)
    assert imported.returncode == 0, imported.stderr
    entry = json.loads(imported.stdout)
    assert entry["extra"]["fingerprint"]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()

    again = _pull(str(copy), env_extra=env)
    assert again.returncode == 0 and "already in the library" in again.stderr, again.stderr
    assert json.loads(again.stdout) == entry  # nothing updated, the source still the first path

    data = bytearray(first.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    first.write_bytes(data)
    changed = _pull(str(first), env_extra=env)
    assert changed.returncode == 2 and "earlier version" in changed.stderr.splitlines()[0], changed.stderr
    assert_one_error(changed.stderr)
    assert json.loads((Path(entry["path"]) / "mlxtune.json").read_text())["created"] == entry["created"]
