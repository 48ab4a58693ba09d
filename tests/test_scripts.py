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
