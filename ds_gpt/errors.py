"""User-facing errors and the process exit codes that scripts and SLURM rely on.

Errors are raised where the knowledge is (config, data, checkpoint ...) as `UserError`,
and reported once, at the edge, by `run_cli`: one line on stderr, no traceback.
"""
from __future__ import annotations

import argparse
import errno
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


# What to do about an OSError on a path the user gave; the path and the OS's words come with it.
OS_ERROR_HINTS = {
    errno.EACCES: "check its permissions, or pick another path",
    errno.EPERM: "check its permissions, or pick another path",
    errno.EROFS: "that filesystem is mounted read-only: pick a path on a writable one",
    errno.ENOSPC: "free some space there (`df -h` shows how much is left), or pick another filesystem",
    errno.EDQUOT: "your disk quota is used up there: free some space, or pick another filesystem",
    errno.EISDIR: "that is a directory: give the path of a file",
    errno.ENOTDIR: "a part of that path is a file, not a directory: fix the path",
    errno.ENOENT: "check the path",
    errno.EEXIST: "a file is in the way where a directory is needed: fix the path",
    errno.ENAMETOOLONG: "shorten the path",
    errno.ELOOP: "a symbolic link on that path loops: fix the link",
}
# Errors of the filesystem or the user's rights, never of our code, even where no path is attached
# (a write() that hits a full disk names no file).
ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO})


FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def maybe_full(err: BaseException) -> bool:
    """A full disk or quota, or an error that does not say (torch's zip writer's RuntimeError)."""
    code = getattr(err, "errno", None)
    return code is None or code in FULL_ERRNOS


def write_reason(err: BaseException) -> str:
    """Why a write failed, for an error line: the OS's words, or a guess where the error has none."""
    return err.strerror if isinstance(err, OSError) and err.strerror else "the write failed (a full disk or quota?)"


def write_hint(err: BaseException, when_full: str, where: str = "--out_dir") -> str:
    """The fix for a failed write: `when_full` if it may be a full disk or quota (maybe_full), else
    what the errno calls for. A directory where our file belongs is no matter of free space."""
    code = getattr(err, "errno", None)
    if maybe_full(err):
        return when_full
    if code == errno.EISDIR:
        path = getattr(err, "filename", None) or "the file"
        return f"{path} is a directory where a file belongs: move it away, or pick another {where}"
    return OS_ERROR_HINTS.get(code, f"check {where}: its filesystem refused the write")


def cause_chain(err: BaseException) -> list[BaseException]:
    """err, then what raised it, and so on: libraries (datasets, the Hub client) wrap the OSError
    or UnicodeDecodeError that names the real problem a few levels down."""
    chain = [err]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    return chain


def os_error(err: OSError, doing: str | None = None) -> UserError:
    """One line for an OSError: what failed (`doing`, else the path), the OS's reason, and the fix."""
    where = None if err.filename is None else str(err.filename if err.filename2 is None
                                                  else f"{err.filename} -> {err.filename2}")
    if doing is None:
        subject = where or "a file operation"
    else:  # and the path, if the OS named one that `doing` does not already say
        subject = doing if where is None or where in doing else f"{doing}: {where}"
    return UserError(f"{subject}: {err.strerror or err}", hint=OS_ERROR_HINTS.get(err.errno))


def not_utf8(path: str | os.PathLike, offset: int, what: str = "") -> UserError:
    """The error for a text file that is not UTF-8: its name and the first bad byte's offset."""
    name = f"{what} {path}" if what else str(path)
    return UserError(f"{name} is not UTF-8 text (invalid byte at offset {offset})",
                     hint=f"convert it, e.g. iconv -f latin1 -t utf-8 {path}")


FORK_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM})  # what a fork the system refuses raises


def fork_failed(err: OSError, workers: str) -> UserError:
    """A pool of worker processes (`workers`, e.g. "2 worker processes") the system would not start."""
    return UserError(f"could not start {workers}: {err.strerror or err}",
                     hint="lower --num_proc, or raise the process limit (ulimit -u)")


class HelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default, unless its help says it already or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The defaults shown, and the description and epilog kept as written (examples, tables)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are reported like every other bad input (one line, exit 2) and
    whose --help shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        command = self.prog if self.prog.startswith("python") else f"python -m {self.prog.split()[0]}"
        raise UserError(message, hint=f"{command} --help lists the options")


def run_cli(main: Callable[[], int | None], prog: str = "ds_gpt", skip_teardown: bool = False) -> NoReturn:
    """Run a command's `main`, turning a UserError into one line on stderr and its exit code.

    An OSError on a path (read-only, full, missing, a file where a directory belongs ...) and a
    file that is not UTF-8 are bad input too: one line naming the path, the reason and the fix.

    `skip_teardown` ends the process with os._exit once `main` has returned or reported its
    error, for commands that close what they write themselves (the trainer). Interpreter
    teardown then runs no C++ destructors of threads that other libraries left running, which
    now and then abort the process ("terminate called without an active exception") and turn
    a finished run's 0 or a checkpointed stop's 75 into a signal death.
    """
    try:
        try:
            code = main()
        except OSError as err:  # a path the user gave: unreadable, read-only, full, of the wrong kind
            if err.filename is None and err.errno not in ENVIRONMENT_ERRNOS:
                raise  # not about the user's files: a bug, with its traceback
            raise os_error(err) from None
        except UnicodeDecodeError as err:  # a text file that is not UTF-8, read where no path was known
            raise UserError(f"an input file is not UTF-8 text (invalid byte at offset {err.start})",
                            hint="convert it, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8") from None
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
