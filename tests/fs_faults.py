"""Real filesystem faults for tests: a small tmpfs that fills up, and read-only places.

The tests run as root, which ignores permission bits: chmod cannot make a directory
read-only. A read-only mount can (EROFS for everyone), and so can /sys, which refuses new files
even to root. Mounting needs CAP_SYS_ADMIN; where it is missing, the tests that need a full
filesystem or read-only content skip with the reason, and read-only writes fall back to /sys.
"""
from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

SYS_READ_ONLY = Path("/sys/ds_gpt-test")  # EPERM/EACCES for root too, whatever is created under it


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@functools.cache
def mount_problem() -> str | None:
    """None if this process can mount a tmpfs; else why not."""
    if shutil.which("mount") is None:
        return "no mount command"
    with tempfile.TemporaryDirectory() as probe:
        proc = _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", probe)
        if proc.returncode:
            return f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})"
        subprocess.run(["umount", probe], check=True)
    return None


class Mounts:
    """tmpfs mounts made by one test, all unmounted when it ends."""

    def __init__(self):
        self.points: list[Path] = []

    def tmpfs(self, where: Path, size: str, fill: Callable[[Path], None] | None = None,
              read_only: bool = False) -> Path:
        """A tmpfs of `size` at `where`, filled by `fill(where)`, then remounted read-only if asked."""
        if (problem := mount_problem()) is not None:
            pytest.skip(problem)
        where.mkdir(parents=True, exist_ok=True)
        proc = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
        assert proc.returncode == 0, proc.stderr
        self.points.append(where)
        if fill is not None:
            fill(where)
        if read_only:
            proc = _mount("-o", "remount,ro", str(where))
            assert proc.returncode == 0, proc.stderr
        return where

    def read_only(self, where: Path, fill: Callable[[Path], None] | None = None) -> Path:
        """A read-only directory holding what `fill` puts there: a read-only tmpfs, or, where
        nothing can be mounted and nothing needs to be in it, a path under /sys."""
        if mount_problem() is not None and fill is None:
            return SYS_READ_ONLY
        return self.tmpfs(where, "64m", fill, read_only=True)

    def unmount_all(self) -> None:
        for point in reversed(self.points):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def mounted() -> Iterator[Mounts]:
    """The body of conftest's `mounts` fixture."""
    m = Mounts()
    yield m
    m.unmount_all()


def snapshot(root: Path, ignore: frozenset[str] = frozenset()) -> dict[str, str]:
    """sha256 of every file under `root` (names in `ignore` left out): what 'nothing lost' compares."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ignore}
