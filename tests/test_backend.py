"""The Linux BLAS hook: same training numbers as MLX's own BLAS, and MLXTUNE_BLAS=none turns it off."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import MODEL, WIKISQL
from mlxtune.backend import USER_TMPDIR_ENV, find_blas

TRAIN_FIVE_STEPS = f"""
import json, mlxtune
from mlxtune import LoraSettings
from mlxtune.backend import blas_status
from mlxtune.train.loop import finetune
from mlxtune.ui import make_console
import tempfile
out = tempfile.mkdtemp()
settings = LoraSettings(model={str(MODEL)!r}, data={str(WIKISQL)!r}, out=out + "/run", iters=5, batch_size=2,
                        max_seq_length=96, report_every=1, eval_every=100, val_batches=1, learning_rate=1e-3)
finetune(settings, console=make_console(quiet=True))
losses = [json.loads(l)["train_loss"] for l in open(out + "/run/metrics.jsonl") if "train_loss" in l]
print(json.dumps({{"losses": losses, "blas": blas_status()}}))
"""


def _train(blas_setting: str | None) -> dict:
    env = dict(os.environ)
    env.pop("MLXTUNE_BLAS", None)
    if blas_setting is not None:
        env["MLXTUNE_BLAS"] = blas_setting
    done = subprocess.run([sys.executable, "-c", TRAIN_FIVE_STEPS], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or find_blas() is None, reason="needs Linux with OpenBLAS/BLIS")
def test_blas_hook_trains_to_the_same_losses_and_can_be_disabled():
    accelerated = _train(None)
    plain = _train("none")
    assert accelerated["blas"]["library"] and accelerated["blas"]["reason"] == "loaded"
    assert plain["blas"]["library"] is None and plain["blas"]["reason"] == "disabled by MLXTUNE_BLAS"
    assert len(accelerated["losses"]) == len(plain["losses"]) == 5
    for fast, slow in zip(accelerated["losses"], plain["losses"]):
        assert abs(fast - slow) <= 1e-5 * abs(slow)


STARTS_WITHOUT_TORCH = """
import sys
from mlxtune.backend import hide_torch, torch_was_hidden, unhide_torch
assert hide_torch()
import mlx_lm.tokenizer_utils  # what every command imports: transformers, which imports torch where it finds it
from transformers.utils.import_utils import is_torch_available
print("loaded", "torch" in sys.modules and sys.modules["torch"] is not None, "available", is_torch_available())
try:
    import torch
except ImportError as exc:
    print("hidden error", torch_was_hidden(exc))
