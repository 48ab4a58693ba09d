"""Peak memory of a finetune, estimated from the model's config and weight files (never loading them).

One unit: bytes inside, shown as GB = 10^9 bytes everywhere (`fmt_gb`). The estimate is of what MLX itself
allocates at its peak (`mx.get_peak_memory()`), term by term from the architecture:

- weights as MLX holds them: quantized linears as packed integers + scales/biases, the rest in its dtype; on the CPU
  backend half-precision tensors are upcast to float32 (mlxtune trains in float32 there);
- trainable parameters with their gradient and two AdamW moments (plus an accumulation buffer and the update's
  transient copies): LoRA A/B (float32), DoRA's magnitude, or the blocks' own weights for `full`;
- activations kept for the backward pass in every block from the lowest adapted one up: norms, q/k/v, the attention
  probabilities (the CPU backend computes attention unfused and keeps them, [heads, L, L] per row), the attention
  output, the MLP's gate/up/product; with gradient checkpointing only each block's input, plus one block recomputed;
- the loss workspace: in training with a frozen head (every run method), the fused head gradient's chunks in flight,
  one per stream, nothing vocabulary-sized kept — a phase of its own at the end of the forward pass, so the peak is
  the larger of that phase and the backward pass's, not their sum; in evaluation a forward chunk per stream; with
  full logits, the logits with their softmax and gradient;
- the packing mask ([rows, L, L] booleans, expanded to the scores' shape inside attention);
- a quantized base on the CPU backend (`cpu_quantized.py`): with `load` the float copies of its quantized weights,
  with `call` the head's float copy and a few blocks' weights dequantized in flight;
- a fixed allowance for MLX's own small buffers (RNG state, probes, compiled-graph constants).

`docs/MEMORY.md` has the calibration against measured peaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mlxtune.memory.budget import GB
from mlxtune.memory.limits import (DEQUANTIZED_COPY_SHARE, FUSED_CHUNK_ROWS, KEPT_SOFTMAX_BYTES, chunk_rows,
                                   cpu_loss_streams)
from mlxtune.model_config import head_dim, read_config, read_safetensors_header, text_config

FIXED_ALLOWANCE = 4 * 10**6  # MLX's small buffers: RNG state, probe batches, compiled constants

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
HALF = ("F16", "BF16")


# ----------------------------------------------------------------------------------------------- the model


@dataclass
class ModelFacts:
    """What the estimate needs to know about a model: its shapes and how its weights are stored."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name → (dtype, shape)
    bits: int | None = None
    group_size: int | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelFacts":
        path = Path(path)
        config = read_config(path)
        text = text_config(config)
        tensors = {}
        for file in sorted(path.glob("*.safetensors")):
            for name, info in read_safetensors_header(file).items():
                tensors[name] = (info["dtype"], tuple(info["shape"]))
        quantization = config.get("quantization") or {}
        heads = text["num_attention_heads"]
        return cls(layers=text["num_hidden_layers"], hidden=text["hidden_size"], heads=heads,
                   kv_heads=text.get("num_key_value_heads") or heads, head_dim=head_dim(text),
                   intermediate=text.get("intermediate_size") or 4 * text["hidden_size"],
                   vocab=text.get("vocab_size", 32000), tensors=tensors,
                   bits=quantization.get("bits"), group_size=quantization.get("group_size"))

    @property
    def has_half(self) -> bool:
        return any(dtype in HALF for dtype, _ in self.tensors.values())

    def weight_bytes(self, upcast: bool = False, bits: int | None = None) -> int:
        """Bytes of the weights in memory; `upcast`: half precision held as float32; `bits`: as if quantized."""
        total = 0
        for name, (dtype, shape) in self.tensors.items():
            size = math.prod(shape) * DTYPE_BYTES.get(dtype, 4)
            if bits and not self.bits and self._quantizable(name, shape):
                group = 64
                total += math.prod(shape) * bits // 8 + 2 * (math.prod(shape) // group) * (4 if upcast else 2)
                continue
            if upcast and dtype in HALF:
                size *= 2
            total += size
        return total

    def _quantizable(self, name: str, shape: tuple) -> bool:
        return name.endswith(".weight") and len(shape) == 2 and shape[-1] % 64 == 0

    def quantized_weights(self, bits: int | None = None) -> dict[str, int]:
        """Weight name → its count of values, for every weight computed quantized: stored packed (a `.scales`
        beside it) or, with `bits` on an unquantized model, every weight quantizing would pack."""
        found = {}
        for name, (dtype, shape) in self.tensors.items():
            if len(shape) != 2 or not name.endswith(".weight"):
                continue
            if name[:-len("weight")] + "scales" in self.tensors:  # packed: 32 / bits values per uint32
                found[name] = shape[0] * shape[1] * 32 // (self.bits or 4)
            elif bits and not self.bits and self._quantizable(name, shape):
                found[name] = shape[0] * shape[1]
        return found

    def dequantized_bytes(self, bits: int | None = None) -> int:
        """Bytes of float32 copies of every quantized weight (the CPU backend computes in float32, so
        `cpu_quantized.float_weight_bytes` of the loaded model comes to the same)."""
        return 4 * sum(self.quantized_weights(bits).values())

    def block_linears(self, layer: int) -> list[tuple[str, int, int]]:
        """(module path, input width, output width) of every linear layer in block `layer`."""
        prefix = f"model.layers.{layer}."
        found = []
        for name, (dtype, shape) in self.tensors.items():
            if not (name.startswith(prefix) and name.endswith(".weight") and len(shape) == 2):
                continue
            module = name[len(prefix):-len(".weight")]
            out_width, in_width = shape
            if f"{prefix}{module}.scales" in self.tensors:  # packed: 32 / bits weights per uint32
                in_width = in_width * 32 // (self.bits or 4)
            found.append((module, in_width, out_width))
        return found

    def block_float_bytes(self, layer: int, upcast: bool) -> int:
        prefix = f"model.layers.{layer}."
        total = 0
        for name, (dtype, shape) in self.tensors.items():
            if name.startswith(prefix) and dtype.startswith(("F", "BF")):
                total += math.prod(shape) * (4 if upcast and dtype in HALF else DTYPE_BYTES.get(dtype, 4))
        return total


