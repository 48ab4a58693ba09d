"""Group rollouts on the real bundled model: the group-shared prefill and batched decode give each sample exactly
what generating it alone gives with the same key."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxtune.train.grpo.losses import selected_log_probs
from mlxtune.train.grpo.rollout import SAMPLE_BLOCK, _sample, generate_group, rollout_examples, sample_keys


@pytest.fixture(scope="module")
def story_model(model_dir):
    from mlx_lm.utils import load

    model, tokenizer = load(str(model_dir))
    return model, tokenizer


def _prompts(tokenizer):
    return [tokenizer.encode("Once upon a time, there was a little girl named Lily."), tokenizer.encode("Tom saw")]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
@pytest.mark.parametrize("selective", [False, True])
def test_group_equals_each_sample_alone(story_model, temperature, top_p, selective):
    """Each sample of a group is what generating it alone gives; `selective`: with the head, as GRPO runs, the two
    prompts' prefill is one left-padded batch (`_prefill_all`)."""
    from mlxtune.train.loss import output_head

    model, tokenizer = story_model
    prompts = _prompts(tokenizer)
    assert len(prompts[0]) != len(prompts[1])  # the batch left-pads the shorter prompt
    stop = {tokenizer.eos_token_id, tokenizer.encode(".", add_special_tokens=False)[-1]}  # stop early and unevenly
    keys = sample_keys(mx.random.key(7), len(prompts), 4)
    head = output_head(model) if selective else None
    group = generate_group(model, prompts, keys, max_tokens=24, eos_token_ids=stop, temperature=temperature,
                           top_p=top_p, head=head)
    assert group.tokens.shape[0] == 8 and group.prompt_index == [0, 0, 0, 0, 1, 1, 1, 1]
    lengths = group.lengths
    assert len(set(lengths)) > 1, "the samples should stop at different lengths"
    assert len({tuple(group.completion(r)) for r in range(8)}) > 2, "sampling should differ between samples"
    for row in range(8):
        alone = generate_group(model, [prompts[group.prompt_index[row]]], keys[row:row + 1], max_tokens=24,
                               eos_token_ids=stop, temperature=temperature, top_p=top_p, head=head)
        assert alone.completion(0) == group.completion(row), f"sample {row} differs when decoded alone"
        np.testing.assert_allclose(np.array(alone.log_probs[0, :lengths[row]]),
                                   np.array(group.log_probs[row, :lengths[row]]), atol=1e-5)
        assert np.array_equal(np.array(alone.next_keys[0]), np.array(group.next_keys[row]))
    # mask: up to and including the stop token; nothing after it
    for row in range(8):
        completion = group.completion(row)
        assert completion[-1] in stop or len(completion) == 24
        assert not np.array(group.mask[row, lengths[row]:]).any()
        assert np.all(np.array(group.tokens[row, lengths[row]:]) == 0)


@pytest.mark.parametrize("vocab,temperature", [(3 * SAMPLE_BLOCK + 100, 1.0), (2 * SAMPLE_BLOCK, 0.7)])
def test_the_two_level_draw_samples_the_softmax(vocab, temperature):
    """The draw (a block by its mass, then an entry of it) has softmax(logits / T)'s distribution: over many keys the
    token counts pass a chi-square test against it (a vocabulary padded to whole blocks, and one that is not), and
    each returned log-prob is log softmax(logits) at the token."""
    logits = mx.random.normal((vocab,), key=mx.random.key(11)) * 2.0
    expected = np.array(mx.softmax(logits / temperature)) if temperature != 1.0 else np.array(mx.softmax(logits))
    log_softmax = np.array(logits - mx.logsumexp(logits))
    draws, chunk = 60_000, 10_000
    keys = mx.random.split(mx.random.key(12), draws)
    counts = np.zeros(vocab)
    for start in range(0, draws, chunk):
        tokens, chosen, _ = _sample(mx.broadcast_to(logits[None], (chunk, vocab)), keys[start:start + chunk],
                                    temperature, 1.0)
        tokens = np.array(tokens)
        np.testing.assert_allclose(np.array(chosen), log_softmax[tokens], atol=1e-5)
        counts += np.bincount(tokens, minlength=vocab)
    assert counts.sum() == draws and counts.size == vocab  # no token past the vocabulary (the padding)
    # chi-square over the entries expected ≥ 5 times, the rest as one bin
    mean = expected * draws
    big = mean >= 5
    observed, predicted = np.append(counts[big], counts[~big].sum()), np.append(mean[big], mean[~big].sum())
    statistic = float((((observed - predicted) ** 2) / predicted).sum())
    freedom = observed.size - 1
    assert statistic < freedom + 5 * np.sqrt(2 * freedom), (statistic, freedom)  # 5 standard deviations


