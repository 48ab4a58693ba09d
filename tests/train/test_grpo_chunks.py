"""The GRPO update in pieces (objective.py's `update_chunks`: a prompt's rows a few at a time after one pass of the
shared prompt, train/grpo/update.py) gives the whole batch's loss, statistics and gradient — the same as every row run
in full (prompt + completion), one prompt's group at a time: per preset (sequence mean, DAPO's token level over the
whole batch's tokens, Dr. GRPO's constant), with the KL to the reference and a ratio off 1 (πold from before the
adapter moved), on the story model's real rollouts of uneven lengths; and the planner's estimate of the update is
one piece's."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import load

from conftest import MODEL
from mlxtune.settings import LoraSettings
from mlxtune.train.adapters import attach_adapters
from mlxtune.train.grpo.losses import preset
from mlxtune.train.grpo.objective import GrpoLoss, GrpoObjective, gradient_batches, update_chunks
from mlxtune.train.grpo.rollout import generate_group, sample_keys
from mlxtune.train.grpo.update import GrpoStep

ROWS = 12  # 3 prompts × G 4: the whole group at once, or pieces of 2 rows


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = load(str(MODEL))
    ids = [tokenizer.encode(text) for text in ("Once upon a time", "Tom saw a big", "The sun was shining and")]
    keys = sample_keys(mx.random.key(3), len(ids), ROWS // len(ids))
    first = generate_group(model, ids, keys, max_tokens=10, eos_token_ids={tokenizer.eos_token_id})
    stop = {first.completion(0)[3], first.completion(6)[1]}  # tokens the samples write: they stop unevenly
    rollout = generate_group(model, ids, keys, max_tokens=10, eos_token_ids=stop)
    assert len(set(rollout.lengths)) > 1
    attach_adapters(model, LoraSettings(rank=4, seed=0))
    advantages = np.random.default_rng(0).normal(size=ROWS).astype(np.float32)
    return model, ids, rollout, advantages


def _moved(model, scale: float):
    """The adapter's weights off zero (a deterministic direction): the policy differs from the reference."""
    rng = np.random.default_rng(1)
    model.update(tree_map(lambda w: mx.array(rng.normal(scale=scale, size=w.shape).astype(np.float32)),
                          model.trainable_parameters()))


