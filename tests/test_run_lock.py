"""One run per out_dir: a live holder is named and refused; a dead one is taken over."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import asdict

import pytest
from helpers import PYTHON, REPO_ROOT, write_token_bins

from ds_gpt import run_lock
from ds_gpt.errors import UserError
from ds_gpt.run_lock import LOCK_FILE, Holder, RunLock


def holder(**changes) -> Holder:
    fields = {"host": "this-host", "pid": os.getpid(), "job_id": None, "launch_id": "-:127.0.0.1:29500", **changes}
    return Holder(**fields)


def recorded(out_dir, who: Holder, heartbeat_age_s: float = 0.0) -> None:
    path = out_dir / LOCK_FILE
    path.write_text(json.dumps(asdict(who)))
    then = time.time() - heartbeat_age_s
    os.utime(path, (then, then))


@pytest.fixture
def no_squeue(monkeypatch):
    monkeypatch.setattr(run_lock, "_squeue_running", lambda job_id: None)


def take(out_dir, me: Holder) -> list[str]:
    warnings: list[str] = []
    lock = RunLock(out_dir, me).acquire(warnings.append)
    lock.release()
    return warnings


def test_a_free_out_dir_is_taken_and_released(tmp_path):
    lock = RunLock(tmp_path, holder()).acquire(print)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_holder_on_this_host_is_named_and_refused(tmp_path, no_squeue):
    live = subprocess.Popen(["sleep", "30"])
    try:
        recorded(tmp_path, holder(pid=live.pid, job_id="4242"))
        with pytest.raises(UserError, match=f"in use by another run \\(host this-host, pid {live.pid}, SLURM job 4242"):
            take(tmp_path, holder(pid=os.getpid() + 1, launch_id="other"))
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live.pid  # untouched
    finally:
        live.kill()


def test_a_holder_on_another_host_with_a_fresh_heartbeat_is_refused(tmp_path, no_squeue):
    recorded(tmp_path, holder(host="node7", pid=1))
    with pytest.raises(UserError, match="host node7, pid 1"):
        take(tmp_path, holder(launch_id="other"))


@pytest.mark.parametrize("case", ["dead pid", "same job", "stale heartbeat"])
def test_a_dead_holder_is_taken_over(tmp_path, no_squeue, case):
    dead = subprocess.Popen(["true"])
    dead.wait()
    old = {"dead pid": holder(pid=dead.pid),
           "same job": holder(host="node7", pid=1, job_id="77"),
           "stale heartbeat": holder(host="node7", pid=1)}[case]
    recorded(tmp_path, old, heartbeat_age_s=run_lock.STALE_S + 5 if case == "stale heartbeat" else 0)
    me = holder(job_id="77" if case == "same job" else None, launch_id="new")
    warnings = take(tmp_path, me)
    assert len(warnings) == 1 and warnings[0].startswith(f"took over {tmp_path / LOCK_FILE} from host")


def test_a_finished_slurm_job_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "_squeue_running", lambda job_id: job_id != "99")
    recorded(tmp_path, holder(host="node7", pid=1, job_id="99"))
    assert "SLURM job 99 is no longer running" in take(tmp_path, holder(launch_id="new"))[0]


def test_a_second_trainer_exits_2_before_anything_starts(tmp_path):
    """The real command: the holder is a live process; the second start fails in its input checks."""
    live = subprocess.Popen(["sleep", "30"])
    try:
        out = tmp_path / "out"
        out.mkdir()
        recorded(out, Holder(os.uname().nodename, live.pid, None, "x"))
        proc = subprocess.run(
            [PYTHON, "-m", "ds_gpt.train", "--data_dir", str(write_token_bins(tmp_path / "data")),
             "--out_dir", str(out),
             "--n_layer", "1", "--n_head", "1", "--n_embd", "16", "--block_size", "32", "--vocab_size", "512",
             "--dtype", "float32", "--compile", "False", "--max_iters", "2"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    finally:
        live.kill()
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"ds_gpt.train: error: {out} is in use by another run")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def _record(**changes) -> bytes:
    return json.dumps({**asdict(holder(host="node7", pid=1)), **changes}).encode()


# What a node crash between create and write leaves (NFS: empty, or zeros), and records no run of ours wrote.
UNREADABLE = {"empty": b"", "zeros": b"\0" * 16, "truncated": _record()[:20], "not JSON": b"run.lock\n",
              "a list": b"[1, 2]", "pid a string": _record(pid="12"), "pid absurd": _record(pid=10**30),
              "pid -1": _record(pid=-1), "pid 0": _record(pid=0), "pid true": _record(pid=True),
              "an extra field": _record(extra=1), "host a line break": _record(host="a\nb"), "a directory": None}


def unreadable_lock(out_dir, case: str, age_s: float) -> None:
    path = out_dir / LOCK_FILE
    if UNREADABLE[case] is None:
        path.mkdir()
    else:
        path.write_bytes(UNREADABLE[case])
    then = time.time() - age_s
    os.utime(path, (then, then))


@pytest.mark.parametrize("case", UNREADABLE)
def test_an_unreadable_lock_is_judged_by_its_age_like_a_heartbeat(tmp_path, no_squeue, case):
    young, old = tmp_path / "young", tmp_path / "old"
    for out_dir, age in ((young, 5.0), (old, run_lock.STALE_S + 5)):
        out_dir.mkdir()
        unreadable_lock(out_dir, case, age)
    with pytest.raises(UserError, match=r"in use by another run \(run.lock unreadable; modified [4-6] s ago\)"):
        take(young, holder(launch_id="new"))
    assert (young / LOCK_FILE).exists()  # a start that may still be writing it keeps it
    warnings = take(old, holder(launch_id="new"))
    assert len(warnings) == 1 and re.search(r"unreadable and unchanged for 30[56] s", warnings[0])
    assert not (old / LOCK_FILE).exists()  # taken, then released


def test_a_directory_with_files_in_the_locks_place_is_named_not_deleted(tmp_path, no_squeue):
    (tmp_path / LOCK_FILE).mkdir()
    (tmp_path / LOCK_FILE / "keep").write_text("x")
    then = time.time() - run_lock.STALE_S - 5
    os.utime(tmp_path / LOCK_FILE, (then, then))
    with pytest.raises(UserError, match="is a directory with files in it"):
        take(tmp_path, holder(launch_id="new"))
    assert (tmp_path / LOCK_FILE / "keep").read_text() == "x"


def test_a_heartbeat_in_the_future_is_named_as_clock_skew(tmp_path, no_squeue):
    recorded(tmp_path, holder(host="node7", pid=1), heartbeat_age_s=-7200)
    with pytest.raises(UserError) as refused:
        take(tmp_path, holder(launch_id="new"))
    assert "heartbeat 7200 s in the future" in str(refused.value) and "-7" not in str(refused.value)
    assert "NTP" in str(refused.value)