def test_log_probs_are_the_models_own(story_model):
    """Each returned log-prob equals log softmax of a full forward pass over prompt + completion."""
    model, tokenizer = story_model
    prompt = _prompts(tokenizer)[1]
    group = generate_group(model, [prompt], sample_keys(mx.random.key(3), 1, 2), max_tokens=12,
                           eos_token_ids={tokenizer.eos_token_id})
    for row in range(2):
        completion = group.completion(row)
        sequence = mx.array(prompt + completion)[None]
        logits = model(sequence[:, :-1])[:, len(prompt) - 1:]
        want = selected_log_probs(logits, sequence[:, len(prompt):])[0]
        np.testing.assert_allclose(np.array(group.log_probs[row, :len(completion)]), np.array(want), atol=1e-5)


def test_greedy_and_same_key_are_reproducible(story_model):
    model, tokenizer = story_model
    prompt = _prompts(tokenizer)[:1]
    keys = sample_keys(mx.random.key(11), 1, 3)
    first = generate_group(model, prompt, keys, max_tokens=10, eos_token_ids=[tokenizer.eos_token_id])
    again = generate_group(model, prompt, keys, max_tokens=10, eos_token_ids=[tokenizer.eos_token_id])
    assert np.array_equal(np.array(first.tokens), np.array(again.tokens))
    greedy = generate_group(model, prompt, keys, max_tokens=10, eos_token_ids=[tokenizer.eos_token_id],
                            temperature=0)
    assert len({tuple(greedy.completion(r)) for r in range(3)}) == 1
    # a top-p so small that only the likeliest token survives samples greedily, whatever the temperature
    nucleus = generate_group(model, prompt, keys, max_tokens=10, eos_token_ids=[tokenizer.eos_token_id],
                             temperature=1.5, top_p=1e-6)
    assert np.array_equal(np.array(nucleus.tokens), np.array(greedy.tokens))
    with pytest.raises(ValueError, match="keys per prompt"):
        generate_group(model, prompt * 2, keys, max_tokens=4, eos_token_ids=[2])


def test_the_update_batch_recomputes_the_rollout_log_probs(story_model):
    """Prompt + completion through the batching and selective head the other objectives use: at the same weights
    the recomputed log-probs are the sampled ones (ratio 1), row by row, position by position."""
    from mlxtune.data.batching import make_batch
    from mlxtune.train.preference.objective import SequenceLogProbs

    model, tokenizer = story_model
    prompts = _prompts(tokenizer)
    group = generate_group(model, prompts, sample_keys(mx.random.key(5), 2, 3), max_tokens=16,
                           eos_token_ids={tokenizer.encode(".", add_special_tokens=False)[-1]})
    examples = rollout_examples(prompts, group)
    assert [int(e.supervised.sum()) for e in examples] == group.lengths
    batch = make_batch(examples)
    nll = SequenceLogProbs(model).position_nll(model, mx.array(batch.inputs), mx.array(batch.positions),
                                               mx.array(batch.position_targets))
    recomputed = -np.array(nll)[: batch.supervised_tokens]
    sampled = np.concatenate([np.array(group.log_probs[r, :n]) for r, n in enumerate(group.lengths)])
    np.testing.assert_allclose(recomputed, sampled, atol=1e-5)


