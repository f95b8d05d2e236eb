"""Files published together: a reader sees a directory's old set or its new set, never a mix.

prepare replaces train.bin, val.bin and meta.json this way (a write-ahead journal on plain
renames):

  1. stage: write each new file under a hidden name in the same directory and fsync it;
     check its size and sha256 against what the writer meant to write;
  2. commit: write the journal (JOURNAL: staged name, final name, size and sha256 of each
     file) by temp file, fsync, rename and fsync of the directory. The new set is now the set;
  3. rename each staged file over its final name; fsync the directory;
  4. remove the journal.

Killed before 2, the directory holds the old set (plus staged files the next writer removes);
killed after it, the journal says what is left to do, and whoever uses the directory next (the
next prepare, the trainer's data check) finishes steps 3 and 4 first: it rolls forward. Every
step is idempotent, so two processes rolling forward at once end in the same state.

Why not a swap: renameat2(RENAME_EXCHANGE) is Linux-local (NFS and Lustre refuse it), and
swapping a directory or a symlink changes the path users configured and what else they keep
there. A rename within one directory is atomic on local filesystems, on NFS (one server
operation) and on Lustre (one metadata operation), and needs nothing else.

Locks: a writer holds an flock on LOCK_NAME for its whole run. Where the filesystem has no
locks (Lustre mounted without -o flock) the protocol is still crash-safe, but two writers into
one directory at once are not kept apart.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

from ds_gpt import atomic
from ds_gpt.errors import UserError

JOURNAL = ".publishing.json"
LOCK_NAME = ".prepare.lock"
_NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EBADF)


def file_digest(path: Path) -> dict:
    """{"bytes", "sha256"} of a file: what the journal and meta.json record of it."""
    with open(path, "rb") as f:
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def staged_path(root: Path, name: str) -> Path:
    """Where this process stages `name`: hidden, in the same directory (a rename, not a copy)."""
    return root / f".{name}.partial-{os.getpid()}"


def pending(root: Path) -> bool:
    """Is a publish committed but not finished (a writer at work, or one that was killed)?"""
    return (root / JOURNAL).exists()


@contextlib.contextmanager
def locked(root: Path) -> Iterator[bool]:
    """Hold the directory's writer lock; yields False where the filesystem offers no locks.

    The lock is a regular file: NFS emulates flock with byte-range locks, which an O_RDONLY
    directory descriptor cannot take.
    """
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = True
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
            held = False
        yield held
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def writing(root: Path) -> Iterator[None]:
    """One writer at a time in `root` (created if missing): holds its lock, finishes a publish a
    killed writer committed, removes what killed writers staged. A `root` this call created is
    removed again if the writer fails before anything but the lock is in it."""
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        with locked(root) as held:
            if not held:
                print(f"{root}: the filesystem offers no file locks: do not run two writers into it at once",
                      file=sys.stderr)
            roll_forward(root, discard_broken=True)
            if held:  # without the lock another writer's staged files may be in use
                remove_stale(root)
            yield
    except BaseException:
        if created and {p.name for p in root.iterdir()} <= {LOCK_NAME}:
            shutil.rmtree(root, ignore_errors=True)
        raise


def meta_json(meta: dict) -> bytes:
    """A published set's meta.json, as every writer of one writes it: indented, newline-terminated."""
    return (json.dumps(meta, indent=2) + "\n").encode()


def write_synced(path: Path, data: bytes) -> dict:
    """Write and fsync a file to stage it; returns its {"bytes", "sha256"} for the journal."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def remove_stale(root: Path) -> None:
    """Staged files and journal temp files of killed writers. Call with the lock held, after
    roll_forward: nobody else is writing, and no journal refers to them any more."""
    for stale in [*root.glob(".*.partial-*"), *root.glob(f".{JOURNAL}.tmp*")]:
        stale.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# publishing

def _move(staged: Path, final: Path) -> None:
    with contextlib.suppress(FileNotFoundError):  # moved already: by us before a kill, or by another process
        os.replace(staged, final)


def _finish(root: Path) -> None:
    atomic.fsync_dir(root)  # the renames are durable before the journal that redoes them goes
    (root / JOURNAL).unlink(missing_ok=True)
    atomic.fsync_dir(root)


def publish_steps(root: Path, staged: dict[str, Path], expected: dict[str, dict]) -> list[Callable[[], None]]:
    """Steps 2-4 above, one callable each: the commit, one rename per file (in `staged`'s order),
    and the journal's removal. `publish` runs them all; a test can stop after any of them."""
    journal = {"files": {name: {"staged": path.name, **expected[name]} for name, path in staged.items()}}

    def commit() -> None:
        atomic.write_text(root / JOURNAL, json.dumps(journal, indent=1) + "\n")

    def rename(name: str) -> Callable[[], None]:
        return lambda: _move(staged[name], root / name)

    return [commit, *(rename(name) for name in staged), lambda: _finish(root)]


def publish(root: Path, staged: dict[str, Path], expected: dict[str, dict]) -> None:
    """Make the fsynced files `staged` (final name -> staged path) the directory's set, as a unit.

    `expected` holds each file's {"bytes", "sha256"} as its writer computed them; the staged
    files are read back and checked first, so a write the disk got wrong is never published.
    """
    for name, path in staged.items():
        if (root / name).is_dir():  # found now, not by a rename after the commit
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(root / name))
        if (found := file_digest(path)) != {k: expected[name][k] for k in ("bytes", "sha256")}:
            raise UserError(f"{path} reads back as {found['bytes']} bytes, sha256 {found['sha256'][:12]}..., not "
                            f"what was written ({expected[name]['bytes']} bytes, {expected[name]['sha256'][:12]}...)",
                            hint="the disk or filesystem lost data: check it, then run prepare again")
    for step in publish_steps(root, staged, expected):
        step()


# -----------------------------------------------------------------------------
# rolling forward

def _read_journal(root: Path) -> dict | None:
    try:
        journal = json.loads((root / JOURNAL).read_text())
        return {name: (root / entry["staged"], int(entry["bytes"])) for name, entry in journal["files"].items()}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{root / JOURNAL} is damaged ({type(err).__name__})",
                        hint="delete it and run the prepare command for this directory again") from None


def roll_forward(root: Path, discard_broken: bool = False) -> bool:
    """Finish a committed publish (steps 3 and 4); True if there was one.

    A journal whose files are gone (removed by hand) leaves an unusable set: a UserError, or,
    with `discard_broken` (prepare, about to write a new set anyway), the journal is dropped.
    """
    files = _read_journal(root)
    if files is None:
        return False
    for name, (staged, size) in files.items():
        final = root / name
        _move(staged, final)
        if not final.is_file() or final.stat().st_size != size:
            if not discard_broken:
                raise UserError(f"{root}: an interrupted publish cannot be finished: {name} is missing or "
                                f"not the {size} bytes its journal {JOURNAL} records",
                                hint="run the prepare command for this directory again")
    _finish(root)
    return True


def recover(root: Path, hint: str) -> None:
    """For readers: finish an interrupted publish in `root` before using its files.

    `hint` names the command that redoes the directory, for when it cannot be written here.
    """
    if not pending(root):
        return
    try:
        with locked(root):
            roll_forward(root)
    except OSError as err:
        raise UserError(f"{root} holds an unfinished publish ({JOURNAL}) that cannot be finished here: "
                        f"{err.strerror}", hint=f"run prepare where the directory is writable: {hint}") from None
