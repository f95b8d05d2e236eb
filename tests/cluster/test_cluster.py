"""Cluster launch on a real two-node SLURM cluster and real pdsh/ssh, on this one machine.

The session fixture runs `tests/cluster/local_cluster.sh up` (slurmctld + slurmd node1/node2,
munge, sshd on the aliases node1=127.0.0.2 and node2=127.0.0.3). Every job is a tiny model on
CPU with one rank per node, and each test checks the run directory (metrics.jsonl,
config.json, the checkpoint), not log text alone.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PYTHON, REPO_ROOT, VENV_BIN, read_jsonl, write_token_bins

CLUSTER_SH = Path(__file__).resolve().parent / "local_cluster.sh"
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--vocab_size", "512",
        "--dtype", "float32", "--micro_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--eval_iters", "2", "--log_interval", "1", "--warmup_iters", "2", "--lr_decay_iters", "100"]
# One rank per node: each slurmd "node" has one CPU; a100:1 is the local cluster's stand-in GPU.
SBATCH_TINY = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=a100:1", "--cpus-per-task=1",
               "--time=15"]
JOB_TIMEOUT_S = 600

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


# -----------------------------------------------------------------------------
# fixtures and helpers

@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: the local SLURM cluster needs root (tests/cluster/local_cluster.sh up)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("LOUD SKIP: the local SLURM cluster needs apt-get to install slurm, munge, sshd, pdsh")
    # A cluster someone brought up by hand stays up; one brought up here goes down afterwards.
    was_up = shutil.which("scontrol") is not None and \
        subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout.count("UP") > 0
    proc = subprocess.run(["bash", str(CLUSTER_SH), "up"], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(f"LOUD SKIP: this machine cannot host the local SLURM cluster: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"local_cluster.sh up failed:\n{proc.stdout}\n{proc.stderr}"
    yield
    if not was_up:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return write_token_bins(tmp_path_factory.mktemp("cluster_data"))


def job_env(**extra: str) -> dict[str, str]:
    """The submitting shell's environment: venv first on PATH, shared caches, no launcher marks."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "OMPI_", "PMI_", "PMIX_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env["VENV"] = str(VENV_BIN.parent)
    env["DS_GPT_PREFLIGHT"] = "0"  # these jobs test the launch; test_preflight.py and test_staging.py run it
    env.update(extra)
    return env


def sbatch(args: list[str], env: dict[str, str]) -> int:
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, check=True)
    return int(proc.stdout.strip().split(";")[0])


