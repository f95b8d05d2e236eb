"""What the cluster tests share: the local cluster's layout, the submitting shell's environment,
and jobs submitted, watched and signalled as a user does it (sbatch, scontrol, scancel).

Fixtures live in conftest.py; this module is imported by it and by the test files.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import REPO_ROOT, VENV_BIN, read_jsonl

CLUSTER_SH = Path(__file__).resolve().parent / "local_cluster.sh"
STATE = Path(os.environ.get("DS_GPT_CLUSTER_STATE", "/var/lib/ds_gpt_local_cluster"))
NODE_LOCAL, SHARED_MNT = STATE / "local", STATE / "shared"  # as local_cluster.sh sets them up
NODES = ("node1", "node2")
# The launch path is under test here, not inductor: a compiled model costs each rank ~5 s of
# tracing before its first step on this CPU (tests/test_train.py covers the compiled engine).
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--vocab_size", "512",
        "--dtype", "float32", "--compile", "False", "--micro_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--eval_iters", "2", "--log_interval", "1", "--warmup_iters", "2", "--lr_decay_iters", "100"]
# One rank per node: each slurmd "node" has one CPU; a100:1 is the local cluster's stand-in GPU.
SBATCH_TINY = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=a100:1", "--cpus-per-task=1",
               "--time=15"]
# slurm/ds_train.sh's launch modes as a user picks them: mode A (the deepspeed launcher) is the default.
LAUNCH = {"deepspeed": {}, "srun": {"DS_GPT_LAUNCH": "srun"}}
JOB_TIMEOUT_S = 600
POLL_S = 0.25  # scontrol is cheap; a job's end is seen this soon after it
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE")
# A requeued job waits for its BeginTime (SLURM's credential lifetime, 2 min); the tests start it
# sooner, but not in the second the old run's credential was revoked: slurmd refuses a new one
# then. It revoked it when the requeue reached it, before the job stopped COMPLETING and showed
# PENDING, so a start over a second after PENDING is first seen gets a credential of a later second.
REQUEUE_NUDGE_AFTER_S = 1.2


def job_env(**extra: str) -> dict[str, str]:
    """The submitting shell's environment: venv first on PATH, shared caches, no launcher marks."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "OMPI_", "PMI_", "PMIX_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env["VENV"] = str(VENV_BIN.parent)
    env["DS_GPT_PREFLIGHT"] = "0"  # these jobs test the launch; the preflight runs where a test asks for it
    env.update(extra)
    return env


def local_cluster(*args: str, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`local_cluster.sh ARGS`, which must succeed; a failure shows what the script said (which
    step, which node)."""
    proc = subprocess.run(["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=timeout, env=env)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"local_cluster.sh {' '.join(args)} exited {proc.returncode}:\n{said}"
    return proc


def on_node(node: str, *cmd: str) -> subprocess.CompletedProcess:
    """Run cmd with `node`'s view of the filesystems (its own local disk at NODE_LOCAL)."""
    return subprocess.run(["bash", str(CLUSTER_SH), "exec", node, *cmd], capture_output=True, text=True, timeout=60)


def node_local_dir(prefix: str) -> Path:
    """A fresh directory on every node's own disk (the caller removes it with remove_node_local)."""
    path = NODE_LOCAL / f"{prefix}-{uuid.uuid4().hex[:8]}"
    for node in NODES:
        on_node(node, "mkdir", "-p", str(path))
    return path


def remove_node_local(path: Path) -> None:
    for node in NODES:
        on_node(node, "rm", "-rf", str(path))


def sbatch(args: list[str], env: dict[str, str]) -> int:
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, check=True)
    return int(proc.stdout.strip().split(";")[0])


