"""Memory estimates from a model's config: what inference and a LoRA finetune will need.

Rough, documented arithmetic (not a measurement): weights as stored, the KV cache in float16, and for LoRA the
adapter with its gradient and two AdamW moments in float32 plus the activations kept for the backward pass.
"""

from __future__ import annotations

from mlxtune.model_config import head_dim, text_config
from mlxtune.ui import GB  # 10^9 bytes, as everywhere

RUNTIME_OVERHEAD = 0.4 * GB  # MLX, Python and the tokenizer
ACTIVATION_FLOATS_PER_TOKEN = 16  # per layer, in units of hidden_size: residual, norms, q/k/v/o, MLP inputs


def _widths(text: dict) -> tuple[int, int, int, int]:
    """(hidden, query width, key/value width, MLP width) of a Llama-style block."""
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    return (hidden, heads * head_dim(text), text.get("num_key_value_heads", heads) * head_dim(text),
            text.get("intermediate_size", 4 * hidden))


def lora_parameters(config: dict, rank: int) -> int:
    """Adapter parameters when every linear layer of every block is adapted (a Llama-style block)."""
    text = text_config(config)
    hidden, q, kv, inter = _widths(text)
    per_layer = rank * ((hidden + q) + (hidden + kv) * 2 + (q + hidden) + (hidden + inter) * 2 + (inter + hidden))
    return per_layer * text["num_hidden_layers"]


def estimate_memory(config: dict, weight_bytes: int, rank: int = 8, batch_size: int = 4, seq_len: int = 1024,
                    context: int = 4096, grad_checkpoint: bool = False) -> dict:
    """Estimated peak bytes for inference at `context` tokens and for LoRA at the given batch shape."""
    text = text_config(config)
    layers, heads = text["num_hidden_layers"], text["num_attention_heads"]
    hidden, _, kv_width, inter = _widths(text)

    kv_cache = 2 * layers * kv_width * context * 2
    inference = weight_bytes + kv_cache + RUNTIME_OVERHEAD

    adapter = lora_parameters(config, rank) * 4 * 4  # weight, gradient, two AdamW moments (float32)
    tokens = batch_size * seq_len
    per_layer = tokens * (ACTIVATION_FLOATS_PER_TOKEN * hidden + 3 * inter) * 4 + batch_size * heads * seq_len**2 * 4
    activations = (tokens * hidden * 4 * layers + per_layer) if grad_checkpoint else per_layer * layers
    head_chunk = 2 * min(tokens, 1024) * text.get("vocab_size", 32000) * 4  # selective loss works in chunks
    lora = weight_bytes + adapter + activations + head_chunk + RUNTIME_OVERHEAD
    return {
        "inference_bytes": int(inference),
        "lora_bytes": int(lora),
        "assumptions": {"context": context, "rank": rank, "batch_size": batch_size, "seq_len": seq_len,
                        "grad_checkpoint": grad_checkpoint},
    }
