"""The Linux BLAS hook: same training numbers as MLX's own BLAS, and MLXTUNE_BLAS=none turns it off."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import MODEL, WIKISQL
from mlxtune.backend import find_blas

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