def job_info(job_id: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


class Watch:
    """Polls one job until a deadline; with `nudge_requeued`, starts it once it waits only for a
    requeue's BeginTime (see REQUEUE_NUDGE_AFTER_S)."""

    def __init__(self, job_id: int, log: Path, timeout_s: float = JOB_TIMEOUT_S, nudge_requeued: bool = False) -> None:
        self.job_id, self.log, self.nudge_requeued = job_id, log, nudge_requeued
        self.deadline = time.monotonic() + timeout_s
        self._requeued_at: float | None = None

    def poll(self) -> dict[str, str]:
        if time.monotonic() > self.deadline:
            subprocess.run(["scancel", str(self.job_id)])
            pytest.fail(f"job {self.job_id} still {job_info(self.job_id).get('JobState')} at its deadline; "
                        f"log:\n{tail(self.log)}")
        time.sleep(POLL_S)
        info = job_info(self.job_id)
        if self.nudge_requeued and info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            self._requeued_at = self._requeued_at or time.monotonic()
            if time.monotonic() - self._requeued_at > REQUEUE_NUDGE_AFTER_S:
                subprocess.run(["scontrol", "update", f"JobId={self.job_id}", "StartTime=now"], capture_output=True)
                self._requeued_at = None
        return info


def wait_job(job_id: int, log: Path, timeout_s: float = JOB_TIMEOUT_S, nudge_requeued: bool = False) -> dict:
    """Poll until the job ends and return its scontrol record."""
    watch = Watch(job_id, log, timeout_s, nudge_requeued)
    while (info := watch.poll()).get("JobState") not in ENDED:
        pass
    return info


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else f"(no {path})"


def train_iters(out: Path) -> list[int]:
    return [e["iter"] for e in read_jsonl(out / "metrics.jsonl") if "loss" in e and "event" not in e]


def runs_of(out: Path) -> list[list[int]]:
    """The training iterations each start of the trainer logged, in order (a requeue starts a new run)."""
    runs: list[list[int]] = []
    for e in read_jsonl(out / "metrics.jsonl"):
        if e.get("event") == "start":
            runs.append([])
        elif "loss" in e and "event" not in e:
            runs[-1].append(e["iter"])
    return runs


def wait_until_training(job_id: int, out: Path, log: Path, iters: int = 3, run: int = 0) -> None:
    """Wait until the job's `run`-th start (0: the first; 1: after one requeue, which this starts
    without SLURM's wait) has logged `iters` training iterations, failing if the job ends first."""
    watch = Watch(job_id, log, nudge_requeued=run > 0)
    while True:
        runs = runs_of(out) if (out / "metrics.jsonl").exists() else []
        if len(runs) > run and len(runs[run]) >= iters:
            return
        assert watch.poll().get("JobState") not in ENDED, tail(log)


def assert_two_node_run(out: Path, launcher: str, max_iters: int) -> dict:
    config = json.loads((out / "config.json").read_text())
    assert config["launcher"] == launcher and config["launch_env"]["launcher"] == launcher
    assert config["world_size"] == 2 and config["launch_env"]["world_size"] == 2
    assert config["hosts"] == ["node1", "node2"]
    iters = train_iters(out)
    assert iters and iters[-1] == max_iters - 1
    events = read_jsonl(out / "metrics.jsonl")
    assert all(e.get("world_size", 2) == 2 for e in events if e.get("event") == "start")
    tag = (out / "latest").read_text().strip()
    assert tag == f"global_step{max_iters}" and any((out / tag).iterdir())
    return config


# -----------------------------------------------------------------------------
# jobs that several tests read


class Job(NamedTuple):
    """A finished job: its id, its last scontrol record, its run directory and its output."""
    job_id: int
    info: dict[str, str]
    out: Path
    log: Path


# One two-node job per launch mode serves test_cluster (mode A/B), test_staging (preflight and
# staging) and test_elastic_cluster (the two-node half): the preflight, every node's copy of the
# data, then 6 iterations with checkpoints at 3 and 6.
STAGED_ITERS = ["--max_iters", "6", "--eval_interval", "3", "--checkpoint_interval", "3"]


def staged_run(mode: str, data_dir: Path, node_local: Path, where: Path) -> Job:
    """slurm/ds_train.sh with its preflight and STAGE_DATA=1: mode A stages to STAGE_DIR, mode B to SLURM_TMPDIR."""
    out, log = where / "out", where / "job.out"
    stage = {"STAGE_DIR": str(node_local)} if mode == "deepspeed" else {"SLURM_TMPDIR": str(node_local)}
    job = sbatch([*SBATCH_TINY, f"--output={log}", "slurm/ds_train.sh", *TINY, *STAGED_ITERS],
                 job_env(DATA_DIR=str(data_dir), OUT_DIR=str(out), DS_GPT_PREFLIGHT="1", STAGE_DATA="1",
                         **LAUNCH[mode], **stage))
    return Job(job, wait_job(job, log), out, log)


# Long enough that a signal lands mid-run: relayed through pdsh, signals stopped runs 21-54
# iterations after the test saw the third (srun: 5-19), on a loaded machine too.
SIGNAL_MAX_ITERS = 150


def signalled_run(mode: str, signals: list[list[str]], data_dir: Path, where: Path) -> Job:
    """One job given each `scancel` option list in turn, each once the (re)started run has trained
    3 iterations; the run the last signal requeued trains to the end."""
    out, log = where / "out", where / "job.out"
    job = sbatch([*SBATCH_TINY, f"--output={log}", "slurm/ds_train.sh", *TINY, "--max_iters", str(SIGNAL_MAX_ITERS),
                  "--eval_interval", "1000", "--checkpoint_interval", "1000",
                  "--keep_last", str(len(signals) + 1)],  # every signal's checkpoint stays, for its test to find
                 job_env(DATA_DIR=str(data_dir), OUT_DIR=str(out), **LAUNCH[mode]))
    for run, scancel in enumerate(signals):
        wait_until_training(job, out, log, run=run)
        subprocess.run(["scancel", *scancel, str(job)], check=True)
    return Job(job, wait_job(job, log, nudge_requeued=True), out, log)
