"""Small files that readers see whole or not at all: pointers, markers, configs, hostfiles.

No torch here: the hostfile tool uses it on login nodes.
"""
from __future__ import annotations

import errno
import os
import traceback
from pathlib import Path
from typing import Callable

from ds_gpt.errors import not_utf8


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable: without it a crash can forget the new name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some filesystems (network and FUSE ones among them) cannot fsync a directory; their
        # renames are already as durable as they get.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Replace `path` with the file `write(tmp)` writes: temp file in the same directory, fsync,
    rename, fsync the directory.

    On failure (a full disk, a directory at `path` ...) the temp file is removed, the old file is
    untouched, and an OSError names `path`, not the temp file nobody asked for.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text`, whole or not at all (see write_with)."""
    write_with(path, lambda tmp: tmp.write_text(text))


def read_text(path: str | os.PathLike, what: str = "") -> str:
    """A UTF-8 text file the user named, with universal newlines as open() gives them.

    A file that is not UTF-8 is a UserError naming it and the offset of its first bad byte
    (`what` says which flag gave it); an OSError keeps the path for the command's error line.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(path, err.start, what) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def write_failed(err: BaseException) -> bool:
    """Did `err` come from writing a file (a full disk, a quota, an I/O error), not from a collective?

    Plain writes raise OSError; torch.save's zip writer, which DeepSpeed uses for every shard,
    turns ENOSPC into a RuntimeError ("unexpected pos ..."), recognised by where it was raised.
    """
    if isinstance(err, OSError):
        return True
    return isinstance(err, RuntimeError) and any(
        Path(frame.f_code.co_filename).parts[-2:] == ("torch", "serialization.py")
        for frame, _ in traceback.walk_tb(err.__traceback__))
