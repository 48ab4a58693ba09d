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


def test_quickstart_showcase_puts_base_tuned_and_reference_side_by_side(trained_run, monkeypatch, capsys):
    """The quickstart's last step on a real run: each question with its reference answer, the base model's and the
    tuned model's one-line answers, a decoding that does not loop, and the learned-format count."""
    import json
    import runpy

    from conftest import MODEL, WIKISQL

    run_dir, _ = trained_run
    script = ROOT / "scripts" / "quickstart_showcase.py"  # run as the quickstart runs it, in this process (faster)
    monkeypatch.setattr(sys, "argv", [str(script), str(MODEL), str(run_dir), str(WIKISQL), "--examples", "3",
                                      "--count", "2"])
    runpy.run_path(str(script), run_name="__main__")
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    first = json.loads((WIKISQL / "valid.jsonl").read_text().splitlines()[0])["text"]
    assert f"  reference  {first.rsplit('A:', 1)[1].strip()}" in lines
    for name in ("base", "tuned"):
        answers = [line.split(None, 1)[1] for line in lines if line.startswith(f"  {name} ")]
        assert len(answers) == 3, stdout
    # The decoding does not loop (greedy alone makes the base model repeat "Chirpy is so surprised!"): no run of four
    # words twice in one answer. (This fixture's tuned model has had only 8 steps: its answers are not checked.)
    for text in [line.split(None, 1)[1] for line in lines if line.startswith("  base ")]:
        words = text.split()
        grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
        assert len(grams) == len(set(grams)), f"base loops: {text}"
    assert re.search(r"learned SQL format on 2 held-out questions: base \d/2, tuned \d/2", stdout)


def test_test_script_says_what_the_long_quiet_install_is_before_it_starts(tmp_path):
    """On a fresh machine the llama-cpp-python compile is ~30 silent minutes: test.sh says so first."""
    import shutil
    import stat

    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "test.sh", tmp_path / "scripts" / "test.sh")
    (tmp_path / "scripts" / "_venv.sh").write_text('echo "==> (the install would run here)"\n')
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 1\n")  # a fresh venv: no torch, no llama_cpp
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "test.sh")], capture_output=True, text=True,
                            env={**os.environ, "MLXTUNE_NO_APT": "1"}, timeout=60)
    out = result.stdout
    assert "compiles llama-cpp-python from source" in out and "MLXTUNE_SKIP_INTEROP=1" in out
    assert out.index("compiles llama-cpp-python") < out.index("the install would run here")
    assert "PyTorch (CPU, ~200 MB download)" in out


def test_bench_grpo_refuses_settings_that_would_time_nothing(capsys):
    """The GRPO benchmark's arguments (its runs take minutes; only the parsing is checked here)."""
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("bench_grpo", ROOT / "scripts" / "bench_grpo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--models", "stories", "--iters", "5", "--group", "4"])
    assert (args.iters, args.group, args.mlxtune_side) == (5, 4, "auto")
    for bad in (["--iters", "2"], ["--group", "0"], ["--prompts", "1", "--prompts-per-step", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(bad)
        assert exit_info.value.code == 2
    assert "warm-up steps" in capsys.readouterr().err
