"""`mlxtune grpo` end to end on the bundled story model, through the CLI: a reward that bites (the word "she" in
the completion: about 1 sampled completion in 10 of the base model and none of its greedy ones has it; after 8
steps nearly all do), its metrics, samples and chart, `mlxtune eval` of base vs tuned, a failing user reward (one line, the
checkpoint kept, --resume continues), and the memory planner's refusal. The engine's own behaviours (exact resume,
best/, the NaN and memory guards) are tested for GRPO with the other objectives in test_engine.py."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from conftest import MODEL, run_cli

NAMES = ["Lily", "Tom", "Sue", "Ben", "Max", "Anna", "Sam", "Mia"]
STARTS = ["Once upon a time, there was a little", "One day, {n} went to the", "{n} saw a big",
          "{n} liked to play with", "The sun was shining and {n}", "{n} had a toy"]
# The learning run: 4 prompts × G 8 per step, up to 16 tokens, lr 1e-2 (measured: the train reward 0.2 → 0.9 by
# step 4 and 1.0 from step 6; the greedy validation reward 0 → 1 at step 6).
STEPS = 8
LEARN = ["--reward", "contains", "--group-size", 8, "--batch-size", 4, "--max-completion-tokens", 16,
         "--temperature", 1.0, "--iters", STEPS, "--rank", 8, "--learning-rate", 1e-2, "--eval-every", STEPS,
         "--val-batches", 2, "--report-every", 1, "--sample-every", 4, "--save-every", 4, "--memory", "64GB"]


def make_prompts(out: Path, train: int = 48, valid: int = 8) -> Path:
    """Story openings; every record's `answer` is "she" (what the `contains` reward looks for)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, count in (("train", train), ("valid", valid)):
        lines = [json.dumps({"prompt": rng.choice(STARTS).format(n=rng.choice(NAMES)), "answer": "she"})
                 for _ in range(count)]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return make_prompts(tmp_path_factory.mktemp("prompts"))