# ---------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class BatchShape:
    """One micro-batch as the step sees it: rows × length tokens, `supervised` loss positions (padded)."""

    rows: int
    length: int
    supervised: int
    packed: bool = False


@dataclass
class RunShape:
    """The training settings that change memory."""

    method: str = "lora"
    rank: int = 8
    layers: int | None = None  # adapted blocks, from the top; None = all
    target_modules: list[str] | None = None
    grad_checkpoint: bool = False
    selective_loss: bool = True
    grad_accumulation: int = 1
    on_cpu: bool = True
    streams: int = 1  # loss streams (one per core on the CPU backend)
    bits: int | None = None  # estimate as if the base were quantized to this many bits
    fused_head: bool = False  # the head's gradient made chunk by chunk in the forward pass (a frozen head in training)
    # how a quantized base computes on the CPU backend (cpu_quantized.choose_path): off, call or load
    dequantize: str = "off"


@dataclass
class Estimate:
    total: int
    parts: dict[str, int]
    worst_batch: BatchShape | None = None

    def to_dict(self) -> dict:
        return {"estimate_gb": round(self.total / GB, 3), "parts_gb": {k: round(v / GB, 4) for k, v in
                                                                        self.parts.items()},
                "worst_batch": None if self.worst_batch is None else vars(self.worst_batch)}


def _adapted(facts: ModelFacts, run: RunShape) -> list[int]:
    count = facts.layers if run.layers is None else min(run.layers, facts.layers)
    return list(range(facts.layers - count, facts.layers))


