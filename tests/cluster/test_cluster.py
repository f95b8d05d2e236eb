"""Cluster launch on a real two-node SLURM cluster and real pdsh/ssh, on this one machine.

The cluster comes up once per session (conftest.py). Every job is a tiny model on CPU with one
rank per node, and each test checks the run directory (metrics.jsonl, config.json, the
checkpoint), not log text alone. Where tests submit near-identical jobs they read one: the two
launch modes' jobs are the staged runs that test_staging.py and test_elastic_cluster.py read too,
and the srun mode's two signal tests signal one job twice.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from cluster_jobs import (
    ENDED,
    JOB_TIMEOUT_S,
    SBATCH_TINY,
    SIGNAL_MAX_ITERS,
    TINY,
    Job,
    Watch,
    assert_two_node_run,
    job_env,
    local_cluster,
    runs_of,
    sbatch,
    signalled_run,
    tail,
    train_iters,
    wait_job,
    wait_until_training,
)
from helpers import PYTHON, REPO_ROOT, VENV_BIN, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


# -----------------------------------------------------------------------------
# the harness itself

@pytest.mark.parametrize("owner", ["exited", "another program"])
def test_the_cluster_script_leaves_a_pid_that_is_not_its_daemon(owner: str, tmp_path: Path) -> None:
    """A pid file whose process has exited, or is now another program, reads as stopped: the
    script goes on (up restarts the daemon) and signals nothing. A daemon that exits between
    the script's checks once ended `up` with bash's own error and no word of which daemon."""
    other = subprocess.Popen(["sleep", "30"] if owner == "another program" else ["true"])
    try:
        if owner == "exited":
            other.wait()
        (tmp_path / "sshd-node1.pid").write_text(f"{other.pid}\n")
        state = {**os.environ, "DS_GPT_CLUSTER_STATE": str(tmp_path)}
        proc = local_cluster("stop-sshd", "node1", timeout=30, env=state)
        assert proc.stderr == "" and not (tmp_path / "sshd-node1.pid").exists()
        assert other.poll() is None if owner == "another program" else other.returncode == 0
    finally:
        other.kill()
        other.wait()


def test_srun_ranks_span_both_nodes(cluster) -> None:
    """srun's tasks are recognised as srun ranks; the batch shell is not one."""
    proc = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", PYTHON, "-m",
                           "ds_gpt.launch_env"], cwd=REPO_ROOT, env=job_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    ranks = sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["rank"])
    assert [(r["launcher"], r["rank"], r["node_rank"], r["world_size"]) for r in ranks] == \
        [("srun", 0, 0, 2), ("srun", 1, 1, 2)]
    assert {r["master_addr"] for r in ranks} == {"node1"} and len({r["master_port"] for r in ranks}) == 1
    assert ranks[0]["hosts"] == ["node1", "node2"]


def test_hostfile_generated_in_an_allocation_matches_scontrol(cluster, tmp_path: Path) -> None:
    out = tmp_path / "hostfile"
    subprocess.run(["salloc", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=a100:1", "--cpus-per-task=1",
                    PYTHON, "-m", "ds_gpt.hostfile", "--out", str(out)], cwd=REPO_ROOT, env=job_env(),
                   check=True, capture_output=True, timeout=120)
    assert out.read_text() == "node1 slots=1\nnode2 slots=1\n"
    from ds_gpt.hostfile import expand_nodelist
    for nodelist in ("node[1-2]", "ng[10101-10102,10205],cdr7", "n[08-11],x[1-2]y[3-4]"):
        real = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              check=True).stdout.split()
        assert expand_nodelist(nodelist) == real


# -----------------------------------------------------------------------------
# training jobs

def test_sbatch_mode_a_deepspeed_launcher(staged_runs) -> None:
    (job, info, out, log), _ = staged_runs("deepspeed")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    assert_two_node_run(out, "deepspeed", max_iters=6)
    assert not list((REPO_ROOT / "hostfiles").glob(f"{job}*")), "the job's hostfile and env file go with the job"
    text = log.read_text()
    assert "ds_train.sh: hostfile: node1 slots=1,node2 slots=1" in text
    assert "node1:" in text and "node2:" in text  # pdsh prefixes each node's output with its name


def test_sbatch_mode_b_srun(staged_runs) -> None:
    (job, info, out, log), _ = staged_runs("srun")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    config = assert_two_node_run(out, "srun", max_iters=6)
    assert config["launch_env"]["master_addr"] == "node1"


