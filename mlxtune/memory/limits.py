"""The limits the training code works within, defined once: the loss's chunks and streams, and the share of the
budget a quantized base's float copies may take. The loss (`train/loss.py`) and `cpu_quantized.py` compute with
them, the estimate (`memory/estimate.py`) counts with them; nothing here loads MLX, so planning stays cheap.
"""

from __future__ import annotations

import os

# Chunks bound the peak memory of the head + cross-entropy, whose rows are vocabulary-sized, while staying large
# enough that each chunk is one big matmul rather than many small ones (a 32k vocabulary: 1024 rows = 128 MiB).
CHUNK_ROWS = 1024  # supervised positions per head+cross-entropy chunk, at most
# Keeping the softmax saves one exp pass in the backward (MLX's CPU exp is scalar and single-threaded); 512 MiB
# is the most memory we let that cost (about 900 rows of a 150k vocabulary); beyond it the softmax is recomputed.
KEPT_SOFTMAX_BYTES = 512 * 2**20  # float32 softmax kept for the backward pass, at most (else recomputed)
CHUNK_LOGITS_BYTES = 64 * 2**20  # and at most this much float32 logits per chunk (a 150k vocabulary: ~110 rows)
# Rows per chunk of the fused head gradient: it keeps nothing per chunk, so small chunks bound the vocabulary-sized
# temporaries (two chunks in flight) at little cost in speed (measured on the bench's SmolLM shape: 64 rows peak
# 0.71 GB at ≈10% more step time, 341 rows 0.92 GB).
FUSED_CHUNK_ROWS = 64
MAX_LOSS_STREAMS = 8  # loss streams on the CPU backend: one per core, at most this many

DEQUANTIZED_COPY_SHARE = 0.25  # of the budget that float copies of a quantized base may take (cpu_quantized.py)


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk of the plain (not fused) loss: the logits, their softmax and its gradient live at once, per
    stream."""
    return max(32, min(CHUNK_ROWS, CHUNK_LOGITS_BYTES // (4 * max(vocab_size, 1))))


def cpu_loss_streams() -> int:
    """Loss streams on the CPU backend (MLX's elementwise kernels are single-threaded: one stream per core)."""
    return max(1, min(os.cpu_count() or 1, MAX_LOSS_STREAMS))
