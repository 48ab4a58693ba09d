"""mlx-lm private names mlxtune relies on. Each test names the mlxtune code that breaks if it fails after an
mlx-lm upgrade, so the failure says what to fix instead of surfacing as a wrong result somewhere else."""

from __future__ import annotations

import mlx.core as mx
import pytest

from conftest import MODEL


@pytest.fixture(scope="module")
def loaded():
    from mlx_lm.utils import load

    return load(str(MODEL))


def test_tokenizer_wrapper_keeps_the_hf_tokenizer_in_underscore_tokenizer(loaded):
    # used by: data/template.py (offsets), data/cache.py (fingerprint), fuse.py (carrying the run's template)
    from transformers import PreTrainedTokenizerBase

    _, tokenizer = loaded
    backend = getattr(tokenizer, "_tokenizer", None)
    assert isinstance(backend, PreTrainedTokenizerBase), (
        "mlx_lm TokenizerWrapper no longer has `_tokenizer` (the Hugging Face tokenizer): update "
        "data/template.py, data/cache.py and fuse.py")
    encoded = backend("select name", add_special_tokens=False, return_offsets_mapping=True)
    assert encoded["offset_mapping"] and backend.backend_tokenizer.to_str()
    backend.chat_template = "{{ messages[0]['content'] }}"  # what fuse.py sets before mlx_lm's save writes it
    assert tokenizer.chat_template == "{{ messages[0]['content'] }}", (
        "setting TokenizerWrapper._tokenizer.chat_template no longer changes the wrapper's template: fix fuse.py")


def test_get_classes_maps_a_config_to_model_and_args_classes():
    # used by: synthetic.py (random-weight models of real architectures)
    from mlx_lm.utils import _get_classes
    from mlx_lm.models import llama

    model_class, args_class = _get_classes({"model_type": "llama"})
    assert model_class is llama.Model and args_class is llama.ModelArgs, (
        "mlx_lm.utils._get_classes changed: update mlxtune/synthetic.py")


def test_grad_checkpoint_patches_the_block_class_to_recompute(loaded):
    # used by: train/loop.py (--grad-checkpoint)
    from mlx_lm.tuner.trainer import grad_checkpoint

    model, _ = loaded
    block_class = type(model.layers[0])
    original = block_class.__call__
    try:
        grad_checkpoint(model.layers[0])
        assert block_class.__call__ is not original, (
            "mlx_lm.tuner.trainer.grad_checkpoint no longer patches the block class: fix train/loop.py")
        x = mx.ones((1, 4, model.args.hidden_size))
        assert model.layers[1](x, mask="causal").shape == x.shape  # every block of the class is patched, still works
    finally:
        block_class.__call__ = original


def test_attention_reads_the_cache_protocol_the_shared_prompt_update_uses(loaded):
    # used by: train/grpo/prefix.py (GRPO's update runs a prompt once and its completions after it through
    # mlx-lm's per-layer cache calls: `offset` for the rope, `update_and_fetch` for the keys, `make_mask`)
    from mlxtune.train.grpo.prefix import shared_prompt_states, supports_shared_prompt

    model, _ = loaded
    prompt, completions = mx.array([[1, 45, 230, 17, 88]]), mx.array([[7, 300, 12], [9, 4, 100]])
    states = shared_prompt_states(lambda x, cache: model.model(x, cache=cache), len(model.layers), prompt,
                                  completions).reshape(2, 4, -1)
    rows = mx.concatenate([mx.repeat(prompt, 2, axis=0), completions], axis=1)
    expected = model.model(rows)[:, prompt.shape[1] - 1:]
    assert supports_shared_prompt(model), "mlx_lm's make_prompt_cache no longer gives KVCache layers"
    assert mx.abs(states - expected).max().item() < 1e-4, (
        "mlx-lm's attention no longer reads the cache as train/grpo/prefix.py's caches expect (offset, "
        "update_and_fetch, make_mask): fix the shared-prompt update there")


def test_model_modules_bind_swiglu_from_activations_and_call_it_by_that_name(loaded):
    # used by: cpu_activations.py (the exp-form SwiGLU on the CPU backend replaces the module-level name `swiglu` in
    # mlx_lm/models/activations.py and in each model module that imported it)
    import inspect
    import sys

    from mlx_lm.models import activations

    model = loaded[0]
    mlp = type(model.layers[0].mlp)
    module = sys.modules[mlp.__module__]
    assert hasattr(activations, "swiglu") and hasattr(module, "swiglu")
    assert "swiglu(" in inspect.getsource(mlp.__call__)