def test_the_batch_cache_grows_once_by_what_decoding_appends(story_model):
    """The merged cache is full at the longest prompt; it grows once, by the max_tokens − 1 tokens decoding feeds back
    (memory/grpo.py's `cache_positions`), not by mlx-lm's 256-position step."""
    from mlx_lm.models.cache import make_prompt_cache

    from mlxtune.train.grpo.rollout import batch_cache

    model, tokenizer = story_model
    prompts = _prompts(tokenizer)
    caches = []
    for prompt in prompts:
        caches.append(make_prompt_cache(model))
        model(mx.array(prompt)[None], cache=caches[-1])
    cache = batch_cache(caches, group_size=3, max_tokens=20)
    longest = max(len(p) for p in prompts)
    for _ in range(19):
        model(mx.zeros((6, 1), mx.int32), cache=cache)
    assert {layer.keys.shape[2] for layer in cache} == {longest + 19} and cache[0].keys.shape[0] == 6


def test_the_prefill_keeps_the_updates_prompt_pass(story_model):
    """With the selective head, the rollout's prefill runs the blocks and the head apart (only the last position
    through the head) and keeps each prompt's pass: the samples are those of the plain prefill, and the pass is what
    train/grpo/prefix.py's `prompt_pass` computes for the update (keys and values per layer, the last hidden state)."""
    from mlxtune.train.grpo.prefix import prompt_pass
    from mlxtune.train.loss import output_head

    model, tokenizer = story_model
    prompts = _prompts(tokenizer)
    keys = sample_keys(mx.random.key(5), 2, 3)
    plain = generate_group(model, prompts, keys, max_tokens=12, eos_token_ids={tokenizer.eos_token_id})
    kept = generate_group(model, prompts, keys, max_tokens=12, eos_token_ids={tokenizer.eos_token_id},
                          head=output_head(model), keep_prompt_passes=True)
    assert plain.prompt_passes is None and len(kept.prompt_passes) == 2
    assert np.array_equal(np.array(plain.tokens), np.array(kept.tokens))
    np.testing.assert_allclose(np.array(kept.log_probs), np.array(plain.log_probs), atol=1e-5)
    for prompt, (kv, last) in zip(prompts, kept.prompt_passes):
        want_kv, want_last = prompt_pass(lambda inputs, cache: model.model(inputs, cache=cache), len(model.layers),
                                         mx.array(prompt)[None])
        assert len(kv) == len(want_kv) and last.shape == want_last.shape == (1, 1, want_last.shape[-1])
        np.testing.assert_allclose(np.array(last), np.array(want_last), atol=1e-5)
        for (keys_, values), (want_keys, want_values) in zip(kv, want_kv):
            assert keys_.shape == want_keys.shape and keys_.shape[2] == len(prompt)
            np.testing.assert_allclose(np.array(keys_), np.array(want_keys), atol=1e-5)
            np.testing.assert_allclose(np.array(values), np.array(want_values), atol=1e-5)


def test_the_prefill_batches_short_prompts_only(story_model, monkeypatch):
    """Prompts go through the prefill together up to PREFILL_BATCH_TOKENS (count × longest): each prompt's cache and
    last logits are the same batched, split in batches, or alone."""
    from mlxtune.train.grpo import rollout
    from mlxtune.train.loss import output_head

    model, tokenizer = story_model
    prompts = _prompts(tokenizer) + [tokenizer.encode("The sun was hot and the sky was blue.")]
    head = output_head(model)
    batches, prefill_batch = [], rollout._prefill_batch
    monkeypatch.setattr(rollout, "_prefill_batch", lambda model, batch, head: (
        batches.append(len(batch)), prefill_batch(model, batch, head))[1])  # the real one, its batch sizes noted
    results, sizes = {}, {}
    for bound in (10_000, 2 * max(map(len, prompts)), 1):  # one batch of 3; a batch of 2 and one alone; each alone
        monkeypatch.setattr(rollout, "PREFILL_BATCH_TOKENS", bound)
        batches.clear()
        results[bound] = rollout._prefill_all(model, prompts, head)
        sizes[bound] = list(batches)
    assert list(sizes.values()) == [[3], [2, 1], [1, 1, 1]], sizes
    for bound, each in results.items():
        for (cache, logits, last), (want_cache, want_logits, want_last), prompt in zip(each, results[1], prompts):
            assert cache[0].offset == want_cache[0].offset == len(prompt), bound
            np.testing.assert_allclose(np.array(logits), np.array(want_logits), atol=1e-4)
            np.testing.assert_allclose(np.array(cache[-1].keys[..., :len(prompt), :]),
                                       np.array(want_cache[-1].keys[..., :len(prompt), :]), atol=1e-5)
