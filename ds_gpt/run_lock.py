"""One run per out_dir: a lock file naming its holder, with a heartbeat, that survives dead holders.

Two trainers writing one out_dir interleave their metrics and overwrite each other's
checkpoints. The first to start writes OUT/run.lock (host, pid, SLURM job id, launch id) with
O_CREAT | O_EXCL, which is atomic on local filesystems, NFSv3+ and Lustre alike; flock is not
used because on NFS and Lustre it may be node-local or off. The holder touches the file every
HEARTBEAT_S seconds while it runs and removes it when it ends.

A lock left behind (SIGKILL, a lost node) is taken over when any of these holds:
- it names this job's SLURM id: the same job requeued, or restarted within its allocation;
- it names a process on this host that no longer exists;
- its SLURM job is no longer running (asked of squeue, where there is one);
- its heartbeat is older than STALE_S: a holder on another host that stopped touching it;
- it is unreadable (empty or half-written, as a node crash between create and write leaves it
  on NFS; not JSON; a record with a pid no process can have; a directory) and its modification
  time is older than STALE_S, the age a stopped heartbeat would have.
Otherwise the new start refuses with one line naming the holder; a heartbeat stamped ahead of
this node's clock is named as such. Takeover replaces the file (an empty directory in its place
goes first) and reads it back: of two starts that take over at once, the one whose record is
not there exits with the same refusal.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ds_gpt import atomic
from ds_gpt.errors import UserError
from ds_gpt.launch_env import LaunchEnv

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats: the holder's node is gone or hung
PID_MAX = 4_194_304  # Linux's highest pid_max
MAX_RECORD = 4096  # a record is ~150 bytes; more is not ours


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    job_id: str | None  # SLURM_JOB_ID
    launch_id: str  # what every rank of one launch shares: job, master address and port

    def describe(self) -> str:
        job = f", SLURM job {self.job_id}" if self.job_id else ""
        return f"host {self.host}, pid {self.pid}{job}"


def this_launch(env: LaunchEnv, environ=os.environ) -> Holder:
    job_id = environ.get("SLURM_JOB_ID")
    return Holder(socket.gethostname(), os.getpid(), job_id, f"{job_id or '-'}:{env.master_addr}:{env.master_port}")


def _holder(record: object) -> Holder | None:
    """The holder a lock file's JSON names, or None when it is not one we wrote (fields, types, a real pid)."""
    if not isinstance(record, dict) or set(record) != {"host", "pid", "job_id", "launch_id"}:
        return None
    host, pid, job_id, launch_id = record["host"], record["pid"], record["job_id"], record["launch_id"]
    texts = [host, launch_id] + ([] if job_id is None else [job_id])
    if not all(isinstance(t, str) and t.isprintable() for t in texts) or not host:
        return None
    if type(pid) is not int or not 0 < pid <= PID_MAX:  # os.kill(0 or -1, ...) would signal groups
        return None
    return Holder(host, pid, job_id, launch_id)


def _read(path: Path) -> tuple[Holder | None, float]:
    """The recorded holder (None if unreadable: empty, half-written, not ours, a directory) and the
    age of its file's modification time, which the holder's heartbeat keeps fresh."""
    st = path.stat()  # FileNotFoundError: released meanwhile; the caller retries
    age = time.time() - st.st_mtime
    if not stat.S_ISREG(st.st_mode):
        return None, age
    try:
        with open(path, "rb") as fh:
            return _holder(json.loads(fh.read(MAX_RECORD))), age
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON, nested absurdly
        return None, age


def _squeue_running(job_id: str) -> bool | None:
    """Is the SLURM job still running? None when there is no squeue to ask."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        out = subprocess.run([squeue, "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    return out.stdout.strip() in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED")


def stale_reason(holder: Holder | None, heartbeat_age_s: float, me: Holder) -> str | None:
    """Why a recorded holder may be taken over, or None while it may still be alive."""
    if holder is None:  # a start that died between create and write, or not our file: judged by its age
        return f"it is unreadable and unchanged for {heartbeat_age_s:.0f} s" if heartbeat_age_s > STALE_S else None
    if holder.job_id and holder.job_id == me.job_id:
        return f"it is this job ({holder.job_id}), started again"
    if holder.host == me.host:
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return f"process {holder.pid} on this host has exited"
        except PermissionError:
            pass  # alive, another user's
    if holder.job_id and _squeue_running(holder.job_id) is False:
        return f"SLURM job {holder.job_id} is no longer running"
    if heartbeat_age_s > STALE_S:
        return f"its heartbeat stopped {heartbeat_age_s:.0f} s ago"
    return None


class RunLock:
    """The out_dir's lock, held by rank 0 of the run for as long as it trains."""

    def __init__(self, out_dir: Path, me: Holder):
        self.path = Path(out_dir) / LOCK_FILE
        self.me = me
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self, warn) -> "RunLock":
        """Hold the lock, or raise a UserError naming the live holder. `warn` reports a takeover."""
        record = json.dumps(asdict(self.me))
        if not self._create(record):
            self._take_over(record, warn)
        self._beat = threading.Thread(target=self._heartbeat, name="ds_gpt-run-lock", daemon=True)
        self._beat.start()
        return self

    def _create(self, record: str) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(record)
        except OSError:  # a full disk: leave no empty lock behind for the next start to wait out
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _take_over(self, record: str, warn) -> None:
        try:
            holder, age = _read(self.path)
        except FileNotFoundError:  # released between our create and our read
            if self._create(record):
                return
            holder, age = _read(self.path)
        reason = stale_reason(holder, age, self.me)
        if reason is None:
            self._refuse(holder, age)
        if self.path.is_dir() and not self.path.is_symlink():
            self._remove_directory()
        atomic.write_text(self.path, record)
        if _read(self.path)[0] != self.me:  # another start took it over at the same moment
            self._refuse(*_read(self.path))
        warn(f"took over {self.path} from {holder.describe() if holder else 'an unknown holder'}: {reason}")

    def _remove_directory(self) -> None:
        """A stale directory in the lock's place (another tool's lock, a mkdir by hand): gone if empty."""
        try:
            self.path.rmdir()
        except OSError as err:
            raise UserError(f"{self.path} is a directory with files in it ({err.strerror}), not a lock this "
                            "trainer wrote", hint=f"look inside, then remove it: rm -r {self.path}") from None

    def _refuse(self, holder: Holder | None, age: float) -> None:
        who, beat = (holder.describe(), "heartbeat") if holder else (f"{LOCK_FILE} unreadable", "modified")
        if age < -1.0:  # stamped by a clock ahead of ours: another node's, or the file server's
            beat += f" {-age:.0f} s in the future: this node's clock is behind the one that stamped the file"
            hint = f"fix the clocks (NTP); if its holder is gone, remove the lock: rm {self.path}"
        else:
            beat += f" {max(age, 0.0):.0f} s ago"
            hint = (f"wait for it to end, stop it, or pass another --out_dir; a holder that died is "
                    f"taken over once its heartbeat is {STALE_S:.0f} s old")
        raise UserError(f"{self.path.parent} is in use by another run ({who}; {beat})", hint=hint)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full or flaky filesystem: the run itself reports what matters

    def release(self) -> None:
        self._stop.set()
        try:
            holder, _ = _read(self.path)
            if holder == self.me:
                self.path.unlink()
        except FileNotFoundError:
            pass
