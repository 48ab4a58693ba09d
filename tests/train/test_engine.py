"""The training engine's behaviours, tested once for every objective (SFT, DPO, ORPO) on the bundled story model:
best/ and patience, exact resume after Ctrl-C, the NaN guard, the memory guard. Each run is a few steps (~2 s)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest

from conftest import MODEL, WIKISQL, make_pairs

from mlxtune import faults
from mlxtune.errors import RunFailed
from mlxtune.settings import LoraSettings
from mlxtune.ui import make_console

OBJECTIVES = ["sft", "dpo", "orpo"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs"), train=32, valid=8)


def _settings(objective: str, out, pairs, **overrides):
    common = dict(out=str(out), seed=0, learning_rate=3e-3, report_every=1, eval_every=1, save_every=10**6,
                  val_batches=1, memory="64GB", iters=4, max_seq_length=128)
    common.update(overrides)
    model = common.pop("model", str(MODEL))
    if objective == "sft":
        return LoraSettings(model=model, data=str(WIKISQL), **{"batch_size": 4, **common})
    from mlxtune.train.preference.run import PreferenceSettings

    return PreferenceSettings(model=model, data=str(pairs), objective=objective, **{"batch_size": 4, **common})


def _train(objective: str, settings, resume: bool = False) -> dict:
    console = make_console(quiet=True)
    if objective == "sft":
        from mlxtune.train.loop import finetune

        return finetune(settings, resume=resume, console=console, force=True).to_dict()
    from mlxtune.train.preference.run import train_preference

    return train_preference(settings, resume=resume, console=console, force=True).to_dict()


def _resume(objective: str, run_dir, pairs) -> dict:
    if objective == "sft":
        from mlxtune.train.loop import resume_settings

        return _train(objective, resume_settings(run_dir, {}), resume=True)
    from mlxtune.train.preference.run import resume_preference_settings

    return _train(objective, resume_preference_settings(run_dir, {}), resume=True)


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(path) -> dict:
    return mx.load(str(path))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_best_keeps_the_best_adapter_and_patience_stops(objective, pairs, tmp_path):
    """A min_delta no evaluation can beat: best/ stays the step-0 adapter (LoRA's B is zero there), and patience 2
    stops the run after two evaluations without gain. A loop writing each new adapter to best/ fails here."""
    out = tmp_path / objective
    result = _train(objective, _settings(objective, out, pairs, min_delta=1e6, patience=2))
    assert result["stopped"] == "early-stopped" and result["steps"] == 2 and result["best_step"] == 0
    best, last = _weights(out / "best" / "adapters.safetensors"), _weights(out / "adapters.safetensors")
    lora_b = [name for name in best if name.endswith("lora_b")]
    assert lora_b and all(mx.all(best[name] == 0).item() for name in lora_b)
    assert any(mx.any(last[name] != 0).item() for name in lora_b)  # the run did train


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_best_is_the_adapter_of_the_best_validation(objective, pairs, tmp_path):
    out = tmp_path / objective
    settings = _settings(objective, out, pairs, iters=3, save_every=1, learning_rate=1e-2)
    result = _train(objective, settings)
    watch = getattr(settings, "stop_on", "loss")
    vals = [(r["step"], r[f"val_{watch}"]) for r in _records(out) if f"val_{watch}" in r]
    best_step = min(vals, key=lambda v: v[1])[0]
    assert result["best_step"] == best_step, vals
    expected = out / "checkpoints" / f"step-{best_step:07d}" / "adapters.safetensors"
    if best_step == 0:
        return  # no step-0 checkpoint: the first test covers it
    best = _weights(out / "best" / "adapters.safetensors")
    saved = _weights(expected)
    assert all(mx.array_equal(best[k], saved[k]).item() for k in best)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ctrl_c_then_resume_ends_with_the_uninterrupted_weights(objective, pairs, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    _train(objective, _settings(objective, whole, pairs, eval_every=2))
    cut = tmp_path / "cut"
    monkeypatch.setenv(faults.ENV, "train.step:2:INT")  # SIGINT to this process after the second step
    monkeypatch.setattr(faults, "_reached", {})
    result = _train(objective, _settings(objective, cut, pairs, eval_every=2))
    assert result["stopped"] == "interrupted" and result["steps"] == 2
    monkeypatch.delenv(faults.ENV)
    result = _resume(objective, cut, pairs)
    assert result["stopped"] == "completed" and result["steps"] == 4
    a, b = _weights(whole / "adapters.safetensors"), _weights(cut / "adapters.safetensors")
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    losses = lambda run: [r["train_loss"] for r in _records(run) if "train_loss" in r]  # noqa: E731
    assert losses(cut) == losses(whole)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_resume_refuses_changed_data(objective, pairs, tmp_path):
    out = tmp_path / objective
    data = tmp_path / "data"
    shutil.copytree(WIKISQL if objective == "sft" else pairs, data)
    first = _settings(objective, out, pairs, iters=2, save_every=1)
    first.data = str(data)
    _train(objective, first)
    with (data / "train.jsonl").open("a", encoding="utf-8") as f:
        f.write((data / "train.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n")
    from mlxtune.errors import UsageError

    settings = _settings(objective, out, pairs, iters=4, save_every=1)
    settings.data = str(data)
    with pytest.raises(UsageError, match="the data changed"):
        _train(objective, settings, resume=True)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_nan_loss_stops_with_the_last_good_weights(objective, pairs, tmp_path):
    """A model whose final norm is NaN: the loss is NaN at step 1, the run fails with a hint, and what it saved is
    finite (the step-0 adapter)."""
    model = tmp_path / "nan-model"
    shutil.copytree(MODEL, model)
    weights = mx.load(str(model / "model.safetensors"))
    norm = next(k for k in weights if k.endswith("norm.weight") and "layers" not in k)
    weights[norm] = mx.full(weights[norm].shape, float("nan"), weights[norm].dtype)
    (model / "model.safetensors").chmod(0o644)
    mx.save_safetensors(str(model / "model.safetensors"), weights, metadata={"format": "mlx"})
    out = tmp_path / objective
    with pytest.raises(RunFailed, match=r"the loss became nan at step 1; the last good weights \(step 0\) are saved"):
        _train(objective, _settings(objective, out, pairs, model=str(model), eval_every=10**6))
    saved = _weights(out / "adapters.safetensors")
    assert all(mx.all(mx.isfinite(v)).item() for v in saved.values())


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_memory_guard_keeps_the_examples_per_step_when_it_shrinks(objective, pairs, tmp_path):
    """A budget the first step exceeds: half the micro-batch, twice the accumulation — the same examples (pairs) per
    optimizer step, as config.yaml and metrics.jsonl say; MLX's memory limit is restored after the run."""
    limit = mx.set_memory_limit(2**40)
    mx.set_memory_limit(limit)
    out = tmp_path / objective
    fixed = {"pack": False} if objective == "sft" else {}  # pairs always come in fixed batches
    result = _train(objective, _settings(objective, out, pairs, memory="0.001GB", iters=2, eval_every=10**6,
                                         **fixed))
    assert result["steps"] == 2 and result["stopped"] == "completed"
    (change,) = result["memory_changes"]
    before, after = change["before"], change["after"]
    assert after["batch_size"] == before["batch_size"] // 2
    assert after["batch_size"] * after["grad_accumulation"] == before["batch_size"] * before["grad_accumulation"]
    assert "batch_size: 2" in (out / "config.yaml").read_text() and "grad_accumulation: 2" in (
        out / "config.yaml").read_text()
    if objective != "sft":
        assert [r["pairs"] for r in _records(out) if "pairs" in r] == [4, 4]
    assert mx.set_memory_limit(limit) == limit  # the guard put the limit back


def _answer_logps(model, tokenizer, prompt: str, answer: str) -> float:
    """log p(answer | prompt) by a plain forward pass over "prompt\\nanswer": computed here, apart from mlxtune."""
    context = tokenizer.encode(prompt + "\n")
    tokens = tokenizer.encode(prompt + "\n" + answer)
    logits = model(mx.array(tokens)[None, :-1])[0].astype(mx.float32)
    logps = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    targets = mx.array(tokens[1:])
    picked = mx.take_along_axis(logps, targets[:, None], axis=-1)[:, 0]
    return picked[len(context) - 1:].sum().item()


def test_dpo_moves_the_chosen_answers_up_against_the_rejected(pairs, tmp_path):
    """End to end, judged outside mlxtune's data and loss code: after DPO, the tuned model's log-probability gain over
    the base (the implicit reward) is larger for the chosen answers than for the rejected ones, read from the raw
    pairs file. Chosen and rejected swapped anywhere in the pipeline turns the sign."""
    from mlx_lm import load

    out = tmp_path / "dpo"
    _train("dpo", _settings("dpo", out, pairs, iters=6, learning_rate=1e-2, eval_every=10**6, batch_size=8))
    base, tokenizer = load(str(MODEL))
    tuned, _ = load(str(MODEL), adapter_path=str(out))
    records = [json.loads(line) for line in (pairs / "train.jsonl").read_text().splitlines()][:16]
    margins = []
    for r in records:
        gain = {k: _answer_logps(tuned, tokenizer, r["prompt"], r[k])
                - _answer_logps(base, tokenizer, r["prompt"], r[k]) for k in ("chosen", "rejected")}
        margins.append(gain["chosen"] - gain["rejected"])
    assert sum(m > 0 for m in margins) >= 12, margins
