"""ds_gpt.launch_env: each launcher's variables -> one LaunchEnv, and back to torch's env://.

The environments below are what each launcher really sets (deepspeed/launcher/launch.py,
torchrun, srun and sbatch on the local SLURM cluster, MPICH's hydra); the last tests start
the real launchers.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import VENV_BIN

from ds_gpt.errors import UserError
from ds_gpt.launch_env import LaunchEnv, detect, export, slurm_port

REPO_ROOT = Path(__file__).resolve().parent.parent

# The batch shell of `sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=a100:1` (no step id).
SBATCH = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_PROCID": "0",
          "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
          "SLURM_GPUS_ON_NODE": "1", "SLURM_TASKS_PER_NODE": "1(x2)"}
# Task 1 of `srun` inside that job.
SRUN_TASK1 = {**SBATCH, "SLURM_PROCID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
              "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2"}
# Rank 5 of `deepspeed --hostfile` over 2 nodes x 4 slots, started inside that sbatch job.
DEEPSPEED_RANK5 = {**SBATCH, "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "node1",
                   "MASTER_PORT": "29500", "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "4"}
TORCHRUN_RANK3 = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1",
                  "MASTER_PORT": "1234", "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "TORCHELASTIC_RUN_ID": "none", "ROLE_RANK": "3"}
HYDRA_RANK1 = {"PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "9", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
OMPI_RANK3 = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
              "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}


def test_deepspeed_launcher_wins_over_the_sbatch_environment() -> None:
    env = detect(DEEPSPEED_RANK5)
    assert env == LaunchEnv("deepspeed", rank=5, local_rank=1, world_size=8, master_addr="node1",
                            master_port=29500, node_rank=1, hosts=("node1", "node2"))


def test_deepspeed_single_node_in_a_two_node_allocation_does_not_claim_both_hosts() -> None:
    env = detect({**DEEPSPEED_RANK5, "RANK": "1", "WORLD_SIZE": "4", "CROSS_RANK": "0", "CROSS_SIZE": "1"})
    assert env.hosts != ("node1", "node2") and len(env.hosts) == 1


def test_torchrun() -> None:
    env = detect(TORCHRUN_RANK3)
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.node_rank) == ("torchrun", 3, 1, 4, 1)
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 1234)


def test_srun_task() -> None:
    env = detect(SRUN_TASK1)
    assert env == LaunchEnv("srun", rank=1, local_rank=0, world_size=2, master_addr="node1",
                            master_port=slurm_port(SRUN_TASK1), node_rank=1, hosts=("node1", "node2"))
    assert 20000 <= env.master_port < 40000


def test_srun_port_is_per_job_and_step_and_master_port_overrides() -> None:
    ports = {slurm_port({**SRUN_TASK1, "SLURM_JOB_ID": str(j), "SLURM_STEP_ID": str(s)})
             for j in (4242, 4243) for s in (0, 1)}
    assert len(ports) == 4
    assert detect({**SRUN_TASK1, "MASTER_PORT": "31000", "MASTER_ADDR": "ib-node1"}).master_port == 31000
    assert detect({**SRUN_TASK1, "MASTER_ADDR": "ib-node1"}).master_addr == "ib-node1"


def test_sbatch_shell_is_not_an_srun_rank() -> None:
    # Inside the batch script SLURM_PROCID=0 is set but describes the batch shell.
    env = detect(SBATCH)
    assert (env.launcher, env.rank, env.world_size) == ("single", 0, 1)
    assert detect({**SBATCH, "SLURM_STEP_ID": str(0xFFFFFFFB)}).launcher == "single"  # the batch step


def test_mpich_hydra() -> None:
    env = detect(HYDRA_RANK1)
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.node_rank) == ("mpirun", 1, 1, 2, 0)
    assert env.master_addr == ""  # DeepSpeed's mpi4py discovery broadcasts rank 0's address


def test_open_mpi_across_nodes() -> None:
    env = detect(OMPI_RANK3)
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.node_rank) == ("mpirun", 3, 1, 4, 1)


def test_mpirun_inside_an_allocation_counts_ranks_not_daemons() -> None:
    # Hydra starts one proxy per node with srun: SLURM_PROCID numbers proxies, not ranks.
    proxy_env = {**SRUN_TASK1, "SLURM_PROCID": "0", "SLURM_NODEID": "0", **OMPI_RANK3}
    env = detect(proxy_env)
    assert (env.launcher, env.rank, env.world_size) == ("mpirun", 3, 4)
    # A direct `srun --mpi=pmix` launch: both agree, and srun's view (with an address) is kept.
    assert detect({**SRUN_TASK1, "PMIX_RANK": "1"}).launcher == "srun"


def test_single_process() -> None:
    env = detect({})
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.master_addr) == ("single", 0, 0, 1, "127.0.0.1")
    assert 0 < env.master_port < 65536


def test_hand_set_env_rendezvous_is_honoured() -> None:
    env = detect({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "5"})
    assert (env.launcher, env.rank, env.world_size) == ("torchrun", 1, 2)


@pytest.mark.parametrize("environ, match", [
    ({**DEEPSPEED_RANK5, "RANK": "five"}, "RANK='five'"),
    ({**DEEPSPEED_RANK5, "RANK": "8"}, "rank 8 is outside"),
    ({**DEEPSPEED_RANK5, "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({k: v for k, v in DEEPSPEED_RANK5.items() if k != "MASTER_ADDR"}, "MASTER_ADDR is not set"),
    ({**SRUN_TASK1, "SLURM_STEP_NODELIST": "node[1-"}, "node list"),
    ({**SRUN_TASK1, "SLURM_PROCID": "2"}, "rank 2 is outside"),
    ({**SRUN_TASK1, "SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID='abc'"),
    ({**HYDRA_RANK1, "PMI_SIZE": "0"}, "world size 0"),
    ({"WORLD_SIZE": "1", "RANK": "-1"}, "rank -1"),
])
def test_bad_values_are_user_errors(environ: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        detect(environ)


def test_export_for_launchers_that_do_not_set_torch_variables() -> None:
    environ = dict(SRUN_TASK1)
    export(detect(environ), environ)
    assert {k: environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == \
        {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "node1"}
    assert detect(environ).launcher == "srun"  # idempotent: a second detect sees the same launcher

    single: dict[str, str] = {}
    export(detect(single), single)
    assert single["RANK"] == "0" and single["WORLD_SIZE"] == "1" and detect(single).launcher == "single"


def test_export_leaves_deepspeed_alone_and_mpirun_to_mpi4py() -> None:
    environ = dict(DEEPSPEED_RANK5)
    export(detect(environ), environ)
    assert environ == DEEPSPEED_RANK5

    # A stale RANK from the user's shell would stop DeepSpeed's mpi4py discovery: it goes.
    environ = {**HYDRA_RANK1, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "x", "MASTER_PORT": "29611"}
    export(detect(environ), environ)
    assert "RANK" not in environ and "WORLD_SIZE" not in environ and "MASTER_ADDR" not in environ
    assert environ["MASTER_PORT"] == "29611"


def test_to_dict_is_json() -> None:
    d = detect(SRUN_TASK1).to_dict()
    assert json.loads(json.dumps(d))["hosts"] == ["node1", "node2"] and d["launcher"] == "srun"


# -----------------------------------------------------------------------------
# the real launchers

def _clean_env() -> dict[str, str]:
    """This process's environment without any launcher's marks (pytest may itself run under one)."""
    drop = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE",
              "LOCAL_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    return env


def _ranks(cmd: list[str]) -> list[dict]:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                  key=lambda d: d["rank"])


def test_real_mpirun() -> None:
    if shutil.which("mpirun", path=str(VENV_BIN)) is None:
        pytest.skip("no mpirun in the venv (pip install mpich)")
    ranks = _ranks([str(VENV_BIN / "mpirun"), "-np", "2", sys.executable, "-m", "ds_gpt.launch_env"])
    assert [(r["launcher"], r["rank"], r["local_rank"], r["world_size"]) for r in ranks] == \
        [("mpirun", 0, 0, 2), ("mpirun", 1, 1, 2)]


@pytest.mark.slow
def test_real_deepspeed_launcher() -> None:
    ranks = _ranks([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29731",
                    "--no_local_rank", "--module", "ds_gpt.launch_env"])
    assert [(r["launcher"], r["rank"], r["world_size"], r["master_port"]) for r in ranks] == \
        [("deepspeed", 0, 2, 29731), ("deepspeed", 1, 2, 29731)]


@pytest.mark.slow
def test_real_torchrun() -> None:
    ranks = _ranks([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29733",
                    "-m", "ds_gpt.launch_env"])
    assert [(r["launcher"], r["rank"], r["world_size"]) for r in ranks] == [("torchrun", 0, 2), ("torchrun", 1, 2)]
