"""Build locks that a killed process left behind, removed so that the next job does not wait forever.

DeepSpeed builds its C++/CUDA ops on first use (fused Adam on GPUs, the shared-memory all-reduce
on CPU) through torch.utils.cpp_extension. Every process that loads an op, built or not, first
takes a lock file in the op's build directory; the others wait for that file to disappear,
with no timeout and no message. A process killed while holding it (pre-emption, the OOM killer,
scancel during start-up) leaves the file behind, and every later job on that cache then hangs at
start-up until its time limit: a requeued job never resumes. torch has no timeout to set, so a
thread watches the locks and removes one once it is certain nobody holds it.

Certain means: no process on this node has the file open, seen twice `interval_s` apart (a live
holder keeps it open from creation to removal). On a filesystem shared between nodes (NFS, Lustre,
GPFS, ...) a holder on another node is invisible from here, so there the lock must also be older
than `shared_max_age_s`, longer than any op build takes.

The same watch says what is compiling, which torch does silently for minutes on a few cores.
Loading a built op holds its lock for well under a second; a lock that this process still holds
a poll later, while a compiler runs under it, is a compile. The process that compiles names the
op and says that it happens once, then how long it has taken every `progress_s`, and when it is
done.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

import psutil

# What the ops DeepSpeed compiles on first use are for, to say so while one compiles.
OP_PURPOSES = {"deepspeed_shm_comm": "its shared-memory all-reduce for CPU ranks",
               "cpu_adam": "its CPU Adam, for ZeRO-Offload and CPU runs",
               "fused_adam": "its fused Adam for GPUs"}
# What torch's ninja runs while it builds an op (host compilers and linkers, CUDA's toolchain).
COMPILERS = {"cc1plus", "cc1", "c++", "g++", "gcc", "clang", "clang++", "ld", "nvcc", "cicc", "ptxas", "fatbinary"}
# Filesystems that live on this node alone; anything else may be shared with other nodes.
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "tmpfs", "ramfs", "overlay"}


def extension_root() -> Path:
    """Where torch builds extensions: $TORCH_EXTENSIONS_DIR, else its per-user default."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def build_locks(root: Path) -> list[Path]:
    """The lock files under `root`: ROOT/<op>/lock with $TORCH_EXTENSIONS_DIR set, else ROOT/py311_cu121/<op>/lock."""
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})


def holders(lock: Path) -> list[int]:
    """Pids of the processes on this node that have `lock` open (those we may inspect)."""
    target, pids = os.path.realpath(lock), []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if any(f.path == target for f in proc.open_files()):
                pids.append(proc.pid)
    return pids


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from the longest matching mount point."""
    target, best, fstype = os.path.realpath(path), "", "unknown"
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint.rstrip("/") or "/"
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, fstype = mount, part.fstype
    return fstype


class StaleLockWatcher(threading.Thread):
    """Daemon thread: every `interval_s`, remove build locks that no process holds (see module doc)."""

    def __init__(self, root: Path, interval_s: float = 5.0, shared_max_age_s: float = 600.0,
                 progress_s: float = 30.0):
        super().__init__(name="ds_gpt-build-locks", daemon=True)
        self.root, self.interval_s, self.shared_max_age_s = root, interval_s, shared_max_age_s
        self.progress_s = progress_s
        self.unheld: dict[Path, int] = {}  # lock -> consecutive polls that found no holder
        self.compiling: dict[Path, list[float]] = {}  # lock this process holds -> [first seen, last said]
        self.removed: list[Path] = []
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            with contextlib.suppress(OSError):  # a cache directory that is not there yet, a lock just gone
                self.poll()
            self._stopped.wait(self.interval_s)

    def stop(self) -> None:
        """Stop and join: no thread of ours should be running when the interpreter shuts down."""
        self._stopped.set()
        if self.is_alive():
            self.join()
        for lock in [lock for lock in self.compiling if not lock.exists()]:  # finished since the last poll
            self._say_compiled(lock)

    def poll(self) -> None:
        locks = build_locks(self.root)
        self.unheld = {lock: n for lock, n in self.unheld.items() if lock in locks}
        for lock in [lock for lock in self.compiling if lock not in locks]:
            self._say_compiled(lock)
        for lock in locks:
            pids = holders(lock)
            if os.getpid() in pids:
                self._say_compiling(lock)
            if pids:
                self.unheld.pop(lock, None)
                continue
            self.unheld[lock] = self.unheld.get(lock, 0) + 1
            age = time.time() - lock.stat().st_mtime
            shared = filesystem_type(lock) not in LOCAL_FILESYSTEMS
            if self.unheld[lock] == 1 and shared:
                print(f"ds_gpt: waiting on build lock {lock}, which no process on this node holds; the filesystem "
                      f"may be shared, so it is removed as stale once {self.shared_max_age_s:.0f} s old",
                      file=sys.stderr, flush=True)
            if self.unheld[lock] >= 2 and (not shared or age >= self.shared_max_age_s):
                with contextlib.suppress(FileNotFoundError):  # another rank removed it first
                    lock.unlink()
                    self.removed.append(lock)
                    print(f"ds_gpt: removed stale build lock {lock} ({age:.0f} s old, held by no process on this "
                          f"node): a build was killed while holding it", file=sys.stderr, flush=True)
                self.unheld.pop(lock, None)

    def _say_compiling(self, lock: Path) -> None:
        op, now = lock.parent.name, time.monotonic()
        if lock not in self.compiling:
            self.compiling[lock] = [now, 0.0]  # seen once: perhaps only a load
            return
        first, said = self.compiling[lock]
        if not said and not compiler_running():
            return  # a slow load on a busy machine, or ninja finding the build up to date
        if not said:
            purpose = OP_PURPOSES.get(op, "an op it needs")
            print(f"ds_gpt: DeepSpeed is compiling {op} ({purpose}) into {lock.parent}: once per cache "
                  f"(TORCH_EXTENSIONS_DIR), minutes on a few CPU cores; later runs load it in seconds",
                  file=sys.stderr, flush=True)
        elif now - said >= self.progress_s:
            print(f"ds_gpt: still compiling {op} ({now - first:.0f} s)", file=sys.stderr, flush=True)
        else:
            return
        self.compiling[lock][1] = now

    def _say_compiled(self, lock: Path) -> None:
        first, said = self.compiling.pop(lock)
        if said:
            print(f"ds_gpt: compiled {lock.parent.name} in {time.monotonic() - first:.0f} s", file=sys.stderr,
                  flush=True)


def compiler_running() -> bool:
    """Whether a compiler or linker runs among this process's descendants."""
    with contextlib.suppress(psutil.Error):
        return any(child.name() in COMPILERS for child in psutil.Process().children(recursive=True))
    return False


def watch() -> StaleLockWatcher:
    """Start watching this process's extension root, until `stop()`."""
    watcher = StaleLockWatcher(extension_root())
    watcher.start()
    return watcher
