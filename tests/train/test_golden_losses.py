"""Golden per-step training losses (torchtune-style): SFT (LoRA), DPO and ORPO on the bundled story model with a fixed
seed, recorded from the code as it was before the loss/engine changes. A change that moves the numbers (the order of
the batches, the loss's arithmetic, the optimizer) fails here; one that only moves memory or speed does not.

To re-record after a change that is *meant* to move the numbers: run this file with GOLDEN_PRINT=1 and `-s`, and
say in the commit why the numbers moved.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import MODEL, WIKISQL, make_pairs

from mlxtune.settings import LoraSettings
from mlxtune.ui import make_console

STEPS = 5
RELATIVE = 1e-5  # float32 on the CPU backend: a change of summation order moves the 7th digit, not the 5th

# Recorded on main at 3d910da (MLX 0.32.4, CPU backend, Linux x86_64).
GOLDEN = {
    "sft": [5.03750099143401, 5.032369541407575, 4.515299295464165, 4.04771316741517, 4.280334821428571],
    "dpo": [0.693147182, 0.406309754, 0.205464646, 0.207547039, 0.251553625],
    "orpo": [7.50330114, 6.15479231, 5.16602755, 4.74140263, 4.78530502],
}


def _losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r]


def _check(name: str, losses: list[float]) -> None:
    if os.environ.get("GOLDEN_PRINT"):
        print(f'\n    "{name}": {losses},')
    assert len(losses) == STEPS
    assert losses == pytest.approx(GOLDEN[name], rel=RELATIVE), (name, losses)


def test_sft_lora_losses_are_the_golden_ones(tmp_path):
    from mlxtune.train.loop import finetune

    settings = LoraSettings(model=str(MODEL), data=str(WIKISQL), out=str(tmp_path / "sft"), iters=STEPS, seed=0,
                            learning_rate=3e-3, report_every=1, eval_every=10**6, save_every=10**6,
                            val_batches=1, grad_accumulation=2, memory="64GB",
                            max_seq_length=2048)  # as recorded (the default is now min(2048, the context): 512 here)
    finetune(settings, console=make_console(quiet=True), force=True)
    _check("sft", _losses(tmp_path / "sft"))


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_losses_are_the_golden_ones(objective, tmp_path):
    from mlxtune.train.preference.run import PreferenceSettings, train_preference

    pairs = make_pairs(tmp_path / "pairs", train=48, valid=8)
    settings = PreferenceSettings(model=str(MODEL), data=str(pairs), out=str(tmp_path / objective), iters=STEPS,
                                  seed=0, objective=objective, learning_rate=3e-3, batch_size=8,
                                  max_seq_length=128, report_every=1, eval_every=10**6, save_every=10**6,
                                  val_batches=1, memory="64GB")
    train_preference(settings, console=make_console(quiet=True), force=True)
    _check(objective, _losses(tmp_path / objective))
