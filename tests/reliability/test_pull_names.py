"""`mlxtune pull --name`: a name is one plain entry inside the library, replacing needs --force, and a failed
replacement never loses the old entry (real CLI, the bundled model, no hub)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import MODEL, run_cli
from mlxtune.errors import UsageError
from mlxtune.hub import pull
from mlxtune.library import check_entry_name, remove_model
from mlxtune.storage import clean_stale
from mlxtune.ui import make_console


def _pull(home: Path, *args):
    saved = os.environ.get("MLXTUNE_HOME")
    os.environ["MLXTUNE_HOME"] = str(home)
    try:
        return run_cli("pull", *args)
    finally:
        os.environ["MLXTUNE_HOME"] = saved


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A library holding one entry `keep` (an 8-bit conversion of the bundled model)."""
    home = tmp_path_factory.mktemp("home")
    result = _pull(home, MODEL, "-q", "8", "--name", "keep", "--json")
    assert result.returncode == 0, result.stderr
    return home


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["../../victim", ".", "/abs/victim"])
def test_names_outside_the_library_are_refused_and_nothing_is_deleted(home, name):
    victim = home.parent / "victim"  # what ../../victim would reach from inside the library
    victim.mkdir(exist_ok=True)
    (victim / "precious.txt").write_text("keep me")
    before = _tree(home)
    result = _pull(home, MODEL, "-q", "8", "--name", name, "--force")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: --name") and "not a plain model name" in lines[0], result.stderr
    assert lines[1].startswith("hint:") and "--name my-model" in lines[1]
    assert (victim / "precious.txt").read_text() == "keep me"
    assert _tree(home) == before, "the library was changed by a refused pull"


@pytest.mark.parametrize("name", ["..", "a/b", "a\\b", ".hidden", "", "x" * 300, "-rf", "name\n"])
def test_only_plain_names_are_accepted(name):
    with pytest.raises(UsageError, match="not a plain model name"):
        check_entry_name(name)
    assert check_entry_name("my-model_v2.1+q4") == "my-model_v2.1+q4"


def test_existing_entry_needs_force_and_is_replaced_in_one_swap(home, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(MODEL, other)
    before = _tree(home / "models" / "keep")
    refused = _pull(home, other, "-q", "8", "--name", "keep")
    assert refused.returncode == 2
    assert "keep is already in the library and holds" in refused.stderr and "--force" in refused.stderr
    assert _tree(home / "models" / "keep") == before

    # The same source again is not a replacement: the entry is reused.
    saved = os.environ["MLXTUNE_HOME"]
    os.environ["MLXTUNE_HOME"] = str(home)
    try:
        again = pull(str(MODEL), quantize="8", name="keep", console=make_console(quiet=True))
    finally:
        os.environ["MLXTUNE_HOME"] = saved
    assert again.source == str(MODEL.resolve()) and _tree(home / "models" / "keep") == before

    replaced = _pull(home, other, "-q", "4", "--name", "keep", "--force", "--json")
    assert replaced.returncode == 0, replaced.stderr
    entry = json.loads(replaced.stdout)
    assert entry["source"] == str(other.resolve()) and entry["quantization"]["bits"] == 4
    assert not [p.name for p in (home / "models").iterdir() if p.name.startswith(".")], "staging left behind"


def test_failed_forced_replacement_keeps_the_old_entry(home, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(MODEL, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut in half
    before = _tree(home / "models" / "keep")
    result = _pull(home, broken, "-q", "8", "--name", "keep", "--force")
    assert result.returncode == 2, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: could not convert"), result.stderr
    assert _tree(home / "models" / "keep") == before, "the old entry was lost"
    assert not [p.name for p in (home / "models").iterdir() if p.name.startswith(".")], "staging left behind"


def test_a_directory_that_is_not_an_entry_is_not_replaced_without_force(home):
    mine = home / "models" / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    result = _pull(home, MODEL, "-q", "8", "--name", "mine")
    assert result.returncode == 2 and "is not a model pulled by mlxtune" in result.stderr
    assert (mine / "notes.txt").read_text() == "mine"
    shutil.rmtree(mine)


def test_a_swap_killed_between_its_renames_gets_the_old_entry_back(tmp_path):
    # What a SIGKILL between "old entry moved aside" and "new entry moved in" leaves: only the hidden old copy.
    library = tmp_path / "models"
    aside = library / ".keep.old-999999999"  # no such PID: its writer is dead
    aside.mkdir(parents=True)
    (aside / "weights").write_text("old")
    (library / ".keep.partial-999999999").mkdir()  # and the new entry's unfinished staging copy
    clean_stale(library / "keep")
    assert (library / "keep" / "weights").read_text() == "old"
    assert sorted(p.name for p in library.iterdir()) == ["keep"]


def test_rm_of_a_linked_entry_removes_the_link_not_its_target(home, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(home / "models" / "keep", elsewhere)
    (home / "models" / "linked").symlink_to(elsewhere)
    saved = os.environ["MLXTUNE_HOME"]
    os.environ["MLXTUNE_HOME"] = str(home)
    try:
        remove_model("linked")
    finally:
        os.environ["MLXTUNE_HOME"] = saved
    assert not (home / "models" / "linked").exists() and (elsewhere / "config.json").is_file()
