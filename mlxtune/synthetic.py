"""Models with real architecture shapes and random weights, for speed/memory benchmarks and architecture tests; and
the preference pairs the tests and benchmarks make from the bundled WikiSQL answers (`corrupt_answer`).

Shapes matter there, not skill: the configs below are the published ones (layer count reducible to fit the time).
The tokenizer is borrowed from the bundled stories260K (its ids fit any larger vocabulary).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

SHAPES = {
    # HuggingFaceTB/SmolLM-135M
    "smollm-135m": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": True,
    },
    # Qwen/Qwen2.5-0.5B
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
    },
}

BUNDLED_TOKENIZER = Path(__file__).resolve().parents[1] / "examples" / "models" / "stories260K"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def build_random_model(config: dict | str, out: str | Path, *, layers: int | None = None, seed: int = 0,
                       chat_template: str | None = None, tokenizer_dir: str | Path = BUNDLED_TOKENIZER,
                       dtype: str = "float32", bits: int | None = None, group_size: int = 64,
                       **overrides) -> Path:
    """Write an MLX model directory with `config`'s shapes (a SHAPES name or a dict) and random weights.

    `dtype` is the stored precision ("bfloat16" like most published checkpoints); `bits` quantizes the linear
    and embedding layers as `mlxtune pull` does (mlx-lm's quantization).
    """
    import mlx.core as mx
    from mlx_lm.utils import _get_classes, save_config, save_model

    config = dict(SHAPES[config] if isinstance(config, str) else config)
    if layers is not None:
        config["num_hidden_layers"] = layers
    config.update(overrides)
    config.setdefault("architectures", ["LlamaForCausalLM"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    # mlx-lm's private `_get_classes` maps a config to its (Model, ModelArgs) classes; the public loaders all need
    # weights on disk, which is what we are about to create (tests/test_mlx_lm_private.py guards the name).
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    if bits is not None:
        from mlx_lm.utils import quantize_model

        model, config = quantize_model(model, config, group_size, bits)
        mx.eval(model.parameters())
    save_model(out, model)
    save_config(dict(config), out / "config.json")
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, out / name)
    if chat_template:
        tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
        tokenizer_config["chat_template"] = chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


def corrupt_answer(answer: str, number: int, rng: random.Random) -> str:
    """A rejected answer for pair `number`: two adjacent words swapped (even pairs) or the words after the first two
    reversed (odd pairs). On WikiSQL the base model prefers the first corruption to the truth and the truth to the
    second, so overall it can't tell chosen from rejected before training."""
    words = answer.split()
    if number % 2:
        return " ".join(words[:2] + words[:1:-1])
    at = rng.randrange(len(words) - 1)
    words[at], words[at + 1] = words[at + 1], words[at]
    return " ".join(words)
