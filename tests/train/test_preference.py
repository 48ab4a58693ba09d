"""DPO and ORPO: losses and gradients against the published formulas in plain numpy, the selective per-answer
log-probs against full logits, and the reference from the same weights with the adapters switched off."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm import load

from conftest import MODEL
from mlxtune import LoraSettings
from mlxtune.data.preference import PreferenceRecord, tokenize_pair
from mlxtune.data.template import FALLBACK_CHAT_TEMPLATE
from mlxtune.train.adapters import attach_adapters
from mlxtune.train.preference.objective import (
    PreferenceObjective,
    SequenceLogProbs,
    adapters_off,
    dpo_loss,
    make_pair_batch,
    orpo_loss,
    preference_accuracy,
)

# Summed answer log-probs of 6 pairs (policy and reference), spread like real ones, and their answer lengths.
RNG = np.random.default_rng(7)
POLICY_CHOSEN, POLICY_REJECTED = RNG.uniform(-60, -5, 6), RNG.uniform(-60, -5, 6)
REFERENCE_CHOSEN, REFERENCE_REJECTED = POLICY_CHOSEN + RNG.normal(0, 4, 6), POLICY_REJECTED + RNG.normal(0, 4, 6)
LENGTHS_CHOSEN, LENGTHS_REJECTED = RNG.integers(3, 40, 6).astype(float), RNG.integers(3, 40, 6).astype(float)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_dpo(pc, pr, rc, rr, beta, eps):
    """Rafailov et al. (2023), eq. 7, with conservative label smoothing ε; d loss / d (πc, πr) by hand."""
    z = beta * ((pc - pr) - (rc - rr))
    loss = -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
    dz = -(1 - eps) * (1 - _sigmoid(z)) + eps * _sigmoid(z)
    return loss, beta * dz, -beta * dz


def numpy_orpo(lc, lr, beta):
    """Hong et al. (2024), eq. 6-8 on mean token log-probs; d loss / d (ℓc, ℓr) by hand."""
    log_odds = lambda l: l - np.log1p(-np.exp(l))  # noqa: E731
    d_log_odds = lambda l: 1 + np.exp(l) / (1 - np.exp(l))  # noqa: E731
    x = log_odds(lc) - log_odds(lr)
    loss = -lc - beta * _log_sigmoid(x)
    dx = -beta * (1 - _sigmoid(x))
    return loss, -1 + dx * d_log_odds(lc), -dx * d_log_odds(lr)


def _mlx_value_and_grads(function, *inputs):
    arrays = [mx.array(x, dtype=mx.float32) for x in inputs]
    value = function(*arrays)
    grads = mx.grad(lambda a, b: function(a, b, *arrays[2:]).sum(), argnums=(0, 1))(*arrays[:2])
    return np.array(value), np.array(grads[0]), np.array(grads[1])


@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_loss_and_gradients_match_the_paper(beta, label_smoothing):
    loss, d_chosen, d_rejected = _mlx_value_and_grads(
        lambda a, b, c, d: dpo_loss(a, b, c, d, beta, label_smoothing)[0],
        POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED)
    expected = numpy_dpo(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta, label_smoothing)
    for actual, wanted in zip((loss, d_chosen, d_rejected), expected):
        np.testing.assert_allclose(actual, wanted, atol=1e-5, rtol=1e-5)
    _, chosen_rewards, rejected_rewards = dpo_loss(*(mx.array(x) for x in (
        POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED)), beta)
    np.testing.assert_allclose(np.array(chosen_rewards), beta * (POLICY_CHOSEN - REFERENCE_CHOSEN), atol=1e-5)
    np.testing.assert_allclose(np.array(rejected_rewards), beta * (POLICY_REJECTED - REFERENCE_REJECTED), atol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_loss_and_gradients_match_the_paper(beta):
    mean_chosen, mean_rejected = POLICY_CHOSEN / LENGTHS_CHOSEN / 4, POLICY_REJECTED / LENGTHS_REJECTED / 4
    mean_chosen[0] = -1e-3  # near-certain answer: log(1 − p) must stay accurate
    loss, d_chosen, d_rejected = _mlx_value_and_grads(lambda a, b: orpo_loss(a, b, beta)[0],
                                                      mean_chosen, mean_rejected)
    expected = numpy_orpo(mean_chosen, mean_rejected, beta)
    for actual, wanted in zip((loss, d_chosen, d_rejected), expected):
        np.testing.assert_allclose(actual, wanted, atol=1e-5, rtol=1e-5)


def test_accuracy_counts_ties_as_half():
    accuracy = preference_accuracy(mx.array([1.0, 0.0, -1.0, 2e-6]), mx.array([0.0, 0.0, 0.0, 0.0]))
    assert np.array(accuracy).tolist() == [1.0, 0.5, 0.0, 0.5]  # float noise of the reference is no preference


@pytest.fixture(scope="module")
def adapted_model_and_pairs():
    model, tokenizer = load(str(MODEL))
    base_logits = {}
    pairs = []
    for number, (question, good, bad) in enumerate([
        ("How many players?", "SELECT COUNT Player FROM table", "table FROM Player COUNT SELECT"),
        ("Who won in 1998?", "SELECT Winner FROM table WHERE Year = 1998", "1998 = Year WHERE table FROM"),
        ("Name the venue", "SELECT Venue FROM table", "Venue SELECT"),
    ]):
        record = PreferenceRecord(f"x:{number}", [{"role": "user", "content": question}],
                                  [{"role": "assistant", "content": good}], [{"role": "assistant", "content": bad}],
                                  "prompt/chosen/rejected")
        pairs.append(tokenize_pair(record, tokenizer, FALLBACK_CHAT_TEMPLATE))
    batch = make_pair_batch(pairs)
    base_logits["logits"] = np.array(model(mx.array(batch.inputs)))
    attach_adapters(model, LoraSettings(rank=4))
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    return model, pairs, batch, base_logits["logits"]


def test_answer_log_probs_cover_the_answer_only_and_equal_full_logits(adapted_model_and_pairs):
    model, pairs, batch, _ = adapted_model_and_pairs
    for pair in pairs:  # the prompt is context: only the answer (and its end-of-turn) is scored
        assert 0 < pair.chosen.supervised.sum() < len(pair.chosen) / 2
    logits = model(mx.array(batch.inputs)).astype(mx.float32)
    log_probs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    expected = np.zeros(batch.inputs.shape[0])
    length = batch.inputs.shape[1]
    for position, target, weight in zip(batch.positions, batch.targets, batch.weights):
        expected[position // length] += weight * log_probs[position // length, position % length, target]
    selective = SequenceLogProbs(model)
    assert selective.selective
    sums, counts = selective(model, *batch.arrays())
    np.testing.assert_allclose(np.array(sums), expected, rtol=1e-5, atol=1e-4)
    full_sums, _ = SequenceLogProbs(model, selective=False)(model, *batch.arrays())
    np.testing.assert_allclose(np.array(full_sums), expected, rtol=1e-5, atol=1e-4)
    assert np.array(counts).tolist() == [float(p.chosen.supervised[1:].sum()) for p in pairs] + [
        float(p.rejected.supervised[1:].sum()) for p in pairs]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_selective_and_full_logit_gradients_agree(adapted_model_and_pairs, objective):
    model, _, batch, _ = adapted_model_and_pairs
    grads = []
    for selective in (True, False):
        loss = PreferenceObjective(model, objective, beta=0.5, selective=selective)
        arrays = loss.loss_arrays(model, batch)
        (_, _, _), g = nn.value_and_grad(model, loss)(model, *arrays)
        grads.append(dict(tree_flatten(g)))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, expected in grads[1].items():
        expected, actual = np.array(expected), np.array(grads[0][name])
        assert np.abs(expected).max() > 0, name
        assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max(), name


def test_adapters_off_is_the_base_model_and_switches_back(adapted_model_and_pairs):
    # mlx-lm's adapter layers keep the wrapped layer as `.linear`; if an upgrade changes that, this fails.
    model, _, batch, base_logits = adapted_model_and_pairs
    adapted = np.array(model(mx.array(batch.inputs)))
    assert np.abs(adapted - base_logits).max() > 1e-2  # the adapters really change the output
    with adapters_off(model):
        off = np.array(model(mx.array(batch.inputs)))
        assert not dict(tree_flatten(model.trainable_parameters()))  # no adapter weights inside
    np.testing.assert_allclose(off, base_logits, atol=1e-6)
    np.testing.assert_allclose(np.array(model(mx.array(batch.inputs))), adapted, atol=1e-6)


def test_dpo_reference_is_the_adapter_free_model(adapted_model_and_pairs):
    model, _, batch, _ = adapted_model_and_pairs
    objective = PreferenceObjective(model, "dpo")
    reference_chosen, reference_rejected = objective.reference(model, batch)
    with adapters_off(model):
        sums, _ = SequenceLogProbs(model)(model, *batch.arrays())
    policy, _ = SequenceLogProbs(model)(model, *batch.arrays())
    np.testing.assert_allclose(np.array(reference_chosen), np.array(sums)[:3], atol=1e-5)
    np.testing.assert_allclose(np.array(reference_rejected), np.array(sums)[3:], atol=1e-5)
    assert np.abs(np.array(policy) - np.array(sums)).max() > 1e-2


def test_a_trainable_head_gets_its_gradient_too(adapted_model_and_pairs):
    """Full finetuning trains the (tied) head: the fused head gradient, which only knows the hidden rows, must not
    be used then — the head's weights get the same gradient as through full logits."""
    _, _, batch, _ = adapted_model_and_pairs
    model, _ = load(str(MODEL))  # every weight trainable, as with --method full
    grads = []
    for selective in (True, False):
        loss = PreferenceObjective(model, "orpo", beta=0.5, selective=selective)
        (_, _, _), g = nn.value_and_grad(model, loss)(model, *loss.loss_arrays(model, batch))
        grads.append(dict(tree_flatten(g)))
    name = "model.embed_tokens.weight"
    expected, actual = np.array(grads[1][name]), np.array(grads[0][name])
    assert np.abs(expected).max() > 0
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()
