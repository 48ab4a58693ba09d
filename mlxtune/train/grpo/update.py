"""The GRPO gradient with one prompt pass per group: the pieces' gradients with respect to the prompt's keys and
values summed, then one backward through the prompt.

A group's completions are run a few at a time (`UPDATE_ROWS`, objective.py's `update_chunks`: one piece's
activations in memory, not the group's), all after the same prompt (train/grpo/prefix.py). Run piece by piece with
the prompt inside each piece's gradient, the prompt's forward and backward were repeated per piece (two or three per
group of 8). Here the prompt's pass runs once without gradient (`prompt_pass`: per layer its keys and values, and
its last position's state); each piece's gradient is taken with respect to the weights *and* that pass's outputs;
the outputs' gradients (cotangents) are summed over the pieces, and one backward through the prompt's pass — its
forward recomputed under the gradient, with the summed cotangents — adds the prompt's share. The backward is linear
in the cotangents, so the sum is the same gradient as the pieces' own prompt passes gave (float32 rounding: the
terms are added in another order; tests/train/test_grpo_chunks.py).

Per group: one prompt forward without gradient and one forward + backward, instead of one forward + backward per
piece. With LoRA dropout the prompt's recompute must draw the masks its first pass drew: both start from the same
seed, drawn from the step's random state (so a resumed step draws the same).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from mlxtune.train.grpo.prefix import prompt_pass
from mlxtune.train.preference.run import PreferenceStep, add_step


class GrpoStep(PreferenceStep):
    """PreferenceStep's compiled gradients and update, plus the three compiled passes of a group with one prompt
    pass: the prompt's outputs, a piece's gradient after them, the prompt's backward from the summed cotangents."""

    def __init__(self, model, optimizer, grad_clip: float, objective):
        super().__init__(model, optimizer, grad_clip, objective)
        layers, forward = len(model.layers), objective.forward(model)

        @partial(mx.compile, inputs=[model.state, mx.random.state], outputs=[mx.random.state])
        def prompt_outputs(prompt):
            return prompt_pass(forward, layers, prompt)

        def piece_loss(params, outputs, *arrays):
            model.update(params)  # as nn.value_and_grad does: the trainable parameters are an argument
            return objective.after_prompt_loss(model, *outputs, *arrays)

        piece_value_and_grad = mx.value_and_grad(piece_loss, argnums=(0, 1))

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def piece_gradients(outputs, *arrays):
            (loss_sum, count, stats), (grads, cotangents) = piece_value_and_grad(
                model.trainable_parameters(), outputs, *arrays)
            return loss_sum, count, stats, grads, cotangents

        def surrogate(model, prompt, cotangents):
            # Σ outputs · cotangents: its gradient is the prompt pass's vector-Jacobian product with the cotangents
            outputs = prompt_pass(forward, layers, prompt)
            return sum((o * mx.stop_gradient(c)).sum()
                       for (_, o), (_, c) in zip(tree_flatten(outputs), tree_flatten(cotangents)))

        prompt_value_and_grad = nn.value_and_grad(model, surrogate)

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def prompt_gradients(prompt, cotangents):
            return prompt_value_and_grad(model, prompt, cotangents)[1]

        self.prompt_outputs, self.piece_gradients, self.prompt_gradients = (
            prompt_outputs, piece_gradients, prompt_gradients)

    def accumulate_groups(self, groups) -> tuple:
        """Loss sum, count, statistics and summed gradients of one step over prompts' groups (objective.py's
        UpdateBatch, each with its gradient `pieces`), one piece evaluated at a time. A group of one piece, or of
        full prompt + completion rows, runs as PreferenceStep.accumulate runs its pieces."""
        total = None
        for group in groups:
            if len(group.pieces) == 1 or len(group.arrays) != 4:
                if group.pieces:
                    total = add_step(total, self.accumulate(group.pieces))
                continue
            prompt = group.arrays[0]
            seed = mx.random.randint(0, 2**31 - 1).item()  # the prompt's two passes draw the same dropout masks
            mx.random.seed(seed)
            outputs, group.prompt_pass = group.prompt_pass, None  # the rollout's prefill: for the first update only
            if outputs is None:  # (later updates run at other weights)
                outputs = self.prompt_outputs(prompt)
                mx.eval(outputs)
            cotangents = None
            for piece in group.pieces:
                arrays = self.objective.loss_arrays(self.model, piece)
                mx.eval(arrays[-2:])  # πold and the reference: evaluated apart (PreferenceStep.accumulate)
                *out, piece_cotangents = self.piece_gradients(outputs, *arrays[1:])
                total = add_step(total, tuple(out))
                cotangents = piece_cotangents if cotangents is None else tree_map(mx.add, cotangents,
                                                                                  piece_cotangents)
                mx.eval(*total, cotangents)  # one piece's activations at a time
            after = mx.random.randint(0, 2**31 - 1).item()
            mx.random.seed(seed)
            grads = self.prompt_gradients(prompt, cotangents)
            mx.random.seed(after)
            total = (*total[:3], tree_map(mx.add, total[3], grads))
            mx.eval(*total)
        return total if total is not None else self.nothing()