unhide_torch()
import torch  # a user's reward function may
print("user import", torch.__name__)
"""


def test_the_command_starts_without_importing_torch_and_user_code_still_can():
    """transformers (through mlx-lm's tokenizer code) imports PyTorch whenever it finds it: a second of every
    command's start. Hidden, transformers must settle on "no torch"; an upgrade that stops asking `find_spec`
    fails here (the command would then restart itself with MLXTUNE_IMPORT_TORCH=1, a second slower)."""
    pytest.importorskip("torch")  # the interop extra: without torch there is nothing to hide
    done = subprocess.run([sys.executable, "-c", STARTS_WITHOUT_TORCH], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:3] == ["loaded False available False", "hidden error True", "user import torch"]
    started = subprocess.run([sys.executable, "-X", "importtime", "-m", "mlxtune", "data", "check", str(WIKISQL),
                              "--model", str(MODEL)], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in started.stderr.splitlines() if line.startswith("import time")}
    assert "transformers" in imported and "torch" not in imported


FLAGGED_KERNEL = """
import hashlib, json, os, sys, tempfile
import numpy as np
before = tempfile.gettempdir()
from mlxtune.backend import enable_fast_jit, jit_status
directory = enable_fast_jit()
import mlx.core as mx
x = mx.random.normal((1000,), key=mx.random.key(0)) * 4
compiled = mx.compile(lambda a: mx.exp(a) * 1.5 + a * a)(x)  # a*a+… FMA would contract, unless told not to
mx.eval(compiled)
kernels = os.path.join(os.environ["TMPDIR"], "mlx", mx.__version__, "cpu")
newest = max((os.path.join(kernels, f) for f in os.listdir(kernels) if f.endswith(".so") and "Exp" in f),
             key=os.path.getmtime)
print(json.dumps({"directory": directory, "status": jit_status(), "tmp_after": tempfile.gettempdir(),
                  "tmp_before": before,
                  "path0": os.environ["PATH"].split(os.pathsep)[0], "kernel": newest,
                  "bits": hashlib.sha256(np.array(compiled).tobytes()).hexdigest()}))
"""


def _vector_cpu_with_compiler() -> bool:
    from mlxtune.backend import JIT_CPU_FLAGS, _cpu_flags

    return (platform.system() == "Linux" and platform.machine() == "x86_64" and JIT_CPU_FLAGS <= _cpu_flags()
            and shutil.which("g++") is not None and shutil.which("objdump") is not None)


@pytest.mark.skipif(not _vector_cpu_with_compiler(), reason="needs Linux x86-64 with AVX2/FMA, g++ and objdump")
def test_mlx_compiles_its_cpu_kernels_with_the_cpus_vector_instructions(tmp_path):
    """enable_fast_jit: a new MLX kernel lands in mlxtune's directory, built with FMA instructions (a plain build
    calls libm's fmaf instead), with the same numbers bit for bit; Python's own temporary files stay where they
    were; a child of a process that has it on builds with the real compiler. And the command turns it on: doctor
    reports it."""
    env = {k: v for k, v in os.environ.items() if k != "MLXTUNE_JIT"}
    # as from the user's shell: this test process has the JIT on (conftest.py), and its children inherit that
    shell = {k: v for k, v in env.items() if k != USER_TMPDIR_ENV}
    shell["TMPDIR"] = os.environ.get(USER_TMPDIR_ENV, tempfile.gettempdir())
    shell["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if "mlx-jit" not in p)
    fresh = dict(shell, XDG_CACHE_HOME=str(tmp_path))  # an empty kernel directory: every kernel compiled here
    done = subprocess.run([sys.executable, "-c", FLAGGED_KERNEL], capture_output=True, text=True, env=fresh,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"]["reason"] == "enabled" and report["directory"].startswith(str(tmp_path))
    assert report["kernel"].startswith(report["directory"])
    assert report["tmp_after"] == report["tmp_before"] and report["path0"].startswith(report["directory"])
    # bit for bit what MLX's own kernel computes: FMA only where its code calls fma (libm's fmaf computes the same)
    (tmp_path / "plain").mkdir()
    plain = subprocess.run([sys.executable, "-c", FLAGGED_KERNEL], capture_output=True, text=True,
                           env=dict(fresh, MLXTUNE_JIT="off", TMPDIR=str(tmp_path / "plain")), timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert json.loads(plain.stdout.strip().splitlines()[-1])["bits"] == report["bits"]
    assembly = subprocess.run(["objdump", "-d", report["kernel"]], capture_output=True, text=True).stdout
    assert "vfmadd" in assembly and "fmaf@plt" not in assembly
    shim = Path(report["directory"], "bin", "g++").read_text()
    # A child of a process that has it on (a distributed rank, this test's own children) sees the shim first on PATH:
    # it still builds with the real compiler — the same directory, the shim unchanged (not a shim calling itself) —
    # and its temporary files stay in the user's directory
    other = FLAGGED_KERNEL.replace("exp(a) * 1.5", "exp(a) * a")
    child = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True,
                           env=dict(env, XDG_CACHE_HOME=str(tmp_path)), timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    inherited = json.loads(child.stdout.strip().splitlines()[-1])
    assert inherited["directory"] == report["directory"] and inherited["kernel"] != report["kernel"]
    assert Path(report["directory"], "bin", "g++").read_text() == shim and "mlx-jit" not in shim.split("exec")[1]
    assert inherited["tmp_after"] == os.environ.get(USER_TMPDIR_ENV, tempfile.gettempdir())
    doctor = subprocess.run([sys.executable, "-m", "mlxtune", "doctor", "--json", "--no-measure"],
                            capture_output=True, text=True, env=env, timeout=300)
    kernels = json.loads(doctor.stdout)["mlx_cpu_kernels"]
    assert kernels["compiler_flags"] == "-mavx2 -mfma -mf16c -ffp-contract=off" and kernels["fast_swiglu"] is True
    off = subprocess.run([sys.executable, "-m", "mlxtune", "doctor", "--json", "--no-measure"], capture_output=True,
                         text=True, env=dict(env, MLXTUNE_JIT="off"), timeout=300)
    assert json.loads(off.stdout)["mlx_cpu_kernels"]["status"] == "disabled by MLXTUNE_JIT"
