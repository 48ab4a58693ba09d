"""The setup scripts a new user runs first: their output must not look like errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

# setuptools' own notice, emitted as pip's editable install builds the wheel (pip shows it as a boxed warning).
EMIT = ("from setuptools.warnings import InformationOnly; "
        "InformationOnly.emit('Editable installation.', 'Please be careful with folders in your working directory')")


def test_venv_script_silences_the_editable_installation_notice():
    script = (ROOT / "scripts" / "_venv.sh").read_text()
    match = re.search(r'^PIP_QUIET_WARNINGS="([^"]+)"', script, re.M)
    assert match and script.count('PYTHONWARNINGS="$PIP_QUIET_WARNINGS" "$VENV_PY" -m pip install') == 2
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    loud = subprocess.run([sys.executable, "-c", EMIT], capture_output=True, text=True, env=env)
    assert "Editable installation" in loud.stderr  # what pip would show without the filter
    quiet = subprocess.run([sys.executable, "-c", EMIT], capture_output=True, text=True,
                           env={**env, "PYTHONWARNINGS": match.group(1)})
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_quickstart_showcase_puts_base_tuned_and_reference_side_by_side(trained_run):
    """The quickstart's last step on a real run: each question with its reference answer, the base model's and the
    tuned model's one-line answers (no word looping), and the learned-format count."""
    import json

    from conftest import MODEL, WIKISQL

    run_dir, _ = trained_run
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "quickstart_showcase.py"), str(MODEL),
                             str(run_dir), str(WIKISQL), "--examples", "2", "--count", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    first = json.loads((WIKISQL / "valid.jsonl").read_text().splitlines()[0])["text"]
    assert f"  reference  {first.rsplit('A:', 1)[1].strip()}" in lines
    for name in ("base", "tuned"):
        answers = [line.split(None, 1)[1] for line in lines if line.startswith(f"  {name} ")]
        assert len(answers) == 2, result.stdout
        for text in answers:
            words = text.split()
            assert not any(words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2)), text
    assert re.search(r"learned SQL format on 2 held-out questions: base \d/2, tuned \d/2", result.stdout)
