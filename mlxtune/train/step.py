"""One optimizer step: loss → gradients (accumulated over micro-batches) → clip → AdamW update."""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from mlxtune.data.batching import Batch
from mlxtune.settings import TrainSettings
from mlxtune.train.loss import Loss


def learning_rate_schedule(settings: TrainSettings, total_steps: int):
    """Linear warmup from lr/warmup (the first step already learns), then cosine, linear or constant decay."""
    peak = settings.learning_rate
    warmup = default_warmup(settings, total_steps)
    decay_steps = max(1, total_steps - warmup)

    def schedule(step):
        step = step.astype(mx.float32)
        warm = mx.minimum((step + 1) / max(warmup, 1), 1.0)
        progress = mx.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if settings.schedule == "cosine":
            decay = 0.5 * (1.0 + mx.cos(math.pi * progress))
        elif settings.schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = mx.array(1.0)
        return peak * warm * decay

    return schedule


def default_warmup(settings: TrainSettings, total_steps: int) -> int:
    if settings.warmup_steps is not None:
        return settings.warmup_steps
    return max(0, int(0.05 * total_steps))


def build_optimizer(settings: TrainSettings, total_steps: int) -> optim.Optimizer:
    # bias_correction=True: PyTorch's AdamW. MLX defaults to none, which enlarges the first steps' updates
    # (3.2× at step 1), so a learning rate would not mean what it means elsewhere.
    return optim.AdamW(
        learning_rate=learning_rate_schedule(settings, total_steps),
        weight_decay=settings.weight_decay,
        bias_correction=True,
    )


class TrainStep:
    """Compiled gradient and update functions sharing the model/optimizer/RNG state."""

    def __init__(self, model, optimizer: optim.Optimizer, grad_clip: float, loss: Loss):
        self.model = model
        self.optimizer = optimizer
        self.loss = loss
        self.state = [model.state, optimizer.state, mx.random.state]
        loss_and_grad = nn.value_and_grad(model, loss.for_gradient)

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def gradients(*arrays):
            (loss_sum, count), grads = loss_and_grad(model, *arrays)
            return loss_sum, count, grads

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def update(grads, count):
            # Gradients of the summed loss / supervised tokens = the per-token mean over all micro-batches.
            grads = tree_map(lambda g: g / count, grads)
            grads, norm = optim.clip_grad_norm(grads, grad_clip if grad_clip > 0 else math.inf)
            optimizer.update(model, grads)
            return norm

        self.gradients = gradients
        self.update = update

    def accumulate(self, batches: list[Batch | None]):
        """Loss sum, token count and summed gradients over the micro-batches of one optimizer step. A None batch (a
        data-parallel rank with no share of a short batch) adds nothing; with none at all everything is zero."""
        total_loss, total_count, total_grads = None, None, None
        for batch in (b for b in batches if b is not None):
            loss_sum, count, grads = self.gradients(*self.loss.arrays(batch))
            if total_grads is None:
                total_loss, total_count, total_grads = loss_sum, count, grads
            else:
                total_loss = total_loss + loss_sum
                total_count = total_count + count
                total_grads = tree_map(mx.add, total_grads, grads)
            # One micro-batch at a time: evaluating them together would hold all their activations at once,
            # and accumulation would save no memory.
            mx.eval(total_loss, total_count, total_grads)
        if total_grads is None:
            total_loss, total_count = mx.array(0.0), mx.array(0.0)
            total_grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        mx.eval(total_loss, total_count, total_grads)
        return total_loss, total_count, total_grads