def trainable_bytes(facts: ModelFacts, run: RunShape) -> int:
    """Trainable parameters with gradient, AdamW moments, the accumulation buffer and the update's transients."""
    adapted = _adapted(facts, run)
    upcast = run.on_cpu and facts.has_half
    if run.method == "full":
        weight_bytes = sum(facts.block_float_bytes(layer, upcast) for layer in adapted)
        if facts.bits:  # quantized blocks: only their float parts (norms, scales, biases) are trainable
            pass
        copies = 3 + (run.grad_accumulation > 1)  # gradient, m, v (the weights themselves are counted as weights)
        return weight_bytes * copies
    parameters = 0
    for layer in adapted:
        for module, in_width, out_width in facts.block_linears(layer):
            if run.target_modules and module not in run.target_modules:
                continue
            parameters += run.rank * (in_width + out_width) + (out_width if run.method == "dora" else 0)
    copies = 4 + (run.grad_accumulation > 1)  # weight, gradient, m, v
    return parameters * 4 * copies


def _kept_per_token(facts: ModelFacts, run: RunShape) -> int:
    """Floats kept per token per block for the backward pass (attention probabilities counted apart)."""
    q_width, kv_width = facts.heads * facts.head_dim, facts.kv_heads * facts.head_dim
    lora = 7 * run.rank if run.method != "full" else 0
    # residual input, 2 norm outputs, a residual; q and k (rotated), v, attention output; the MLP's gate, up,
    # sigmoid(gate), silu(gate) and their product (measured: the SwiGLU keeps all five)
    return 4 * facts.hidden + 2 * q_width + 2 * kv_width + 5 * facts.intermediate + lora


# One block's backward pass, forward arrays included, measured block by block with its gradient (LoRA's and the
# input's) on the bench's three shapes, 2 × 256 tokens (docs/MEMORY.md): the attention's peaks at about 4 score-sized
# arrays and 24 [tokens, hidden] ones (2048 wide, 16 heads: 99 MB), the MLP's at 16 [tokens, intermediate] and 12
# [tokens, hidden] arrays beside the attention's kept scores (Qwen2.5-0.5B's 4864: 174 MB; SmolLM-135M's: 60 MB).
ATTENTION_BACKWARD_SCORES = 4
ATTENTION_BACKWARD_ROWS = 24
MLP_BACKWARD_INTERMEDIATE = 16
MLP_BACKWARD_ROWS = 12


def activation_bytes(facts: ModelFacts, run: RunShape, batch: BatchShape) -> dict[str, int]:
    blocks = len(_adapted(facts, run))
    tokens = batch.rows * batch.length
    float_bytes = 4 if run.on_cpu else 2
    per_block = tokens * _kept_per_token(facts, run) * float_bytes
    # The CPU backend's attention keeps its [rows, heads, L, L] probabilities; Metal's fused kernel keeps none.
    scores = batch.rows * facts.heads * batch.length**2 * 4
    kept_scores = scores if run.on_cpu else 0
    # The backward pass runs one block at a time: its attention's backward, then its MLP's, each with its own
    # gradients on top of what the block keeps (counted above, so taken off here).
    block = max(ATTENTION_BACKWARD_SCORES * scores + ATTENTION_BACKWARD_ROWS * tokens * facts.hidden * float_bytes,
                scores + tokens * (MLP_BACKWARD_INTERMEDIATE * facts.intermediate
                                   + MLP_BACKWARD_ROWS * facts.hidden) * float_bytes)
    transient = max(0, block - per_block - kept_scores)
    if run.grad_checkpoint:
        kept = blocks * tokens * facts.hidden * float_bytes + per_block + kept_scores
    else:
        kept = blocks * (per_block + kept_scores)
    embeddings = 3 * tokens * facts.hidden * float_bytes  # embedding output, final norm and its input
    mask = 0
    if batch.packed:
        # [rows, 1, L, L] booleans, broadcast to the scores' float shape where attention applies it.
        mask = batch.rows * batch.length**2 + (scores if run.on_cpu else 0)
    return {"activations": kept + embeddings, "backward transient": transient, "packing mask": mask}


