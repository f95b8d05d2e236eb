"""The one rule for the modes of what ds_gpt writes, so that a lab can share runs and exports.

Every file a command writes gets the mode `touch` would give it (0666 less the umask), and every
directory the mode `mkdir` would (0777 less the umask): with the usual umask 022 everyone may
read and only you may write; with 002 your group may write too, with 027 it may only read, and
with 077 everything stays yours. Where a library picks a mode of its own (safetensors writes
0600, `tempfile.mkdtemp` makes 0700), `as_created` puts the rule's mode back.

Private whatever the umask, because they may carry credentials: the W&B directory `OUT/wandb/`
(0700) and `OUT/wandb_run_id` (0600) here, and the sbatch job's directory (0700) with its
hostfile and DeepSpeed env file (0600).
"""
from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


def umask() -> int:
    """This process's umask, read without changing it (os.umask reads it only by setting it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_created(path: Path) -> None:
    """Give `path`, and everything under it when it is a directory, the modes of the rule above."""
    mask = umask()
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can enter, made or narrowed now."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    path.chmod(PRIVATE_DIR)
    return path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only before any byte is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)  # a file that was already there keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
