"""Shared fixtures: the bundled real model and data, and one real training run made through the CLI."""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The tokenization cache and model library of the tests live in a throwaway home (subprocesses inherit it),
# removed when the session (or the xdist worker) ends.
os.environ["MLXTUNE_HOME"] = tempfile.mkdtemp(prefix="mlxtune-test-home-")
atexit.register(shutil.rmtree, os.environ["MLXTUNE_HOME"], ignore_errors=True)

import mlxtune  # noqa: F401  (first: binds MLX to the system BLAS before mlx is imported)
import pytest

from mlxtune.backend import enable_fast_jit
from mlxtune.cpu_activations import use_fast_swiglu

# MLX's CPU kernels compiled as the command compiles them (backend.py), and the blocks' SwiGLU as every command's
# model computes it (cpu_activations.py, also for models loaded here with mlx-lm's own `load`): a result computed in
# this process and one made by a `mlxtune` subprocess come from the same functions and kernels, whatever order the
# tests run in.
enable_fast_jit()
use_fast_swiglu()

from mlxtune.synthetic import corrupt_answer

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "stories260K"
WIKISQL = ROOT / "examples" / "data" / "wikisql"
WWDC25 = ROOT / "tests" / "fixtures" / "wwdc25"
MLXTUNE = [sys.executable, "-m", "mlxtune"]


def run_cli(*args, input: str | None = None, cwd: Path | None = None, timeout: int = 600):
    env = dict(os.environ, COLUMNS="120")
    return subprocess.run(
        [*MLXTUNE, *map(str, args)], input=input, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


# Preference pairs from the bundled WikiSQL data (dpo/orpo tests in train/ and reliability/):
# chosen = the true SQL answer, rejected = a word-order corruption of it (mlxtune.synthetic.corrupt_answer).
def make_pairs(out: Path, train: int = 160, valid: int = 32, longest: int = 120) -> Path:
    """Short WikiSQL questions with their SQL (chosen) and a word-order corruption of it (rejected)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, wanted in (("train", train), ("valid", valid)):
        pairs = []
        for line in (WIKISQL / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            head, answer = json.loads(line)["text"].rsplit("\nA: ", 1)
            question = head.rsplit("\nQ: ", 1)[1].strip()
            if len(question) + len(answer) <= longest and len(answer.split()) > 3:
                rejected = corrupt_answer(answer, len(pairs), rng)
                if rejected != answer:
                    pairs.append({"prompt": question, "chosen": answer, "rejected": rejected})
            if len(pairs) == wanted:
                break
        (out / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return out


def mlx_greedy(model, ids: list[int], n: int = 32, eos: int | None = None) -> list[int]:
    """Plain greedy decoding, recomputing the whole prefix each step (tiny models: exactness over speed)."""
    import mlx.core as mx

    tokens, out = list(ids), []
    for _ in range(n):
        token = int(mx.argmax(model(mx.array(tokens)[None])[0, -1]).item())
        if token == eos:
            break
        out.append(token)
        tokens.append(token)
    return out


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return MODEL


@pytest.fixture(scope="session")
def wikisql_dir() -> Path:
    return WIKISQL


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[Path, dict]:
    """A short real LoRA run on stories260K + WikiSQL through the CLI (shared by the CLI, fuse and chat tests)."""
    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    result = run_cli(
        "lora", "--model", MODEL, "--data", WIKISQL, "--out", run_dir, "--iters", 8, "--lr", "3e-3",
        "--batch-size", 4, "--max-seq-length", 128, "--eval-every", 4, "--save-every", 4, "--report-every", 2,
        "--val-batches", 2, "--json",
    )
    assert result.returncode == 0, result.stderr
    return run_dir, json.loads(result.stdout)


# Scheduling under pytest-xdist (scripts/test.sh: `-n 2 --dist loadfile`, one file = one unit of work). xdist's
# default queue puts files with the most tests first, so the slowest files, which hold one to seven tests, started
# last: one worker still ran a 70 s file while the other had finished. These files go first instead (longest first:
# idle seconds, measured), and the rest keep xdist's order (most tests first). A new slow file belongs here.
SLOWEST_FILES = [
    "importers/test_smollm2_end_to_end.py",  # ~260 s
    "importers/test_smollm2_grpo.py",  # ~160 s alone (the GGUF import included)
    "train/test_distributed.py",  # ~150 s
    "verify/test_verify.py",  # ~95 s
    "train/test_memory.py",  # ~90 s
    "reliability/test_kill_suite.py",  # ~70 s
    "train/test_preference_run.py",  # ~65 s
    "importers/test_gguf_types.py",  # ~40 s
]


def pytest_configure(config):
    if getattr(config.option, "loadscopereorder", None) is not None:  # the xdist controller: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """The files of SLOWEST_FILES first, in its order; then the others, most tests first (xdist's own order).
    A stable sort: each file's tests stay together and in their order (module fixtures are made once)."""
    tests = Path(__file__).resolve().parent
    counts: dict = {}
    for item in items:
        counts[item.path] = counts.get(item.path, 0) + 1

    def rank(item):
        name = item.path.relative_to(tests).as_posix() if item.path.is_relative_to(tests) else ""
        return (SLOWEST_FILES.index(name), 0) if name in SLOWEST_FILES else (len(SLOWEST_FILES), -counts[item.path])

    items.sort(key=rank)
