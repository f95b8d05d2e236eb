"""User-facing errors and the process exit codes that scripts and SLURM rely on.

Errors are raised where the knowledge is (config, data, checkpoint ...) as `UserError`,
and reported once, at the edge, by `run_cli`: one line on stderr, no traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

# Exit codes (documented in the README; slurm/ds_train.sh reads EXIT_REQUEUE).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: Python prints the traceback
EXIT_USER_ERROR = 2  # bad input: one line naming the problem and the fix
EXIT_NONFINITE = 3  # --on_nan stop: the loss went NaN/inf; the last good checkpoint is intact
EXIT_PEER_FAILED = 4  # another rank died or a collective timed out
EXIT_REQUEUE = 75  # checkpointed on SIGTERM/SIGUSR1: requeue me (sysexits EX_TEMPFAIL)


class UserError(Exception):
    """A problem with the user's input. `hint` names the command or flag that fixes it."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (HINT: {self.hint})" if self.hint else text


def run_cli(main: Callable[[], int | None], prog: str = "ds_gpt", skip_teardown: bool = False) -> NoReturn:
    """Run a command's `main`, turning a UserError into one line on stderr and its exit code.

    `skip_teardown` ends the process with os._exit once `main` has returned or reported its
    error, for commands that close what they write themselves (the trainer). Interpreter
    teardown then runs no C++ destructors of threads that other libraries left running, which
    now and then abort the process ("terminate called without an active exception") and turn
    a finished run's 0 or a checkpointed stop's 75 into a signal death.
    """
    try:
        code = main()
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        code = err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        code = 130
    except SystemExit as stop:  # argparse's usage errors, the trainer's non-finite stop
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr, flush=True)
        code = stop.code if isinstance(stop.code, int) else (EXIT_OK if stop.code is None else EXIT_INTERNAL)
    code = code or EXIT_OK
    if skip_teardown:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