@pytest.fixture(scope="module")
def learned(prompts, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    result = run_cli("grpo", "--model", MODEL, "--data", prompts, "--out", run_dir, *LEARN, "--json")
    assert result.returncode == 0, result.stderr
    return run_dir, json.loads(result.stdout)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_reward_rises_from_its_base_level(learned):
    run_dir, result = learned
    assert result["initial_val"]["reward"] <= 0.25, result["initial_val"]
    assert result["final_val"]["reward"] > 0.8, result["final_val"]
    assert result["final_train"]["reward"] > 0.8, result["final_train"]
    assert result["best_step"] == STEPS and result["stopped"] == "completed"
    train = [r for r in _records(run_dir) if "train_reward" in r]
    assert train[0]["train_reward"] < 0.3 < 0.8 < train[-1]["train_reward"]
    for key in ("train_reward_std", "train_reward_contains", "train_reward_contains_std", "train_zero_std_groups",
                "train_completion_length", "train_kl", "train_clip_fraction", "train_rollout_tokens_per_second",
                "train_update_tokens_per_second"):
        assert key in train[-1], key
    assert 1 <= train[-1]["train_completion_length"] <= 16
    # every record says when it was written (scripts/bench_grpo.py times the steps by it): one after the other,
    # the last one when the log was last written
    times = [r["time"] for r in _records(run_dir)]
    steps = [r["time"] for r in train]
    assert times == sorted(times) and all(a < b for a, b in zip(steps, steps[1:])), times
    assert abs(times[-1] - (run_dir / "metrics.jsonl").stat().st_mtime) < 2


def test_samples_and_settings_are_in_the_run_directory(learned):
    run_dir, _ = learned
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [4, 8] and len(samples) == 2 * 4 * 8
    last = [s for s in samples if s["step"] == 8]
    assert all(s["rewards"]["contains"] == float("she" in s["completion"]) for s in last)
    assert all(set(s) >= {"prompt", "completion", "source", "total", "advantage"} for s in samples)
    grpo = (run_dir / "grpo.yaml").read_text()
    assert "reward:\n- contains" in grpo and "group_size: 8" in grpo and "loss_type: grpo" in grpo
    assert (run_dir / "loss.png").is_file() and (run_dir / "best" / "adapters.safetensors").is_file()


def test_eval_reports_the_mean_reward_of_base_and_tuned(learned, tmp_path):
    """`mlxtune eval`'s library call (the CLI only prints it): base vs tuned on the held-out prompts."""
    from mlxtune.eval import evaluate_run

    run_dir, _ = learned
    report = evaluate_run(run_dir, out=tmp_path).to_dict()
    assert "mean reward" in (tmp_path / "report.html").read_text()
    assert report["metric"] == "mean reward"
    base, tuned = report["task"]["base"], report["task"]["tuned"]
    assert base["value"] < 0.3 < 0.8 < tuned["value"]
    low, high = report["task"]["difference"]["low"], report["task"]["difference"]["high"]
    assert 0 < low <= high
    contains = report["task"]["rewards"]["contains"]  # each reward alone, with its own paired interval
    assert contains["examples"] == 8 and 0 < contains["difference"]["low"] <= contains["difference"]["high"]
    # samples: each prompt's first completion from both models, with its reward (the report shows them)
    samples = report["samples"]
    assert len(samples) == 5 and all(s["reference"] == "she" for s in samples)
    for sample in samples:
        for model in ("base", "tuned"):
            assert sample[f"{model}_reward"] == float("she" in sample[model]), (model, sample)
    assert sum(s["tuned_reward"] for s in samples) > sum(s["base_reward"] for s in samples)
    html = (tmp_path / "report.html").read_text()
    assert "first completion" in html and html.count("reward ") >= 10


def test_eval_with_several_generations_per_prompt_averages_them(learned, tmp_path):
    """--generations 4: each prompt's reward is the mean of 4 distinct samples (a fraction where they disagree), the
    interval still over the 8 prompts."""
    from mlxtune.eval import evaluate_run

    run_dir, _ = learned
    task = evaluate_run(run_dir, out=tmp_path, generations=4).to_dict()["task"]
    assert task["generations"] == 4 and task["examples"] == 8
    base, tuned = task["base"]["value"], task["tuned"]["value"]
    assert base < 0.3 < 0.8 < tuned and 0 < task["difference"]["low"]
    # 32 samples per model; four copies of one sample per prompt would make every prompt's mean 0 or 1 (× 8 whole)
    assert abs(base * 32 - round(base * 32)) < 1e-9, base  # 32 samples
    per_prompt = task["per_prompt"]
    assert len(per_prompt["base"]) == len(per_prompt["tuned"]) == 8 and abs(sum(per_prompt["base"]) / 8 - base) < 1e-9
    # four copies of one sample per prompt would make every prompt's mean 0 or 1
    assert any(0 < value < 1 for value in per_prompt["base"] + per_prompt["tuned"]), per_prompt


def test_the_run_fuses_like_any_other(learned, tmp_path):
    """fuse checks the fused model on the run's held-out prompts' text (a GRPO run has no answers to score)."""
    from mlxtune.fuse import fuse_run

    run_dir, _ = learned
    result = fuse_run(run_dir, tmp_path / "fused")
    assert result.loss_split == "prompts" and result.loss_examples == 8 and result.checked_tokens > 0
    assert result.max_abs_diff <= result.tolerance
    assert (tmp_path / "fused" / "model.safetensors").is_file()


REWARD_FILE = '''
import os

calls = 0


def flaky(prompts, completions, answer, **kwargs):
    """Like `contains`, until the third call (with GRPO_TEST_FAIL set): then it raises, returns NaN or too few."""
    global calls
    calls += 1
    fail = os.environ.get("GRPO_TEST_FAIL")
    if fail and calls >= 3:
        if fail == "raise":
            raise ZeroDivisionError("division by zero")
        if fail == "nan":
            return [float("nan")] * len(completions)
        return [0.0] * (len(completions) - 1)
    return [float(a in c) for c, a in zip(completions, answer)]
'''


def _flaky_args(prompts, tmp_path) -> list:
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    return ["--model", MODEL, "--data", prompts, "--out", tmp_path / "run", "--reward",
            f"{tmp_path / 'rewards.py'}:flaky", "--group-size", 4, "--batch-size", 2, "--max-completion-tokens", 6,
            "--iters", 3, "--save-every", 1, "--eval-every", 100, "--val-batches", 1, "--memory", "64GB"]


def test_a_raising_reward_stops_with_one_line_and_resume_continues(prompts, tmp_path, monkeypatch):
    """Calls: 1 = the validation before training, 2 = step 1, 3 = step 2 raises. The step-1 checkpoint is kept and
    `--resume` (the reward fixed: the variable unset) finishes the run, taking a flag the engine's resume rule lets
    change (--sample-every) and refusing one that would sample differently (--group-size), as `lora --resume`."""
    monkeypatch.setenv("GRPO_TEST_FAIL", "raise")
    failed = run_cli("grpo", *_flaky_args(prompts, tmp_path))
    monkeypatch.delenv("GRPO_TEST_FAIL")
    assert failed.returncode == 1, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert re.search(r"reward .*rewards\.py:flaky failed on .*train\.jsonl:\d+: ZeroDivisionError: division by zero "
                     r"\(at rewards\.py:\d+\)$", errors[0]), errors[0]
    assert (tmp_path / "run" / "checkpoints" / "step-0000001").is_dir()
    from mlxtune.train.grpo.run import resume_grpo_settings, train_grpo  # in-process: one CLI start is enough
    from mlxtune.ui import make_console

    from mlxtune.errors import UsageError

    with pytest.raises(UsageError, match=r"can't change --group-size \(the run has 4\) when resuming") as refused:
        resume_grpo_settings(tmp_path / "run", {"group_size": 8, "sample_every": 1})
    assert "--sample-every" in refused.value.hint
    settings = resume_grpo_settings(tmp_path / "run", {"group_size": 4, "sample_every": 1, "reward": None})
    resumed = train_grpo(settings, resume=True, console=make_console(quiet=True))
    assert resumed.steps == 3 and resumed.stopped == "completed"
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [2, 3]  # --sample-every 1 taken (the run's was 10)


@pytest.mark.parametrize("kind,message", [
    ("nan", r"reward .*rewards\.py:flaky returned nan on .*train\.jsonl:\d+"),
    ("length", r"reward .*rewards\.py:flaky returned 7 values for 8 completions"),
])
def test_a_reward_returning_nan_or_too_few_stops_the_run(kind, message, prompts, tmp_path, monkeypatch):
    """The same stop in-process (the CLI's one line is the test above): the error names the function and the
    record, and the step-1 checkpoint is kept."""
    from mlxtune.settings import GrpoSettings, resolve_settings
    from mlxtune.train.grpo.rewards import RewardError
    from mlxtune.train.grpo.run import train_grpo
    from mlxtune.ui import make_console

    args = _flaky_args(prompts, tmp_path)
    flags = {str(k).lstrip("-").replace("-", "_"): v for k, v in zip(args[::2], args[1::2])}
    flags["reward"] = [flags["reward"]]
    settings = resolve_settings(None, {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()},
                                cls=GrpoSettings)
    monkeypatch.setenv("GRPO_TEST_FAIL", kind)
    with pytest.raises(RewardError, match=message):
        train_grpo(settings, console=make_console(quiet=True))
    assert (tmp_path / "run" / "checkpoints" / "step-0000001").is_dir()


def test_the_planner_refuses_settings_that_do_not_fit(prompts, tmp_path):
    from mlxtune.errors import UsageError
    from mlxtune.settings import GrpoSettings
    from mlxtune.train.grpo.run import train_grpo
    from mlxtune.ui import make_console

    settings = GrpoSettings(model=str(MODEL), data=str(prompts), out=str(tmp_path / "run"), reward=["contains"],
                            group_size=64, batch_size=8, max_completion_tokens=256, memory="0.01GB")
    with pytest.raises(UsageError, match="more than the .* memory budget") as refused:
        train_grpo(settings, console=make_console(quiet=True))
    assert "--group-size" in refused.value.hint
    assert not (tmp_path / "run").exists()


def test_plan_shows_the_rollout_and_the_update_and_suggests_settings_that_fit(prompts):
    """`mlxtune plan --objective grpo`: both phases (the rollout decoding 8 prompts × G 64 as one batch, the update
    in pieces of UPDATE_ROWS completions after their prompt, or its frozen passes over FROZEN_ROWS of a prompt's
    completions, whichever is larger), the larger of them against the budget, and a refusal (exit 3) with settings
    that fit — the run's own planner's."""
    from mlxtune.memory.grpo import UPDATE_ROWS

    result = run_cli("plan", "--objective", "grpo", "--model", MODEL, "--data", prompts, "--group-size", 64,
                     "--batch-size", 8, "--max-completion-tokens", 256, "--memory", "0.1GB", "--json")
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    rollout, update = report["phases"]["rollout"], report["phases"]["update"]
    assert rollout["worst_batch"]["rows"] == 8 * 64
    assert report["update_rows"] == UPDATE_ROWS and report["frozen_rows"] == 8
    assert update["worst_batch"]["rows"] in (report["update_rows"], report["frozen_rows"])
    assert report["estimate_gb"] == max(rollout["estimate_gb"], update["estimate_gb"]) > report["budget_gb"] == 0.1
    assert report["settings"]["group_size"] == 64 and report["parts_gb"]["kv cache"] > 0
    suggested = report["suggested"]
    assert report["suggested_fits"] and suggested["batch_size"] * suggested["grad_accumulation"] == 8, report


def test_plan_takes_grpo_flags_for_a_grpo_run_only():
    from mlxtune.errors import UsageError
    from mlxtune.memory.report import plan_settings
    from mlxtune.settings import GrpoSettings

    assert isinstance(plan_settings("grpo", None, {"group_size": 4, "pack": None}), GrpoSettings)
    with pytest.raises(UsageError, match="--pack is a lora batching setting"):
        plan_settings("grpo", None, {"pack": True})
    with pytest.raises(UsageError, match="--group-size sizes a GRPO run") as refused:
        plan_settings("lora", None, {"group_size": 4})
    assert "--objective grpo" in refused.value.hint


def test_rollout_memory_grows_with_the_group_and_the_completion():
    from mlxtune.memory.estimate import ModelFacts
    from mlxtune.memory.grpo import estimate_grpo, rollout_bytes
    from mlxtune.settings import GrpoSettings

    from mlx_lm.models.cache import KVCache

    from mlxtune.memory.grpo import KV_CACHE_STEP

    assert KV_CACHE_STEP == KVCache.step  # how the prefill caches grow (the batch cache: its own step, rollout.py)
    facts = ModelFacts.from_dir(MODEL)
    small = rollout_bytes(facts, 2, 4, prompt=16, completion=64, on_cpu=True)
    assert rollout_bytes(facts, 2, 8, prompt=16, completion=64, on_cpu=True)["kv cache"] > small["kv cache"]
    assert rollout_bytes(facts, 2, 4, prompt=16, completion=300, on_cpu=True)["kv cache"] > small["kv cache"]
    one = estimate_grpo(facts, GrpoSettings(group_size=8, max_completion_tokens=64), 32, cpu=True).total
    more = estimate_grpo(facts, GrpoSettings(group_size=32, max_completion_tokens=256), 32, cpu=True).total
    assert more > one


def test_update_log_probs_line_up_with_the_rollout(prompts):
    """The update's per-token log-probs, recomputed through the selective head and laid out as [rows, T], equal the
    rollout's own at the same weights (so the ratio starts at 1), and are 0 past each completion's end; the compiled
    reference and πold passes give the uncompiled ones'. Each prompt's group is one batch, its prompt's pass shared
    (train/grpo/prefix.py: a wrong rope offset or mask there moves these log-probs off the rollout's)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load

    from mlxtune.data.prompts import prompt_ids, read_prompt_records
    from mlxtune.data.template import choose_template
    from mlxtune.train.grpo.losses import preset
    from mlxtune.train.grpo.objective import GrpoLoss, update_chunks
    from mlxtune.train.grpo.rollout import generate_group, sample_keys

    model, tokenizer = load(str(MODEL))
    template = choose_template(tokenizer, "chat").template
    ids = [prompt_ids(r, tokenizer, template) for r in read_prompt_records(prompts / "train.jsonl")[:3]]
    keys = sample_keys(mx.random.key(5), 3, 4)
    first = generate_group(model, ids, keys, max_tokens=12, eos_token_ids={tokenizer.eos_token_id})
    stop = {first.completion(0)[4], first.completion(5)[2]}  # tokens the samples write: they stop unevenly
    rollout = generate_group(model, ids, keys, max_tokens=12, eos_token_ids=stop)
    assert len(set(rollout.lengths)) > 1
    groups = update_chunks(ids, rollout, np.zeros(12, np.float32))
    loss = GrpoLoss(model, preset("grpo"))
    assert loss.shared_prompt and len(groups) == 3 and groups[0].arrays[0].shape == (1, len(ids[0]))

    def each_group(log_probs):
        return np.concatenate([np.array(log_probs(group)) for group in groups])

    recomputed = each_group(lambda g: loss.token_log_probs(model, g.arrays, g.gather, differentiable=False))
    mask = np.array(rollout.mask)
    # float32 rounding: the rollout decodes one position at a time in a left-padded batch cache (measured ≤1.2e-5)
    np.testing.assert_allclose(np.array(recomputed)[mask], np.array(rollout.log_probs)[mask], atol=1e-5, rtol=1e-5)
    assert np.all(np.array(recomputed)[~mask] == 0)

    # The compiled frozen passes (`frozen_log_probs`): the reference stays the base model after the adapter moved,
    # whichever was traced first; πold follows the weights at each call (no stale adapter switch or weights).
    from mlx.utils import tree_map

    from mlxtune.settings import LoraSettings
    from mlxtune.train.adapters import attach_adapters

    attach_adapters(model, LoraSettings(rank=4, seed=0))
    model.train()
    loss = GrpoLoss(model, preset("grpo"))
    for scale in (0.05, 0.1):
        model.update(tree_map(lambda w: mx.full(w.shape, scale), model.trainable_parameters()))
        old = each_group(lambda g: loss.frozen_log_probs(model, g, reference=False))
        reference = each_group(lambda g: loss.frozen_log_probs(model, g, reference=True))
        assert model.training
        np.testing.assert_allclose(reference, np.array(recomputed), atol=1e-5)
        expected = each_group(lambda g: loss.token_log_probs(model, g.arrays, g.gather, differentiable=False))
        np.testing.assert_allclose(old, expected, atol=1e-5)
        assert np.abs(old - reference)[mask].max() > 1e-3


def test_kl_clipping_and_several_updates_per_rollout(prompts, tmp_path):
    """β > 0 (the reference: the adapter switched off), μ = 2 updates per rollout batch and DAPO's token-level loss:
    the KL to the reference is 0 before the adapter moves and positive after; the second update of a batch sees a
    ratio off 1, and with a large learning rate some tokens are clipped."""
    from mlxtune.settings import GrpoSettings
    from mlxtune.train.grpo.run import train_grpo
    from mlxtune.ui import make_console

    out = tmp_path / "run"
    settings = GrpoSettings(model=str(MODEL), data=str(prompts), out=str(out), reward=["contains"], group_size=4,
                            batch_size=2, max_completion_tokens=8, iters=2, beta=0.1, updates_per_batch=2,
                            loss_type="dapo", learning_rate=5e-2, report_every=1, eval_every=100, val_batches=1,
                            memory="64GB", warmup_steps=0)
    result = train_grpo(settings, console=make_console(quiet=True))
    assert result.stopped == "completed"
    train = [r for r in _records(out) if "train_kl" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert train[-1]["train_kl"] > 0 and all(r["train_clip_fraction"] >= 0 for r in train)
    assert max(r["train_clip_fraction"] for r in train) > 0
    assert "beta: 0.1" in (out / "grpo.yaml").read_text() and "updates_per_batch: 2" in (out / "grpo.yaml").read_text()
