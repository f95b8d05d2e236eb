"""Run the trainer with a NaN loss on chosen training forwards: a real run, one fault.

    python tests/nan_injection.py 8[,9...] -- <ds_gpt.train options>

The N-th forward in training mode (1-based, counted per process) returns a NaN loss, as a
bad batch or an overflow would; everything else is the unmodified trainer, entered through
`guarded_main` and `run_cli` exactly as `python -m ds_gpt.train` enters it.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not tests/, comes first

from ds_gpt import model, train  # noqa: E402
from ds_gpt.errors import run_cli  # noqa: E402


def poison(forwards: set[int]) -> None:
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


if __name__ == "__main__":
    spec, sep, *argv = sys.argv[1:]
    assert sep == "--", __doc__
    poison({int(n) for n in spec.split(",")})
    sys.argv = [sys.argv[0], *argv]
    run_cli(lambda: train.guarded_main(argv), prog="ds_gpt.train", skip_teardown=True)