def _loss_and_gradient(model, name: str, chunks, rows_per_chunk: int, shared: bool, rollout_passes: str = ""):
    """(loss, statistics, gradient) of one update, through the run's own passes: the frozen reference and πold
    (a prompt's group at a time) and the compiled accumulation over the pieces, from the same weights each time.
    `rollout_passes` "update"/"old": the groups carry their prompt's pass from a rollout's prefill at the update's
    weights (as a run's first update does) / at πold's (wrong: a test that they are used)."""
    _moved(model, 0.02)  # πold: the policy before the update
    loss = GrpoLoss(model, preset(name, beta=0.1, max_completion_tokens=10), old_policy=True)
    loss.shared_prompt = shared
    step = GrpoStep(model, optim.SGD(learning_rate=0.0), 0.0, loss)
    objective = GrpoObjective(model, None, step, loss, None, [], [], [], set())
    updates = update_chunks(*chunks, rows_per_chunk, shared=shared)
    objective.frozen(updates)
    passes = _prefill_passes(model, loss, chunks[0]) if rollout_passes == "old" else None
    _moved(model, 0.05)  # the update's weights: ratios off 1, some clipped
    if rollout_passes:
        passes = passes or _prefill_passes(model, loss, chunks[0])
        for group, prompt_pass in zip(updates, passes):
            group.prompt_pass = prompt_pass
    pieces = gradient_batches(updates)
    loss_sum, count, stats, grads = step.accumulate_groups(updates)
    assert all(group.prompt_pass is None for group in updates)  # used by the first update, then dropped
    assert len(updates) == 3 and len(pieces) == 3 * -(-ROWS // 3 // rows_per_chunk)
    return ((loss_sum / count).item(), np.array(stats),
            {k: np.array(v / count) for k, v in tree_flatten(grads)})


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo"])
def test_a_chunked_update_is_the_whole_batch(setup, name):
    model, ids, rollout, advantages = setup
    chunks = (ids, rollout, advantages)
    whole_loss, whole_stats, whole_grads = _loss_and_gradient(model, name, chunks, ROWS, shared=False)
    loss, stats, grads = _loss_and_gradient(model, name, chunks, 2, shared=True)
    assert whole_stats[0] > 0 and whole_stats[1] + whole_stats[2] > 0  # the KL and the clip both bite
    # float32 rounding, the same terms summed in another order (the loss and the KL sum are differences of sums of
    # thousands): measured 5.7e-6 relative with mlx-lm's SwiGLU, 1.9e-5 with the exp form every command computes on
    # the CPU (cpu_activations.py; 8e-7 between the whole batch with and without the shared prompt); a row dropped or
    # a piece normalised on its own is off by percents
    assert abs(loss - whole_loss) <= 5e-5 * max(1.0, abs(whole_loss)), (loss, whole_loss)
    np.testing.assert_allclose(stats, whole_stats, rtol=5e-5, atol=1e-5)  # the KL sum: the same rounding
    assert max(np.abs(g).max() for g in whole_grads.values()) > 1e-4
    for key, g in whole_grads.items():
        # float32 rounding at the gradient's scale (up to ~12 here): the shared prompt sums the same terms in
        # another order (measured: within 2.5e-6 of the largest entry with mlx-lm's SwiGLU, 1.2e-5 with the exp form)
        np.testing.assert_allclose(grads[key], g, atol=3e-5 * max(1.0, np.abs(g).max()), rtol=1e-4, err_msg=key)


def _prefill_passes(model, loss, ids):
    """Each prompt's pass as a rollout keeps it (`generate_group`'s `head`), at the model's current weights."""
    model.eval()
    try:
        return generate_group(model, ids, sample_keys(mx.random.key(0), len(ids), 1), max_tokens=1,
                              eos_token_ids={0}, head=loss.logps.head,
                              keep_prompt_passes=True).prompt_passes
    finally:
        model.train()


def test_the_rollouts_prompt_pass_stands_in_for_the_updates(setup):
    """A run's first update takes each prompt's pass from the rollout's prefill (GrpoObjective.keeps_prompt_passes)
    instead of running it again: the same loss and gradient as the whole batch's, at float32 rounding; passes from
    other weights (πold's) give another gradient."""
    model, ids, rollout, advantages = setup
    chunks = (ids, rollout, advantages)
    whole_loss, _, whole_grads = _loss_and_gradient(model, "grpo", chunks, ROWS, shared=False)
    loss, _, grads = _loss_and_gradient(model, "grpo", chunks, 2, shared=True, rollout_passes="update")
    assert abs(loss - whole_loss) <= 5e-5 * max(1.0, abs(whole_loss)), (loss, whole_loss)
    for key, g in whole_grads.items():
        np.testing.assert_allclose(grads[key], g, atol=3e-5 * max(1.0, np.abs(g).max()), rtol=1e-4, err_msg=key)
    _, _, stale = _loss_and_gradient(model, "grpo", chunks, 2, shared=True, rollout_passes="old")
    worst = max(np.abs(stale[k] - g).max() / max(1.0, np.abs(g).max()) for k, g in whole_grads.items())
    assert worst > 1e-3, worst


def test_the_planner_estimates_one_piece_of_the_update():
    """The update's estimate is one gradient piece's completions (split evenly: G 6 by 4 is 3 + 3) after one pass of
    their prompt, however many prompts × G the rollout decodes together; the prompt counts once per piece."""
    from mlxtune.memory.estimate import ModelFacts, RunShape
    from mlxtune.memory.grpo import UPDATE_ROWS, prompt_kv_bytes, update_passes, update_shape
    from mlxtune.settings import GrpoSettings

    assert update_shape(GrpoSettings(group_size=8, batch_size=4, max_completion_tokens=64)).rows == UPDATE_ROWS
    assert update_shape(GrpoSettings(group_size=6, batch_size=1, max_completion_tokens=64)).rows == 3
    assert update_shape(GrpoSettings(group_size=2, batch_size=1, max_completion_tokens=64)).rows == min(2, UPDATE_ROWS)
    facts, settings = ModelFacts.from_dir(MODEL), GrpoSettings(group_size=8, batch_size=2, max_completion_tokens=32)
    run = RunShape(on_cpu=True, fused_head=True, streams=2)
    short, long = (update_passes(facts, run, settings, prompt)["gradient"] for prompt in (16, 160))
    assert long.parts["shared prompt"] > short.parts["shared prompt"] > 0
    prompt_parts = ("shared prompt", "rollout's prompt passes")
    assert long.total - short.total == sum(long.parts[k] - short.parts[k] for k in prompt_parts)
    # G 8 is several pieces after one prompt pass of its own (train/grpo/update.py): the pieces keep its keys and
    # values, not the pass, which is planned apart; G 2 is one piece holding its prompt's pass
    split, whole = (update_passes(facts, run, GrpoSettings(group_size=g, batch_size=1, max_completion_tokens=32), 160)
                    for g in (8, 2))
    assert "prompt" in split and "prompt" not in whole
    # the rollout's prompt passes (one prompt here) are kept through the update when a group is several pieces
    assert split["gradient"].parts["rollout's prompt passes"] == prompt_kv_bytes(facts, run, 160)
    assert "rollout's prompt passes" not in whole["gradient"].parts
    assert split["gradient"].parts["shared prompt"] < split["prompt"].parts["activations"]


def test_the_planner_update_shape_is_the_runs_chunk(setup):
    """The planner's update piece has the completion rows, input length and head positions of the run's own pieces
    (update_chunks on a real rollout): `update_batch` pads the supervised positions to a multiple of
    POSITIONS_MULTIPLE with zero weights, never past the piece's cells, and the padding goes through the head too.
    Counting the unpadded positions left the bench's 2 rows × 16 tokens update 16.8% under its measured peak
    (docs/MEMORY.md, GRPO runs)."""
    from mlxtune.memory.grpo import update_shape
    from mlxtune.settings import GrpoSettings

    _, ids, rollout, advantages = setup
    settings = GrpoSettings(group_size=ROWS // len(ids), batch_size=len(ids),
                            max_completion_tokens=rollout.tokens.shape[1])
    shape = update_shape(settings)
    pieces = gradient_batches(update_chunks(ids, rollout, advantages))
    inputs, positions = zip(*((c.arrays[1], c.arrays[2]) for c in pieces))  # the completions' inputs, positions
    assert max(a.shape[0] for a in inputs) == shape.rows
    assert max(a.shape[1] for a in inputs) <= shape.length
    assert max(p.shape[0] for p in positions) == shape.supervised


def test_one_fused_loss_chunk_per_stream_counts_fewer_arrays():
    """An update chunk of 4 rows × 32 completion tokens is one fused-loss chunk per stream (2 streams): nothing of a
    next chunk overlaps, FUSED_ONE_CHUNK_ARRAYS per stream (the bench's case: 0.437 GB estimated with seven, 0.337
    measured; docs/MEMORY.md); longer updates keep FUSED_CHUNK_ARRAYS."""
    from mlxtune.memory.estimate import (FUSED_CHUNK_ARRAYS, FUSED_ONE_CHUNK_ARRAYS, FUSED_ROW_ARRAYS, BatchShape,
                                         ModelFacts, RunShape, fused_loss_phase_bytes)
    from mlxtune.memory.limits import FUSED_CHUNK_ROWS

    facts, run = ModelFacts.from_dir(MODEL), RunShape(fused_head=True, streams=2)
    chunk = FUSED_CHUNK_ROWS * facts.vocab * 4
    rows = FUSED_ROW_ARRAYS * facts.hidden * 4
    assert FUSED_ONE_CHUNK_ARRAYS < FUSED_CHUNK_ARRAYS
    assert fused_loss_phase_bytes(facts, run, BatchShape(4, 96, 128)) == 128 * rows + 2 * FUSED_ONE_CHUNK_ARRAYS * chunk
    assert fused_loss_phase_bytes(facts, run, BatchShape(4, 320, 256)) == 256 * rows + 2 * FUSED_CHUNK_ARRAYS * chunk


def test_the_planner_counts_full_rows_where_the_prompt_is_not_shared(setup, tmp_path):
    """A model whose caches are not all plain KVCaches (here: the story model with a sliding-window layer, mlx-lm's
    RotatingKVCache) runs the update as full prompt + completion rows; the planner, which reads only the folder,
    sees that and plans the run's full-row pieces (make_batch's padded rows), not the shared prompt's."""
    import json
    import shutil

    from mlxtune.memory.estimate import ModelFacts, RunShape
    from mlxtune.memory.grpo import full_rows_shape, plan_for_prompts, shares_prompt, update_passes
    from mlxtune.settings import GrpoSettings

    windowed = tmp_path / "windowed"
    shutil.copytree(MODEL, windowed)
    config = json.loads((windowed / "config.json").read_text())
    config.update(layer_types=["sliding_attention"] + ["full_attention"] * (config["num_hidden_layers"] - 1),
                  sliding_window=8)
    (windowed / "config.json").write_text(json.dumps(config))
    assert shares_prompt(MODEL) and not shares_prompt(windowed)

    _, ids, rollout, advantages = setup
    prompt = max(len(p) for p in ids)
    settings = GrpoSettings(group_size=ROWS // len(ids), batch_size=len(ids),
                            max_completion_tokens=rollout.tokens.shape[1])
    shape = full_rows_shape(settings, prompt)
    pieces = gradient_batches(update_chunks(ids, rollout, advantages, shared=False))
    inputs, positions = zip(*((c.arrays[0], c.arrays[1]) for c in pieces))  # full rows: inputs, positions, …
    assert max(a.shape[0] for a in inputs) == shape.rows
    assert max(a.shape[1] for a in inputs) <= shape.length
    assert max(p.shape[0] for p in positions) == shape.supervised

    facts, run = ModelFacts.from_dir(MODEL), RunShape(on_cpu=True, fused_head=True, streams=2)
    full, shared = (update_passes(facts, run, settings, prompt, flag)["gradient"] for flag in (False, True))
    assert full.worst_batch == shape and full.total > shared.total
    long = GrpoSettings(group_size=8, batch_size=1, max_completion_tokens=256, memory="64GB")
    assert plan_for_prompts(long, windowed, 200).estimate.total > plan_for_prompts(long, MODEL, 200).estimate.total


def test_the_prompt_backward_sees_the_dropout_masks_of_its_forward(setup):
    """With LoRA dropout, the prompt's pass runs twice (outputs for the pieces, then recomputed under the gradient:
    train/grpo/update.py): both must draw the same masks, or the prompt's share of the gradient is another function's.
    The gradient along a direction equals the loss's central difference, every evaluation from the same seed (the
    same masks throughout)."""
    import mlx.nn as nn
    from mlx_lm.tuner.lora import LoRALinear

    model, ids, rollout, advantages = setup
    layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    _moved(model, 0.05)
    loss = GrpoLoss(model, preset("grpo", beta=0.1), old_policy=True)
    step = GrpoStep(model, optim.SGD(learning_rate=0.0), 0.0, loss)
    objective = GrpoObjective(model, None, step, loss, None, [], [], [], set())
    updates = update_chunks(ids, rollout, advantages, 2)
    objective.frozen(updates)  # πold and the reference without dropout; the gradient's passes with it
    base = dict(tree_flatten(model.trainable_parameters()))
    direction = {k: mx.array(np.random.default_rng(2).normal(size=v.shape).astype(np.float32)) for k, v in base.items()}

    def at(scale: float):
        model.load_weights([(k, v + scale * direction[k]) for k, v in base.items()], strict=False)
        mx.random.seed(7)
        loss_sum, count, _, grads = step.accumulate_groups(updates)
        return (loss_sum / count).item(), {k: v / count for k, v in tree_flatten(grads)}

    try:
        for layer in layers:
            layer.dropout = nn.Dropout(0.5)
        model.train()
        _, grads = at(0.0)
        eps = 1e-3
        difference = (at(eps)[0] - at(-eps)[0]) / (2 * eps)
        along = sum((grads[k] * direction[k]).sum().item() for k in base)
    finally:
        for layer in layers:
            layer.dropout = nn.Dropout(0.0)
        model.load_weights(list(base.items()), strict=False)
    assert abs(along) > 1e-2
    assert abs(difference - along) <= 5e-2 * abs(along), (difference, along)  # measured 0.5%; masks apart: 24%


def test_the_rollout_keeps_prompt_passes_only_where_they_are_the_updates(setup):
    """The prefill stands in for the update's prompt pass only where it is the same function: no LoRA dropout (the
    rollout runs in eval mode), the prompt shared, the selective head, and groups of several pieces (G > UPDATE_ROWS;
    one piece runs its prompt inside its gradient)."""
    from mlxtune.memory.grpo import UPDATE_ROWS
    from mlxtune.settings import GrpoSettings

    model = setup[0]

    def keeps(shared=True, **settings):
        loss = GrpoLoss(model, preset("grpo", beta=0.1))
        loss.shared_prompt = shared
        objective = GrpoObjective(model, None, None, loss, GrpoSettings(**settings), [], [], [], set())
        return objective.keeps_prompt_passes()

    assert keeps(group_size=UPDATE_ROWS + 1)
    assert not keeps(group_size=UPDATE_ROWS + 1, dropout=0.1)
    assert not keeps(group_size=UPDATE_ROWS)
    assert not keeps(shared=False, group_size=UPDATE_ROWS + 1)