def job_info(job_id: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job_id: int, log: Path, timeout_s: float = JOB_TIMEOUT_S, nudge_requeued: bool = False) -> dict:
    """Poll until the job ends. A requeued job waits ~2 min (SLURM's BeginTime): `nudge_requeued` starts it now."""
    deadline = time.monotonic() + timeout_s
    requeued_at = None
    while time.monotonic() < deadline:
        info = job_info(job_id)
        state = info.get("JobState", "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        if nudge_requeued and state == "PENDING" and info.get("Reason") == "BeginTime":
            requeued_at = requeued_at or time.monotonic()
            # Not at once: slurmd refuses a credential issued in the second the old one was revoked.
            if time.monotonic() - requeued_at > 3:
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        time.sleep(1)
    subprocess.run(["scancel", str(job_id)])
    pytest.fail(f"job {job_id} still {job_info(job_id).get('JobState')} after {timeout_s}s; log:\n{tail(log)}")


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else f"(no {path})"


def wait_until_training(job_id: int, out: Path, log: Path, iters: int = 3) -> None:
    """Wait until the job has logged `iters` training iterations, failing if it ends first."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not ((out / "metrics.jsonl").exists() and len(train_iters(out)) >= iters):
        assert time.monotonic() < deadline and job_info(job_id).get("JobState") in ("PENDING", "RUNNING"), tail(log)
        time.sleep(0.5)


def train_iters(out: Path) -> list[int]:
    return [e["iter"] for e in read_jsonl(out / "metrics.jsonl") if "loss" in e and "event" not in e]


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
# the harness itself

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

def test_sbatch_mode_a_deepspeed_launcher(cluster, data_dir: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "job.out"
    job = sbatch([*SBATCH_TINY, f"--output={log}", "slurm/ds_train.sh", *TINY, "--max_iters", "6",
                  "--eval_interval", "3", "--checkpoint_interval", "3"],
                 job_env(DATA_DIR=str(data_dir), OUT_DIR=str(out)))
    info = wait_job(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    assert_two_node_run(out, "deepspeed", max_iters=6)
    assert not list((REPO_ROOT / "hostfiles").glob(f"{job}*")), "the job's hostfile and env file go with the job"
    text = log.read_text()
    assert "ds_train.sh: hostfile: node1 slots=1,node2 slots=1" in text
    assert "node1:" in text and "node2:" in text  # pdsh prefixes each node's output with its name


def test_sbatch_mode_b_srun(cluster, data_dir: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "job.out"
    job = sbatch([*SBATCH_TINY, f"--output={log}", "slurm/ds_train.sh", *TINY, "--max_iters", "6",
                  "--eval_interval", "3", "--checkpoint_interval", "3"],
                 job_env(DS_GPT_LAUNCH="srun", DATA_DIR=str(data_dir), OUT_DIR=str(out)))
    info = wait_job(job, log)
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


@pytest.mark.parametrize("mode,scancel", [
    ("deepspeed", ["--batch", "--signal=USR1"]),  # `#SBATCH --signal=B:USR1@120`, before the time limit
    ("srun", ["--batch", "--signal=USR1"]),
    ("srun", ["--signal=TERM"]),  # pre-emption's first signal: SIGTERM to the job's steps
])
def test_signal_checkpoints_requeues_and_resumes(cluster, data_dir: Path, tmp_path: Path, mode: str,
                                                 scancel: list[str]) -> None:
    """A signal mid-run -> checkpoint -> exit 75 -> scontrol requeue -> resume -> done."""
    out, log = tmp_path / "out", tmp_path / "job.out"
    max_iters = 300  # long enough that the signal, relayed through pdsh, lands mid-run
    job = sbatch([*SBATCH_TINY, f"--output={log}", "slurm/ds_train.sh", *TINY, "--max_iters", str(max_iters),
                  "--eval_interval", "1000", "--checkpoint_interval", "1000"],
                 job_env(DS_GPT_LAUNCH=mode, DATA_DIR=str(data_dir), OUT_DIR=str(out)))
    wait_until_training(job, out, log)
    subprocess.run(["scancel", *scancel, str(job)], check=True)

    info = wait_job(job, log, nudge_requeued=True)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    assert info["Restarts"] == "1", tail(log)

    starts = [e for e in read_jsonl(out / "metrics.jsonl") if e.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["resumed_from"] is None
    stopped_at = starts[1]["iter"]  # the checkpoint the signal made
    assert starts[1]["resumed_from"] == f"global_step{stopped_at}" and 3 <= stopped_at < max_iters
    assert (out / f"global_step{stopped_at}").is_dir()
    iters = train_iters(out)
    first_run, second_run = iters[:iters.index(stopped_at - 1) + 1], iters[iters.index(stopped_at - 1) + 1:]
    assert first_run == list(range(stopped_at)), "the first run logs 0..k-1, then checkpoints at k"
    assert second_run == list(range(stopped_at, max_iters)), "the requeued run continues at k, not at 0"
    assert (out / "latest").read_text().strip() == f"global_step{max_iters}"
    text = log.read_text()
    assert "requeueing job" in text and "restart 1" in text


def test_scancel_saves_a_checkpoint_and_does_not_requeue(cluster, data_dir: Path, tmp_path: Path) -> None:
    """Mode A: a plain scancel (SIGTERM to every process of the job, SIGKILL after KillWait) stops
    the ranks at a checkpoint; the launcher, shielded, does not kill them first. No requeue."""
    out, log = tmp_path / "out", tmp_path / "job.out"
    job = sbatch([*SBATCH_TINY, f"--output={log}", "slurm/ds_train.sh", *TINY, "--max_iters", "300",
                  "--eval_interval", "1000", "--checkpoint_interval", "1000"],
                 job_env(DATA_DIR=str(data_dir), OUT_DIR=str(out)))
    wait_until_training(job, out, log)
    subprocess.run(["scancel", str(job)], check=True)
    wait_job(job, log)
    deadline = time.monotonic() + 60
    while "not requeueing" not in log.read_text():  # the batch script may still be finishing its log
        assert time.monotonic() < deadline, tail(log)
        time.sleep(0.5)
    time.sleep(3)  # a requeue, if one were (wrongly) made, shows within moments
    info = job_info(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", tail(log)
    stopped_at = train_iters(out)[-1] + 1
    assert 3 <= stopped_at < 300 and (out / "latest").read_text().strip() == f"global_step{stopped_at}"
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
    # MPICH's shared-memory segment goes in MPI_Finalize; left behind, it holds RAM until reboot
    assert set(Path("/dev/shm").glob("mpich_shm_*")) <= shm_before
