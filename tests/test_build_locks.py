"""Stale JIT-build locks: found in both torch layouts, removed only when nobody can hold them."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT, copy_of_the_op_build, two_step_run

from ds_gpt import build_locks
from ds_gpt.build_locks import StaleLockWatcher

HOLD = "import os, sys, time; os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); time.sleep(60)"


def make_lock(root: Path, *parts: str) -> Path:
    lock = root.joinpath(*parts, "lock")
    lock.parent.mkdir(parents=True)
    lock.touch()
    return lock


def test_locks_are_found_with_and_without_torch_extensions_dir(tmp_path):
    flat = make_lock(tmp_path, "fused_adam")  # $TORCH_EXTENSIONS_DIR/<op>/lock
    versioned = make_lock(tmp_path, "py311_cu121", "cpu_adam")  # default root/<py_cuda>/<op>/lock
    (tmp_path / "fused_adam" / "fused_adam.so").touch()
    assert build_locks.build_locks(tmp_path) == sorted([flat, versioned])


def test_an_unheld_lock_goes_on_the_second_look(tmp_path):
    lock = make_lock(tmp_path, "deepspeed_shm_comm")
    watcher = StaleLockWatcher(tmp_path)
    watcher.poll()
    assert lock.exists()  # one look could fall between a holder's close() and its unlink()
    watcher.poll()
    assert not lock.exists() and watcher.removed == [lock]


def test_a_held_lock_stays_until_its_holder_is_killed(tmp_path):
    lock = tmp_path / "fused_adam" / "lock"
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert build_locks.holders(lock) == [holder.pid]
        watcher = StaleLockWatcher(tmp_path)
        for _ in range(3):
            watcher.poll()
        assert lock.exists()  # a build in progress on this node: wait for it
    finally:
        holder.kill()  # killed mid-build: the lock is left behind
        holder.wait()
    assert lock.exists() and build_locks.holders(lock) == []
    watcher.poll()
    watcher.poll()
    assert not lock.exists()


def test_on_a_shared_filesystem_only_an_old_lock_goes(tmp_path, monkeypatch, capsys):
    """A holder on another node is invisible from here: wait until no build could still be running."""
    lock = make_lock(tmp_path, "fused_adam")
    monkeypatch.setattr(build_locks, "filesystem_type", lambda path: "nfs4")
    watcher = StaleLockWatcher(tmp_path, shared_max_age_s=600)
    for _ in range(3):
        watcher.poll()
    assert lock.exists()
    assert capsys.readouterr().err.count("may be shared") == 1  # said once, not at every poll
    old = time.time() - 601
    os.utime(lock, (old, old))
    watcher.poll()
    assert not lock.exists() and "removed stale build lock" in capsys.readouterr().err


def test_filesystem_types_come_from_the_mount_table():
    assert build_locks.filesystem_type(Path("/proc/self")) == "proc"
    assert build_locks.filesystem_type(Path("/dev/shm")) == "tmpfs"
    assert build_locks.filesystem_type(REPO_ROOT) in build_locks.LOCAL_FILESYSTEMS


@pytest.mark.slow
def test_the_trainer_starts_past_a_lock_left_by_a_killed_build(tmp_path):
    """Without the watcher, torch waits on this file forever and the job hangs silently."""
    ext = tmp_path / "torch_extensions"
    lock = copy_of_the_op_build(ext) / "lock"
    lock.touch()
    proc = two_step_run(tmp_path, {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"removed stale build lock {lock}" in proc.stdout
    assert (tmp_path / "out" / "latest").read_text() == "global_step2"


def fake_compiler(tmp_path: Path) -> Path:
    """This interpreter under the name of GCC's compiler proper, as psutil reports a process's name."""
    path = tmp_path / "bin" / "cc1plus"
    path.parent.mkdir()
    path.symlink_to(sys.executable)
    return path


def test_the_watcher_stops_when_asked(tmp_path):
    watcher = StaleLockWatcher(tmp_path, interval_s=60)
    watcher.start()
    watcher.stop()  # wakes it from its wait at once
    assert not watcher.is_alive()


def test_a_compile_in_this_process_is_named_once_then_timed_then_done(tmp_path, capsys):
    """Loading a built op holds its lock for a moment; holding it a poll later, a compiler running, is a compile."""
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton holds it while it builds
    watcher = StaleLockWatcher(tmp_path, progress_s=0)
    watcher.poll()
    watcher.poll()
    assert capsys.readouterr().err == ""  # held, but no compiler runs: a slow load, not a compile
    compiler = subprocess.Popen([str(fake_compiler(tmp_path)), "-c", "import time; time.sleep(60)"])
    try:
        watcher.poll()
    finally:
        compiler.kill()
        compiler.wait()
    said = capsys.readouterr().err
    assert "DeepSpeed is compiling cpu_adam (its CPU Adam" in said and "once per cache" in said
    watcher.poll()
    assert "still compiling cpu_adam" in capsys.readouterr().err
    os.close(fd)
    lock.unlink()
    watcher.stop()  # finished between two polls: said at the stop
    assert "compiled cpu_adam in" in capsys.readouterr().err