def test_deepspeed_hostfile_through_pdsh(cluster, data_dir: Path, tmp_path: Path) -> None:
    """`deepspeed --hostfile` outside sbatch: pdsh + ssh into node1 and node2."""
    hostfile, out, env_file = tmp_path / "hostfile", tmp_path / "out", tmp_path / "deepspeed_env"
    env = job_env()
    subprocess.run(["salloc", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=a100:1", "--cpus-per-task=1",
                    PYTHON, "-m", "ds_gpt.hostfile", "--out", str(hostfile)], cwd=REPO_ROOT, env=env,
                   check=True, capture_output=True, timeout=120)
    # What the ranks on the far side of ssh need; a file of our own, not ~/.deepspeed_env.
    env_file.write_text("".join(f"{k}={env[k]}\n" for k in ("PATH", "DS_GPT_CACHE", "TORCH_EXTENSIONS_DIR")
                                if k in env))
    env["DS_ENV_FILE"] = str(env_file)
    port = str(29000 + os.getpid() % 1000)
    proc = subprocess.run([str(VENV_BIN / "deepspeed"), "--hostfile", str(hostfile), "--master_addr", "node1",
                           "--master_port", port, "ds_gpt/train.py", "--deepspeed_config", "ds_configs/zero1.json",
                           "--data_dir", str(data_dir), "--out_dir", str(out), *TINY, "--max_iters", "4",
                           "--eval_interval", "2", "--checkpoint_interval", "2"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["launcher"] == "deepspeed" and config["world_size"] == 2
    assert config["launch_env"]["master_addr"] == "node1" and config["launch_env"]["master_port"] == int(port)
    assert train_iters(out)[-1] == 3 and (out / "latest").read_text().strip() == "global_step4"
    assert "node1:" in proc.stdout + proc.stderr and "node2:" in proc.stdout + proc.stderr


def test_arguments_reach_the_nodes_byte_for_byte(cluster, tmp_path: Path) -> None:
    """Mode A through real pdsh: DS_CONFIG, DATA_DIR, OUT_DIR and a trainer argument full of what a
    shell reads ($(...), backticks, ;, quotes, a line break) and what pdsh replaces (%h, %n), with
    non-ASCII too. Nothing runs; the ranks get every byte (the config is found under its exact
    name, the missing data directory is named exactly); the job ends with the trainer's exit 2."""
    mark = f"pwned-{os.getpid()}"
    weird = f"$(touch {mark}-1)`touch {mark}-2`;touch {mark}-3 'q\"ü%h%n"
    ds_config = tmp_path / f"ds {weird}\nline two.json"
    ds_config.write_text((REPO_ROOT / "ds_configs" / "zero1.json").read_text())
    data, out, log = tmp_path / f"data {weird}", tmp_path / f"out {weird}", tmp_path / "job.out"
    job = sbatch([*SBATCH_TINY, f"--output={log}", "slurm/ds_train.sh", *TINY, "--max_iters", "2",
                  "--wandb_run_name", f"run;touch {mark}-4"],  # last: its `;` would give the line touch's status
                 job_env(DATA_DIR=str(data), OUT_DIR=str(out), DS_CONFIG=str(ds_config)))
    info = wait_job(job, log)
    assert info["ExitCode"] == "2:0", tail(log)  # the trainer's refusal, not what ran last on the nodes' shell
    text = log.read_text()
    for node in ("node1", "node2"):
        assert f"{node}: ds_gpt.train: error: data directory {data} not found" in text, tail(log)
    assert not [p for d in (REPO_ROOT, Path.home(), tmp_path) for p in d.glob(f"{mark}*")]
    assert not out.exists()


SIGNALS = [
    ("deepspeed", ["--batch", "--signal=USR1"]),  # `#SBATCH --signal=B:USR1@120`, before the time limit
    ("srun", ["--batch", "--signal=USR1"]),
    ("srun", ["--signal=TERM"]),  # pre-emption's first signal: SIGTERM to the job's steps
]


@pytest.fixture(scope="module")
def signalled(cluster, data_dir: Path, tmp_path_factory):
    """signalled(mode) -> (job, its signals in order): one job per launch mode, given each of that
    mode's SIGNALS in turn, the next once the requeued run trains; submitted on first use."""
    jobs: dict[str, tuple[Job, list[list[str]]]] = {}

    def get(mode: str) -> tuple[Job, list[list[str]]]:
        if mode not in jobs:
            signals = [scancel for m, scancel in SIGNALS if m == mode]
            jobs[mode] = signalled_run(mode, signals, data_dir, tmp_path_factory.mktemp(f"signalled_{mode}")), signals
        return jobs[mode]

    return get


@pytest.mark.parametrize("mode,scancel", SIGNALS)
def test_signal_checkpoints_requeues_and_resumes(signalled, mode: str, scancel: list[str]) -> None:
    """A signal mid-run -> checkpoint -> exit 75 -> scontrol requeue -> resume -> done."""
    (job, info, out, log), signals = signalled(mode)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    assert info["Restarts"] == str(len(signals)), tail(log)  # one requeue per signal

    nth = signals.index(scancel)  # this test's signal stopped run nth; run nth + 1 resumed
    starts = [e for e in read_jsonl(out / "metrics.jsonl") if e.get("event") == "start"]
    assert len(starts) == len(signals) + 1 and starts[0]["resumed_from"] is None
    began_at, stopped_at = starts[nth]["iter"], starts[nth + 1]["iter"]  # stopped_at: the checkpoint the signal made
    ended_at = starts[nth + 2]["iter"] if nth + 2 < len(starts) else SIGNAL_MAX_ITERS
    assert starts[nth + 1]["resumed_from"] == f"global_step{stopped_at}" and began_at + 3 <= stopped_at < ended_at
    assert (out / f"global_step{stopped_at}").is_dir()
    runs = runs_of(out)
    assert runs[nth] == list(range(began_at, stopped_at)), "the signalled run logs j..k-1, then checkpoints at k"
    assert runs[nth + 1] == list(range(stopped_at, ended_at)), "the requeued run continues at k, not at 0"
    assert (out / "latest").read_text().strip() == f"global_step{SIGNAL_MAX_ITERS}"
    text = log.read_text()
    assert "requeueing job" in text and f"restart {nth + 1}" in text


def test_scancel_saves_a_checkpoint_and_does_not_requeue(cluster, data_dir: Path, tmp_path: Path) -> None:
    """Mode A: a plain scancel (SIGTERM to every process of the job, SIGKILL after KillWait) stops
    the ranks at a checkpoint; the launcher, shielded, does not kill them first. No requeue."""
    out, log = tmp_path / "out", tmp_path / "job.out"
    job = sbatch([*SBATCH_TINY, f"--output={log}", "slurm/ds_train.sh", *TINY, "--max_iters", str(SIGNAL_MAX_ITERS),
                  "--eval_interval", "1000", "--checkpoint_interval", "1000"],
                 job_env(DATA_DIR=str(data_dir), OUT_DIR=str(out)))
    wait_until_training(job, out, log)
    subprocess.run(["scancel", str(job)], check=True)
    # The job shows CANCELLED once it is no longer COMPLETING: its batch script has exited, so any
    # requeue it made (`scontrol requeue` returns once slurmctld has it) shows already.
    watch = Watch(job, log)
    while (info := watch.poll()).get("JobState") not in ENDED and info.get("Restarts") == "0":
        pass
    assert "not requeueing" in log.read_text(), tail(log)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", tail(log)
    stopped_at = train_iters(out)[-1] + 1
    assert 3 <= stopped_at < SIGNAL_MAX_ITERS and (out / "latest").read_text().strip() == f"global_step{stopped_at}"
    assert (out / f"global_step{stopped_at}" / "ds_gpt_complete.json").is_file()


def test_mpirun_two_ranks(data_dir: Path, tmp_path: Path) -> None:
    """`mpirun -np 2 python ds_gpt/train.py`: ranks come from mpi4py (the mpich wheel's hydra)."""
    mpirun = VENV_BIN / "mpirun"
    if not mpirun.exists():
        pytest.skip("LOUD SKIP: no mpirun in the venv (requirements.txt installs the mpich wheel)")
    out = tmp_path / "out"
    env = job_env(MASTER_PORT=str(30000 + os.getpid() % 1000))
    shm_before = set(Path("/dev/shm").glob("mpich_shm_*"))
    proc = subprocess.run([str(mpirun), "-np", "2", PYTHON, "ds_gpt/train.py", "--deepspeed_config",
                           "ds_configs/zero1.json", "--data_dir", str(data_dir), "--out_dir", str(out), *TINY,
                           "--max_iters", "4", "--eval_interval", "2", "--checkpoint_interval", "2"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["launcher"] == "mpirun" and config["world_size"] == 2
    assert config["launch_env"]["master_port"] == int(env["MASTER_PORT"])
    assert train_iters(out) == [0, 1, 2, 3] and (out / "latest").read_text().strip() == "global_step4"
    # MPICH's shared-memory segment goes in MPI_Finalize; left behind, it holds RAM until reboot.
    # Another test worker's MPI job may hold one of its own for a moment: a leaked one stays.
    deadline = time.monotonic() + 20
    while (left := set(Path("/dev/shm").glob("mpich_shm_*")) - shm_before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"MPICH segments outlived the run: {sorted(left)}"
