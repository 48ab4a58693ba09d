"""Batches as a pure function of (seed, step): the data order never needs saving to resume exactly.

Three ways to fill a step, all deterministic per epoch:
- a fixed number of examples per batch (`batch_size`), one per row, padded;
- a token budget (`batch_tokens`): length-bucketed batches with as many rows as fit the budget;
- packing: several examples per row, each in its own attention segment (block-diagonal causal mask), rows of up to
  `row_length` tokens, `batch_tokens` tokens per batch.
No example is ever dropped from an epoch: the last, smaller batch is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mlxtune.data.template import TokenizedExample

PAD_MULTIPLE = 32  # few distinct shapes keep the compiled step from recompiling every batch
POSITIONS_MULTIPLE = 128  # the supervised-position list is padded too (with zero weights)
BUCKET_WINDOW = 64  # token-budget mode sorts by length within windows of this many batches' worth


@dataclass
class Batch:
    inputs: np.ndarray  # [rows, length] int32
    targets: np.ndarray  # [rows, length] int32
    mask: np.ndarray  # [rows, length] float32, 1 where the target is supervised
    supervised_tokens: int
    tokens: int  # real (non-padding) input tokens
    positions: np.ndarray  # flat indices (row * length + column) of supervised targets, padded
    position_targets: np.ndarray  # the target token at each of those positions
    position_weights: np.ndarray  # 1 for real positions, 0 for padding
    segments: np.ndarray | None = None  # [rows, length] int32 example number within the row (packing), 0 = padding


@dataclass(frozen=True)
class BatchPlan:
    """How examples become batches; `plan_epoch` turns it into lists of rows of example indices."""

    batch_size: int = 4
    batch_tokens: int | None = None
    pack: bool = False
    row_length: int = 2048


def batch_plan(lengths: list[int], *, batch_size: int, batch_tokens: int | None, pack: bool | None,
               max_seq_length: int, packing_supported: bool) -> tuple[BatchPlan, list[str]]:
    """A token budget filled with examples of similar length (`pack` None, the default), packing (`pack` True), or
    a fixed count of `batch_size` examples (`pack` False without `batch_tokens`). Returns the plan and notes.

    Length buckets waste almost no padding and keep attention on its fast causal path; packing removes the last
    padding but needs an explicit block-diagonal mask, which measured slower on every benchmark case here
    (docs/BENCHMARKS.md).
    """
    notes = []
    packed = bool(pack)
    if packed and not packing_supported:
        notes.append("this architecture's attention can't take the packing mask: padding instead of packing")
        packed = False
    if pack is False and not batch_tokens:
        return BatchPlan(batch_size=batch_size), notes
    # Default budget: batch_size rows of the mean length, rounded up to 64 tokens so nearby datasets share shapes.
    budget = batch_tokens or batch_size * 64 * math.ceil(sum(lengths) / len(lengths) / 64)
    longest = max(lengths)
    row_length = max(min(max_seq_length, budget), longest) if packed else longest
    return BatchPlan(batch_size, budget, packed, row_length), notes


def describe_plan(plan: BatchPlan) -> str:
    if plan.pack:
        return f"packed: {plan.batch_tokens} tokens per batch, rows of up to {plan.row_length}"
    if plan.batch_tokens:
        return f"length-bucketed: up to {plan.batch_tokens} tokens per batch (with padding)"
    return f"{plan.batch_size} examples per batch (padded)"


def padded_positions(supervised: int, cells: int) -> int:
    """Length of the supervised-position list: rounded up to POSITIONS_MULTIPLE (few shapes, few recompiles), but
    never past the batch's `rows × length` cells, itself one of few shapes. Uncapped, a 2×96 batch scored 256 loss
    rows for its ≤192 positions: a third more output-head work (49k vocabulary: the head is a quarter of SmolLM2's
    step), for rows of zero weight."""
    return min(POSITIONS_MULTIPLE * max(1, math.ceil(supervised / POSITIONS_MULTIPLE)), max(cells, 1))


def _rows_to_batch(rows: list[list[TokenizedExample]], packed: bool) -> Batch:
    used = [sum(len(e) - 1 for e in row) for row in rows]
    length = PAD_MULTIPLE * math.ceil(max(used) / PAD_MULTIPLE)
    inputs = np.zeros((len(rows), length), np.int32)
    targets = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.float32)
    segments = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        start = 0
        for number, example in enumerate(row, start=1):
            n = len(example) - 1
            inputs[r, start : start + n] = example.ids[:-1]
            targets[r, start : start + n] = example.ids[1:]
            mask[r, start : start + n] = example.supervised[1:]
            segments[r, start : start + n] = number
            start += n
    flat = np.flatnonzero(mask.reshape(-1)).astype(np.int32)
    padded = padded_positions(len(flat), inputs.size)
    positions = np.zeros(padded, np.int32)
    positions[: len(flat)] = flat
    weights = np.zeros(padded, np.float32)
    weights[: len(flat)] = 1.0
    return Batch(inputs, targets, mask, len(flat), sum(used), positions, targets.reshape(-1)[positions], weights,
                 segments if packed else None)


def make_batch(examples: list[TokenizedExample]) -> Batch:
    """One example per row, padded."""
    return _rows_to_batch([[e] for e in examples], packed=False)


def make_packed_batch(rows: list[list[TokenizedExample]]) -> Batch:
    return _rows_to_batch(rows, packed=True)


def _fixed_batches(order: np.ndarray, batch_size: int) -> list[list[list[int]]]:
    return [[[int(i)] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def _token_budget_batches(order, lengths, budget: int, rng) -> list[list[list[int]]]:
    """Length buckets: within windows of the shuffled order, sort by length and cut batches at the budget."""
    window = max(1, BUCKET_WINDOW * max(1, budget // max(int(np.mean(lengths)), 1)))
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window].tolist(), key=lambda i: lengths[i])
        current, longest = [], 0
        for index in chunk:
            padded = PAD_MULTIPLE * math.ceil((lengths[index] - 1) / PAD_MULTIPLE)
            if current and max(longest, padded) * (len(current) + 1) > budget:
                batches.append(current)
                current, longest = [], 0
            current.append([index])
            longest = max(longest, padded)
        if current:
            batches.append(current)
    return [batches[i] for i in rng.permutation(len(batches))]


def _packed_batches(order, lengths, budget: int, row_length: int) -> list[list[list[int]]]:
    """First fit into the open batch's rows; a batch has budget // row_length rows of up to row_length tokens."""
    rows_per_batch = max(1, budget // row_length)
    batches, rows, room = [], [[]], [row_length]
    for index in order.tolist():
        size = lengths[index] - 1
        target = next((r for r, free in enumerate(room) if free >= size), None)
        if target is None and len(rows) < rows_per_batch:
            rows.append([])
            room.append(row_length)
            target = len(rows) - 1
        if target is None:
            batches.append(rows)
            rows, room, target = [[]], [row_length], 0
        rows[target].append(index)
        room[target] -= size
    if rows[0]:
        batches.append(rows)
    return batches


@lru_cache(maxsize=8)
def _plan_epoch_cached(lengths: tuple[int, ...], plan: BatchPlan, seed: int, epoch: int):
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if plan.pack:
        return _packed_batches(order, lengths, plan.batch_tokens, plan.row_length)
    if plan.batch_tokens:
        return _token_budget_batches(order, lengths, plan.batch_tokens, rng)
    return _fixed_batches(order, plan.batch_size)


def plan_epoch(examples: list[TokenizedExample], plan: BatchPlan, seed: int, epoch: int) -> list[list[list[int]]]:
    """Batches → rows → example indices for one epoch (a fixed-seed shuffle of the examples)."""
    return _plan_epoch_cached(tuple(len(e) for e in examples), plan, seed, epoch)


def batches_per_epoch(examples: list[TokenizedExample], plan: BatchPlan, seed: int = 0) -> int:
    return len(plan_epoch(examples, plan, seed, 0))


def training_batch(examples: list[TokenizedExample], plan: BatchPlan, seed: int, index: int, rank: int = 0,
                   ranks: int = 1) -> Batch | None:
    """The `index`-th training batch of the run, counting across epochs. With `ranks` > 1: this rank's share of it,
    every `ranks`-th row from row `rank` on (None when the batch has fewer rows than ranks)."""
    epoch = 0
    while True:
        batches = plan_epoch(examples, plan, seed, epoch)
        if index < len(batches):
            rows = [[examples[i] for i in row] for row in batches[index][rank::ranks]]
            if not rows:
                return None
            return make_packed_batch(rows) if plan.pack else _rows_to_batch(rows, packed=False)
        index -= len(batches)
        epoch += 1


def evaluation_subset(examples: list, batch_size: int, max_batches: int = -1) -> list:
    """The examples an evaluation scores, sorted by length: all of them, or a fixed-seed subset when limited (the
    same subset at every evaluation, in training, fuse and eval alike)."""
    chosen = examples
    if max_batches != -1 and max_batches * batch_size < len(examples):
        picked = np.random.default_rng(0).permutation(len(examples))[: max_batches * batch_size]
        chosen = [examples[i] for i in sorted(picked)]
    return sorted(chosen, key=len)


def evaluation_batches(examples: list[TokenizedExample], batch_size: int, max_batches: int = -1):
    """Fixed batches of the evaluation subset, similar lengths together (less padding)."""
    ordered = evaluation_subset(examples, batch_size, max_batches)
    for start in range(0, len(ordered), batch_size):
        yield make_batch(ordered[start : start + batch_size])
