"""Graceful stop on SIGTERM/SIGUSR1/SIGINT: checkpoint at the next step boundary, then exit.

A handler only sets a flag; the training loop shares the flag with every rank in the step's
all-reduce, so a signal delivered to any one rank (SLURM's warning signal reaches the batch
step's processes, not always every rank) makes all ranks stop at the same iteration.
A second SIGINT exits at once, without a checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys

GRACEFUL = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class GracefulStop:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._sigints = 0

    def install(self) -> "GracefulStop":
        for sig in GRACEFUL:
            signal.signal(sig, self._handle)
        # A launcher shielded by ds_gpt.signal_shield passes SIGTERM on blocked to the ranks it forks.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, GRACEFUL)
        return self

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints >= 2:
                print("second SIGINT: exiting now, without a checkpoint", file=sys.stderr, flush=True)
                os._exit(130)
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            print(f"{self.signal_name} received: checkpointing at the next step boundary", file=sys.stderr, flush=True)

    def stand_down(self) -> None:
        """Once the stop is decided, ignore further SIGTERM/SIGUSR1: a late duplicate (srun and the
        batch script both forward them) would otherwise kill this rank during interpreter shutdown,
        after its handler is gone, and turn exit 75 into a signal death that is not requeued."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
