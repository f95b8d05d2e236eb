"""--on_nan: what a training step does when a micro-batch's loss is NaN or inf.

stop (default): the step is not taken and the run exits 3; the last checkpoint is intact.
skip: the bad micro-batches add nothing to the gradient, the step runs at lr 0 (AdamW then
leaves every parameter exactly as it was; its moments advance with the good micro-batches'
gradient), and training goes on. A whole global batch bad twice running means the weights
themselves went bad: that stops the run even under skip.

The decision needs every rank's counts, which the step reads once, after the last backward.
Until then a bad micro-batch cannot be left out of the backward (that would need its loss on
the host first: one device sync per micro-batch), so under skip its gradient is zeroed on its
way into DeepSpeed's accumulation instead: a hook on each parameter, fed by a flag that stays
on the device. masked_fill, not a multiplication: 0 x NaN is NaN.
"""
from __future__ import annotations

import torch

POLICIES = ("stop", "skip")


class NonFiniteGuard:
    def __init__(self, policy: str, micro_batches_per_step: int, model: torch.nn.Module):
        self.policy = policy
        self.micro_batches_per_step = micro_batches_per_step  # all ranks
        self.all_bad_in_a_row = 0  # steps in a row where every micro-batch on every rank was non-finite
        self._bad: torch.Tensor | None = None
        if policy == "skip":  # under stop a bad step is never taken: its gradient may stay as it is
            for p in model.parameters():
                if p.requires_grad:
                    p.register_hook(self._drop_if_bad)

    def _drop_if_bad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad if self._bad is None else grad.masked_fill(self._bad, 0.0)

    def mark(self, loss: torch.Tensor) -> None:
        """`loss` (on the device) is about to be back-propagated."""
        if self.policy == "skip":
            self._bad = ~torch.isfinite(loss)

    def decide(self, nonfinite: int) -> str:
        """"ok", "skip" or "stop" for a step whose micro-batches (all ranks) had `nonfinite` bad losses."""
        self.all_bad_in_a_row = self.all_bad_in_a_row + 1 if nonfinite == self.micro_batches_per_step else 0
        if not nonfinite:
            return "ok"
        return "stop" if self.policy == "stop" or self.all_bad_in_a_row > 1 else "skip"
