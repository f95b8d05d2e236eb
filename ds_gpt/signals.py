"""Graceful stop on SIGTERM/SIGUSR1/SIGINT: checkpoint at the next step boundary, then exit.

A handler only sets a flag; the training loop shares the flag with every rank in the step's
all-reduce, so a signal delivered to any one rank (SLURM's warning signal reaches the batch
step's processes, not always every rank) makes all ranks stop at the same iteration.
A second SIGINT exits at once, without a checkpoint.

The handler is installed before any slow step of start-up (resolving and verifying the resume
point, the process group and the op build, the engine, loading or converting a checkpoint):
a signal then lets start-up finish, and every rank stops before the first step, with nothing
new to save (the previous checkpoint stands) and the run lock released. A start-up that fails
once a stop was asked for (a compiler or a peer killed with the job's other processes) ends the
same way: the requeued start redoes it, and reports any real fault then.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from ds_gpt.errors import EXIT_REQUEUE, UserError

GRACEFUL = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class GracefulStop:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.started = False  # the first step has begun: from now on a stop saves a checkpoint first
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
            when = "checkpointing at the next step boundary" if self.started else "stopping once start-up is done"
            print(f"{self.signal_name} received: {when}", file=sys.stderr, flush=True)

    def stand_down(self) -> None:
        """Once the stop is decided, ignore further SIGTERM/SIGUSR1: a late duplicate (srun and the
        batch script both forward them) would otherwise kill this rank during interpreter shutdown,
        after its handler is gone, and turn exit 75 into a signal death that is not requeued."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def before_first_step(self, all_reduce_sum: Callable[[list[float]], list[float]], announce: bool) -> bool:
        """Whether a signal reached any rank during start-up: then every rank stops here, saving nothing.

        Every rank calls it once, with its engine built and its checkpoint loaded; `all_reduce_sum`
        shares the flag (a rank the signal missed stops too). `announce`: this rank prints the line.
        """
        self.started = True
        stopping = all_reduce_sum([float(self.requested)])[0] > 0
        if stopping:
            self.stand_down()
            if announce:
                print(f"stopped before the first step ({self.signal_name or 'a signal to another rank'} during "
                      f"start-up): nothing new to save; exiting {EXIT_REQUEUE}", file=sys.stderr, flush=True)
        return stopping

    def interrupted_start_up(self, err: BaseException, prog: str) -> bool:
        """Whether `err` ended a start-up after a stop was asked for; if so, say so in one line.

        Bad input (a UserError) is reported as always: the requeued start would only meet it again.
        """
        if self.started or not self.requested or isinstance(err, UserError):
            return False
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        print(f"{prog}: {self.signal_name} during start-up, which then failed ({type(err).__name__}: {first}); "
              f"exiting {EXIT_REQUEUE} so that the job is requeued", file=sys.stderr, flush=True)
        return True
