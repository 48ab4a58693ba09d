"""Every recipe in configs/ is valid: known keys, values that pass the settings' own checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxtune.settings import LoraSettings, read_yaml_config
from mlxtune.errors import UsageError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_is_valid(path):
    settings = LoraSettings(**read_yaml_config(path)).validate()
    assert settings.model and settings.data


def test_unknown_key_is_rejected_with_a_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1e-4\n")
    with pytest.raises(UsageError) as error:
        read_yaml_config(bad)
    assert "unknown setting 'learning_rat'" in error.value.message and "learning_rate" in error.value.hint


def test_yaml_numbers_without_a_dot_and_wrong_types(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1e-4\nrank: '16'\n")
    values = read_yaml_config(config)
    assert values == {"learning_rate": 1e-4, "rank": 16}
    config.write_text("learning_rate: fast\n")
    with pytest.raises(UsageError, match="learning_rate must be a number"):
        read_yaml_config(config)
    config.write_text("pack: maybe\n")
    with pytest.raises(UsageError, match="pack must be true or false"):
        read_yaml_config(config)
