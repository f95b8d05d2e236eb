"""Run a command with SIGTERM blocked, so that it and the processes it starts outlive a job-wide SIGTERM.

    python -m ds_gpt.signal_shield deepspeed --hostfile HOSTFILE ds_gpt/train.py ...

`scancel` (and `scancel --full --signal=TERM`) sends SIGTERM to every process of the job, the
batch step's included. Under the deepspeed launcher (slurm/ds_train.sh's mode A) those are the
launcher and its pdsh/ssh clients. The launcher's handler would pkill every rank through pdsh (and SIGKILL them 30 s
later), and the dying ssh clients cut the ranks' output. No rank would live to checkpoint. The
batch script traps SIGTERM itself and asks the ranks to checkpoint and exit 75, so all the
launcher and its transport need to do is stay up.

Ignoring the signal would not do: the launcher installs its own handler over SIG_IGN. A blocked
signal stays blocked across fork and exec, and stays pending until the process exits. The ranks
unblock it for themselves (ds_gpt.signals). Only SIGTERM is blocked: Ctrl-C and SIGKILL (SLURM's
last word after its grace time) still work. srun cannot be shielded this way: it takes its
signals with sigwait(), which a blocked signal still reaches.
"""
from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: python -m ds_gpt.signal_shield COMMAND [ARG ...]", file=sys.stderr)
        return 2
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        os.execvp(argv[0], argv)
    except OSError as err:
        print(f"error: cannot run {argv[0]}: {err.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
