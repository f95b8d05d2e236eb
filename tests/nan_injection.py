"""A NaN loss on chosen training forwards, for a real run with one fault.

`poison({8, 9})` in a rank before the trainer starts (helpers.forked_train's `prelude`): the
8th and 9th forwards in training mode (1-based, counted per process) return a NaN loss, as a
bad batch or an overflow would; everything else is the unmodified trainer, entered through
`guarded_main` and `run_cli` exactly as `python -m ds_gpt.train` enters it.
"""
from __future__ import annotations

from ds_gpt import model


def poison(forwards: set[int]) -> None:
    """From now on in this process, the training forwards numbered in `forwards` return a NaN loss."""
    original = model.GPT.forward
    seen = 0

    def forward(self, idx, targets=None):
        nonlocal seen
        logits, loss = original(self, idx, targets)
        if self.training and targets is not None:
            seen += 1
            if seen in forwards:
                loss = loss * float("nan")
        return logits, loss

    model.GPT.forward = forward