def loss_bytes(facts: ModelFacts, run: RunShape, batch: BatchShape, training: bool = True) -> int:
    tokens = batch.rows * batch.length
    vocab_row = facts.vocab * 4
    if not run.selective_loss:
        # float32 logits of every position, kept with their log-softmax; the softmax and gradient in the backward
        return tokens * vocab_row * (4 if training else 2)
    rows = batch.supervised
    chunk = min(chunk_rows(facts.vocab), max(1, -(-rows // max(run.streams, 1))))
    gathered = rows * facts.hidden * 4
    chunks = -(-rows // chunk)
    in_flight = min(run.streams, chunks)
    if not training:
        # per stream: the chunk's logits, their shifted copy and exponentials (nothing kept past the chunk,
        # train/loss.py's forward body); when every stream has chunks after its first, each begins the next while
        # one ends (measured with 2 streams: 3 chunks 2.3 arrays per stream, 7–19 chunks 5.0)
        arrays = EVAL_CHUNKS_ARRAYS if chunks >= 2 * run.streams else EVAL_CHUNK_ARRAYS
        return gathered + in_flight * arrays * chunk * vocab_row
    if run.fused_head:
        # differentiated chunk by chunk in the forward pass, nothing vocabulary-sized kept for the backward: its own
        # phase (`fused_loss_phase_bytes`); the backward pass holds only the rows' gradient
        return 2 * gathered
    if rows * vocab_row > KEPT_SOFTMAX_BYTES:  # recomputed chunk by chunk: logits, softmax, gradient per stream
        return gathered + in_flight * 3 * chunk * vocab_row
    # every chunk's logits and softmax kept for the backward pass (the custom vjp holds its primal), plus one
    # chunk's gradient per stream
    return gathered + 2 * rows * vocab_row + in_flight * chunk * vocab_row


# Chunk-sized float32 arrays per stream in a forward-only loss (validation), measured (tests/train/test_loss.py):
EVAL_CHUNK_ARRAYS = 3  # one chunk at a time: logits, shifted logits, exponentials
EVAL_CHUNKS_ARRAYS = 5  # two chunks or more on every stream: the next chunk's first arrays beside the last one's
# Chunk-sized float32 arrays per loss stream at the fused loss phase's peak: 6.1–6.9 measured on the loss alone
# (49k and 152k vocabularies, 512–2048 rows, 2 streams). The ten fitted before were fitted on steps whose peak was
# really their validation pass, every chunk's softmax kept (docs/MEMORY.md).
FUSED_CHUNK_ARRAYS = 7
# With at most one chunk per stream nothing of a next chunk overlaps: 3.0 chunk-sized arrays per stream measured on
# a GRPO update chunk (4 rows × 32 completion tokens, 49k vocabulary, 2 streams: scripts/bench_grpo_memory.py); 4
# keeps a margin (an update of 2 rows × 16 tokens is 128 padded head positions, as make_batch pads them: memory/grpo.py)
FUSED_ONE_CHUNK_ARRAYS = 4
# [rows, hidden] float32 arrays at the fused loss's peak, measured on the loss alone with 2 streams: 7–10.5 over
# hidden widths 512–4096 (the test shape, 2048 wide against an 8k vocabulary, was 16% under with 2)
FUSED_ROW_ARRAYS = 10


def fused_loss_phase_bytes(facts: ModelFacts, run: RunShape, batch: BatchShape) -> int:
    """The fused head gradient's workspace while the loss runs, at the end of the forward pass: per stream about seven
    chunk-sized float32 arrays (logits, exponentials, softmax and its gradient, of the chunk finishing and the next
    one starting: measured on the loss alone, not counted array by array), plus
    about ten [rows, hidden] float32 arrays (FUSED_ROW_ARRAYS: the gathered rows, the chunks' row gradients and
    their way back into the rows' gradient), which show where the hidden width is large against the vocabulary."""
    rows = batch.supervised
    chunk = min(FUSED_CHUNK_ROWS, max(1, -(-rows // max(run.streams, 1))))
    chunks = -(-rows // chunk)
    in_flight = min(run.streams, chunks)
    arrays = FUSED_CHUNK_ARRAYS if chunks > run.streams else FUSED_ONE_CHUNK_ARRAYS
    return FUSED_ROW_ARRAYS * rows * facts.hidden * 4 + in_flight * arrays * chunk * facts.vocab * 4


def fixed_parts(facts: ModelFacts, run: RunShape) -> dict[str, int]:
    """What the run holds whatever the batch, in every phase: weights (and the float copies a quantized base
    computes through), trainable parameters with their optimizer state, the allowance."""
    upcast = run.on_cpu and facts.has_half
    weights = facts.weight_bytes(upcast=upcast, bits=run.bits)
    trainable = trainable_bytes(facts, run)
    fixed = {"weights": weights, "trainable + optimizer": trainable, "allowance": FIXED_ALLOWANCE}
    if run.method == "dora" and (facts.bits or run.bits):
        # DoRA on a quantized base dequantizes each adapted weight in its forward pass and keeps it for backward.
        fixed["dequantized weights"] = sum(
            in_width * out_width * (4 if run.on_cpu else 2) for layer in _adapted(facts, run)
            for module, in_width, out_width in facts.block_linears(layer)
            if not run.target_modules or module in run.target_modules)
    if _quantized_base(facts, run):
        fixed["dequantized weights (CPU)"] = dequantized_path_bytes(facts, run)
    return fixed


def estimate(facts: ModelFacts, run: RunShape, batches: list[BatchShape],
             eval_batches: list[BatchShape] = ()) -> Estimate:
    """Peak bytes of a training run over these micro-batches (and validation batches)."""
    fixed = fixed_parts(facts, run)
    best_total, best_parts, worst = sum(fixed.values()), dict(fixed), None
    for batch in batches:
        parts = dict(fixed, **activation_bytes(facts, run, batch), loss=loss_bytes(facts, run, batch))
        if run.fused_head and run.selective_loss:
            # Two phases peak apart: the loss at the end of the forward pass (every kept activation, the loss
            # chunks' workspace) and the backward pass (the activations, one block's transients, the rows'
            # gradient). With `call`, the blocks' weights are dequantized in flight: the loss phase sees a few still
            # alive (measured: 0–2.4), the backward phase's peak about one (below).
            if run.dequantize == "call" and "dequantized weights (CPU)" in parts:
                parts["dequantized weights (CPU)"] = dequantized_path_bytes(facts, run, BACKWARD_PHASE_BLOCK_WEIGHTS)
            loss_phase = dict(parts, **{"backward transient": 0, "loss": fused_loss_phase_bytes(facts, run, batch)})
            if run.dequantize == "call" and "dequantized weights (CPU)" in parts:
                loss_phase["dequantized weights (CPU)"] = dequantized_path_bytes(facts, run, LOSS_PHASE_BLOCK_WEIGHTS)
            if sum(loss_phase.values()) > sum(parts.values()):
                parts = loss_phase
        total = sum(parts.values())
        if total > best_total or worst is None:
            best_total, best_parts, worst = total, parts, batch
    for batch in eval_batches:
        tokens = batch.rows * batch.length
        float_bytes = 4 if run.on_cpu else 2
        one_block = tokens * _kept_per_token(facts, run) * float_bytes + batch.rows * facts.heads * batch.length**2 * 8
        # plus the MLP's two [tokens, intermediate] temporaries while a block runs (measured: the 152k-vocabulary
        # validation pass of qwen-lora-long-pack-ckpt)
        mlp = 2 * tokens * facts.intermediate * float_bytes
        hidden = 2 * tokens * facts.hidden * float_bytes  # the hidden states between blocks, and the last norm's
        # A forward pass has the same two phases, one after the other: the blocks (one at a time, nothing kept)
        # and the loss once they are done. The peak is the larger, not their sum (smollm-q4-lora-long-ckpt's
        # validation was +27% over with the sum).
        blocks = dict(fixed, activations=hidden + one_block + mlp, loss=0)
        loss = dict(fixed, activations=hidden, loss=loss_bytes(facts, run, batch, training=False))
        parts = max(blocks, loss, key=lambda phase: sum(phase.values()))
        total = sum(parts.values())
        if total > best_total:
            best_total, best_parts, worst = total, parts, batch
    return Estimate(best_total, best_parts, worst)


def kv_cache_bytes(facts: ModelFacts, rows: int, context: int, width: int = 2) -> int:
    """Keys and values of `rows` sequences of `context` tokens in every block, `width` bytes a value."""
    return 2 * facts.layers * facts.kv_heads * facts.head_dim * rows * context * width


def inference_bytes(facts: ModelFacts, context: int, on_cpu: bool = False) -> int:
    """Weights + a float16 KV cache of `context` tokens + one step's logits."""
    return (facts.weight_bytes(upcast=on_cpu and facts.has_half) + kv_cache_bytes(facts, 1, context)
            + facts.vocab * 4 + FIXED_ALLOWANCE)


def model_memory(path: str | Path, context: int, rank: int = 8, batch_size: int = 4, seq_len: int = 1024,
                 on_cpu: bool | None = None) -> dict:
    """What `models info` shows: inference at `context` tokens and a LoRA finetune at a typical batch shape."""
    if on_cpu is None:
        import mlx.core as mx

        on_cpu = not mx.metal.is_available()
    facts = ModelFacts.from_dir(path)
    run = RunShape(rank=rank, on_cpu=on_cpu, streams=cpu_loss_streams() if on_cpu else 1)
    lora = estimate(facts, run, [BatchShape(batch_size, seq_len, batch_size * seq_len // 2)])
    return {"inference_bytes": inference_bytes(facts, context, on_cpu), "lora_bytes": lora.total,
            "assumptions": {"context": context, "rank": rank, "batch_size": batch_size, "seq_len": seq_len,
                            "device": "cpu" if on_cpu else "gpu"}}


# ------------------------------------------------------------------------- quantized bases on the CPU backend

DEQUANTIZED_BLOCK_WEIGHTS = 7  # `call`: block weights dequantized at once in the compiled step (cpu_quantized.py)


def _quantized_base(facts: ModelFacts, run: RunShape) -> bool:
    return run.dequantize != "off" and bool(facts.bits or run.bits)


LOSS_PHASE_BLOCK_WEIGHTS = 3  # `call`: of those, still alive while the fused loss runs
# `call`: of those, alive at the backward phase's peak, where one block's backward arrays are (the tiny test shape's
# `call` step peaked 1.6 MB above its `load` twin's, less its float copies: its scores' and rows' gradients need no
# weight; an MLP's backward needs the one it multiplies by)
BACKWARD_PHASE_BLOCK_WEIGHTS = 1


def dequantized_path_bytes(facts: ModelFacts, run: RunShape, block_weights: int = DEQUANTIZED_BLOCK_WEIGHTS) -> int:
    """Float weights a quantized base holds on the CPU backend beyond its packed ones: with `load` a copy of
    every quantized weight for the whole run; with `call` a copy of the head's (cpu_quantized.use_path: each loss
    chunk would dequantize it again) and a few blocks' largest weights in flight."""
    if not _quantized_base(facts, run):
        return 0
    weights = facts.quantized_weights(run.bits)
    if run.dequantize == "load":
        return 4 * sum(weights.values())
    blocks = sorted((count for name, count in weights.items() if name.startswith("model.layers.")), reverse=True)
    head = weights.get("lm_head.weight", 0 if "lm_head.weight" in facts.tensors
                       else weights.get("model.embed_tokens.weight", 0))
    # the largest `block_weights` of them: a model with fewer block weights has no more in flight (the 1-block test
    # shape was +60% over with seven copies of its largest)
    return 4 * (sum(blocks[:block_weights]) + head)


def quantized_path(float_bytes: int, budget: int) -> str:
    """How a quantized base computes on the CPU backend: `load` (float copies of its weights, dequantized once)
    when they fit in a quarter of the budget, else `call` (each layer dequantized as it computes, then freed)."""
    return "load" if float_bytes <= DEQUANTIZED_COPY_SHARE * budget else "call"
