"""Batches as a pure function of (seed, step): the data order never needs saving to resume exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mlxtune.data.template import TokenizedExample

PAD_MULTIPLE = 32  # few distinct shapes keep the compiled step from recompiling every batch
POSITIONS_MULTIPLE = 128  # the supervised-position list is padded too (with zero weights)


@dataclass
class Batch:
    inputs: np.ndarray  # [batch, length] int32
    targets: np.ndarray  # [batch, length] int32
    mask: np.ndarray  # [batch, length] float32, 1 where the target is supervised
    supervised_tokens: int
    tokens: int  # real (non-padding) input tokens
    positions: np.ndarray  # flat indices (row * length + column) of supervised targets, padded
    position_targets: np.ndarray  # the target token at each of those positions
    position_weights: np.ndarray  # 1 for real positions, 0 for padding


def make_batch(examples: list[TokenizedExample]) -> Batch:
    longest = max(len(e) for e in examples) - 1
    length = PAD_MULTIPLE * math.ceil(longest / PAD_MULTIPLE)
    inputs = np.zeros((len(examples), length), np.int32)
    targets = np.zeros((len(examples), length), np.int32)
    mask = np.zeros((len(examples), length), np.float32)
    for row, example in enumerate(examples):
        n = len(example) - 1
        inputs[row, :n] = example.ids[:-1]
        targets[row, :n] = example.ids[1:]
        mask[row, :n] = example.supervised[1:]
    flat = np.flatnonzero(mask.reshape(-1)).astype(np.int32)
    padded = POSITIONS_MULTIPLE * max(1, math.ceil(len(flat) / POSITIONS_MULTIPLE))
    positions = np.zeros(padded, np.int32)
    positions[: len(flat)] = flat
    weights = np.zeros(padded, np.float32)
    weights[: len(flat)] = 1.0
    position_targets = targets.reshape(-1)[positions]
    return Batch(inputs, targets, mask, len(flat), sum(len(e) - 1 for e in examples), positions,
                 position_targets, weights)


def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    # The last, smaller batch is kept: no record is silently left out of an epoch.
    return math.ceil(n_examples / batch_size)


def training_batch(examples: list[TokenizedExample], batch_size: int, seed: int, index: int) -> Batch:
    """The `index`-th training batch: epochs are fixed-seed permutations of the examples."""
    per_epoch = batches_per_epoch(len(examples), batch_size)
    epoch, position = divmod(index, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    chosen = order[position * batch_size : (position + 1) * batch_size]
    return make_batch([examples[i] for i in chosen])


def evaluation_batches(examples: list[TokenizedExample], batch_size: int, max_batches: int = -1):
    """Fixed batches: a fixed-seed subset when limited, sorted by length (similar lengths together, less padding)."""
    chosen = examples
    if max_batches != -1 and max_batches * batch_size < len(examples):
        picked = np.random.default_rng(0).permutation(len(examples))[: max_batches * batch_size]
        chosen = [examples[i] for i in sorted(picked)]
    ordered = sorted(chosen, key=len)
    for b in range(batches_per_epoch(len(ordered), batch_size)):
        yield make_batch(ordered[b * batch_size : (b + 1) * batch_size])
