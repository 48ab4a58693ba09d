"""Fuse on real runs of stories260K: full-precision merges match base + adapter, a QLoRA base is dequantized before
the merge, and a re-quantized fuse reports the survival figure exactly as defined."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from conftest import MODEL, WIKISQL, run_cli
from mlxtune import LoraSettings, finetune
from mlxtune.train.validation import validation_loss
from mlxtune.fuse import fuse_run, survival_ratio, survival_warning
from mlxtune.hub import pull
from mlxtune.models import load_model
from mlxtune.runs import open_run
from mlxtune.data.dataset import load_datasets
from mlxtune.ui import make_console


def _validation_examples(run_dir: Path, tokenizer):
    run = open_run(run_dir)
    return load_datasets(run.settings.data, tokenizer, **run.settings.dataset_options()).valid


def _float32_loss(path: Path, examples, adapter: Path | None = None, run_dir: Path | None = None) -> float:
    """The validation loss as the run's training measured it (its batch size and val_batches subset)."""
    settings = open_run(run_dir).settings
    model, _, _ = load_model(path, adapter)
    model.set_dtype(mx.float32)
    model.eval()
    return validation_loss(model, examples, settings.batch_size, settings.val_batches)


def test_requantized_fuse_reports_survival_as_defined(trained_run, tmp_path):
    run_dir, training = trained_run
    out = tmp_path / "fused-q4"
    result = run_cli("fuse", run_dir, "--out", out, "--quantize", "4", "--group-size", "32", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is pure JSON: mlx-lm's own prints are kept out of it
    assert report["quantization"] == {"bits": 4, "group_size": 32} and report["tolerance"] is None

    _, tokenizer, _ = load_model(MODEL)
    examples = _validation_examples(run_dir, tokenizer)
    loss_base = _float32_loss(MODEL, examples, run_dir=run_dir)
    loss_adapter = _float32_loss(MODEL, examples, run_dir, run_dir=run_dir)
    loss_fused = _float32_loss(out, examples, run_dir=run_dir)
    # The same numbers the run's summary showed: its starting and final validation loss.
    assert report["loss_base"] == pytest.approx(training["initial_val_loss"], abs=1e-4)
    assert report["loss_adapter"] == pytest.approx(training["final_val_loss"], abs=1e-4)
    assert report["loss_split"] == "valid" and report["loss_examples"] == 8  # --val-batches 2 × --batch-size 4
    assert report["loss_base"] == pytest.approx(loss_base, abs=1e-4)
    assert report["loss_adapter"] == pytest.approx(loss_adapter, abs=1e-4)
    assert report["loss_fused"] == pytest.approx(loss_fused, abs=1e-4)
    assert report["survival"] == pytest.approx((loss_base - loss_fused) / (loss_base - loss_adapter), abs=1e-3)
    assert 0.5 < report["survival"] < 1.01 and report["mean_kl"] > 1e-4

    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    card = (out / "README.md").read_text()
    assert "finetune gain kept" in card and str(MODEL) in card and "1000 train" in card
    assert "Validation loss as training measures it (8 validation examples)" in card
    saved = json.loads((out / "mlxtune_fuse.json").read_text())
    assert saved["survival"] == report["survival"]
    # transformers re-saves only tokenizer.json: the SentencePiece model (read by llama.cpp's converter and our GGUF
    # writer) must travel too, byte for byte.
    assert (out / "tokenizer.model").read_bytes() == (MODEL / "tokenizer.model").read_bytes()


def test_survival_ratio_definition():
    assert survival_ratio(3.0, 2.0, 2.1) == pytest.approx(0.9)
    assert survival_ratio(3.0, 2.0, 2.0) == pytest.approx(1.0)
    assert survival_ratio(3.0, 3.2, 3.0) is None  # nothing gained, nothing to keep


def test_low_survival_warns_and_suggests_more_bits():
    assert "--quantize 8 or --quantize none" in survival_warning(0.5, "4")
    assert "only 89%" in survival_warning(0.89, "8") and "--quantize none" in survival_warning(0.89, "8")
    assert survival_warning(0.9, "4") is None and survival_warning(None, "4") is None
    assert survival_warning(0.2, "none") is None  # an unquantized fuse is checked against its tolerance instead


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """A real QLoRA run: stories260K converted to 4-bit (group 32), then LoRA on top."""
    home = tmp_path_factory.mktemp("home")
    run_dir = tmp_path_factory.mktemp("qlora") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLXTUNE_HOME", str(home))
        base = pull(str(MODEL), quantize="4", group_size=32, console=make_console(quiet=True))
        finetune(LoraSettings(model=base.path, data=str(WIKISQL), out=str(run_dir), iters=10, learning_rate=3e-3,
                              max_seq_length=128, eval_every=10, val_batches=2, save_every=10),
                 console=make_console(quiet=True))
    return run_dir, Path(base.path)


def test_qlora_fuse_dequantizes_the_base_and_matches(qlora_run, tmp_path):
    run_dir, base = qlora_run
    result = fuse_run(run_dir, tmp_path / "fused")
    assert result.quantization is None and result.max_abs_diff <= result.tolerance == 1e-4
    assert result.survival == pytest.approx(1.0, abs=1e-3)
    fused, _, config = load_model(tmp_path / "fused")
    assert "quantization" not in config
    kinds = {type(m).__name__ for _, m in fused.named_modules()}
    assert "QuantizedLinear" not in kinds and "QuantizedEmbedding" not in kinds
    assert not any("lora" in name for name, _ in tree_flatten(fused.parameters()))


def test_fuse_into_an_existing_directory_needs_overwrite(qlora_run, tmp_path):
    run_dir, _ = qlora_run
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    again = run_cli("fuse", run_dir, "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert (out / "keep.txt").read_text() == "user file"

