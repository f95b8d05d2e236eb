"""Who am I? Rank, local rank, world size and rendezvous address, from the launcher's environment.

Every launcher describes a process differently:
  deepspeed   RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT, plus its own CROSS_RANK,
              CROSS_SIZE and LOCAL_SIZE (deepspeed/launcher/launch.py)
  torchrun    the same five, plus TORCHELASTIC_RUN_ID, GROUP_RANK, LOCAL_WORLD_SIZE
  srun        SLURM_PROCID SLURM_LOCALID SLURM_NTASKS SLURM_NODEID SLURM_STEP_NODELIST; no
              rendezvous address at all (the reference run mapped these by hand)
  mpirun      OMPI_COMM_WORLD_* (Open MPI), PMI_RANK/PMI_SIZE (MPICH/Intel hydra), PMIX_RANK
  single      nothing

`detect` is the only function in ds_gpt that reads these variables. `export` then writes the
torch env:// variables for the launchers that do not set them, so DeepSpeed's
`init_distributed` sees one contract whatever started us.

    python -m ds_gpt.launch_env     # print what this process would detect, as JSON
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from typing import Mapping, MutableMapping

from ds_gpt.errors import UserError, run_cli
from ds_gpt.hostfile import expand_nodelist

LAUNCHERS = ("deepspeed", "srun", "torchrun", "mpirun", "single")
DEFAULT_MPI_PORT = 29500  # DeepSpeed's TORCH_DISTRIBUTED_DEFAULT_PORT
# SLURM's special step ids (batch script, extern, interactive ...) are all >= this value:
# inside `sbatch` or `salloc` SLURM_PROCID=0 describes the batch shell, not a rank of ours.
_SLURM_SPECIAL_STEP = 0xFFFFFFF0
_TORCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # one of LAUNCHERS
    rank: int  # global rank, 0 .. world_size-1
    local_rank: int  # rank on this node (picks the GPU)
    world_size: int
    master_addr: str  # rank 0's address; "" under mpirun: DeepSpeed's mpi4py discovery finds it
    master_port: int
    node_rank: int
    hosts: tuple[str, ...]  # node names when known (SLURM node list), else (this hostname,)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hosts"] = list(self.hosts)
        return d


# -----------------------------------------------------------------------------
# reading values


def _int(environ: Mapping[str, str], *names: str, default: int | None = None) -> int:
    """The first of `names` that is set, as an int; a UserError naming the variable if it is not one."""
    for name in names:
        value = environ.get(name)
        if value is None or value == "":
            continue
        try:
            return int(value.strip())
        except ValueError:
            raise UserError(f"environment variable {name}={value!r} is not an integer") from None
    if default is None:
        raise UserError(f"none of {', '.join(names)} is set in the environment")
    return default


def _port(environ: Mapping[str, str], fallback: int) -> int:
    port = _int(environ, "MASTER_PORT", default=fallback)
    if not 1 <= port <= 65535:
        raise UserError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return port


def free_port() -> int:
    """A port nobody listens on right now (single process: no one else needs to agree on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_port(environ: Mapping[str, str]) -> int:
    """A rendezvous port every rank of a SLURM job step computes alike, without talking.

    Two jobs (or two steps of one job) sharing a node get different ports.
    """
    job = _int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    step = _int(environ, "SLURM_STEP_ID", "SLURM_STEPID", default=0)
    if step >= _SLURM_SPECIAL_STEP:
        step = 0
    return 20000 + (job * 10 + step) % 20000


def _slurm_hosts(environ: Mapping[str, str], step: bool) -> tuple[str, ...] | None:
    names = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if step else \
        ("SLURM_JOB_NODELIST", "SLURM_NODELIST")
    for name in names:
        if environ.get(name):
            return tuple(expand_nodelist(environ[name]))
    return None


def _in_srun_step(environ: Mapping[str, str]) -> bool:
    if "SLURM_PROCID" not in environ:
        return False
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID"))
    if step is None or not step.strip().isdigit():
        return False
    return int(step) < _SLURM_SPECIAL_STEP


def _mpi_rank_size(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(rank, size) from an MPI launcher's variables, or None when no MPI launcher started us."""
    for rank_var, size_vars in (("OMPI_COMM_WORLD_RANK", ("OMPI_COMM_WORLD_SIZE",)),
                                ("PMI_RANK", ("PMI_SIZE",)),
                                ("PMIX_RANK", ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS",
                                               "WORLD_SIZE"))):
        if environ.get(rank_var):
            return _int(environ, rank_var), _int(environ, *size_vars)
    return None


# -----------------------------------------------------------------------------
# one reader per launcher


def _from_torch_env(environ: Mapping[str, str], launcher: str, node_rank_var: str) -> LaunchEnv:
    """deepspeed and torchrun both set torch's env:// variables; they differ in their extras."""
    for name in _TORCH_VARS:
        if not environ.get(name):
            raise UserError(f"{launcher} launcher detected but {name} is not set")
    node_rank = _int(environ, node_rank_var, default=0)
    if launcher == "deepspeed":
        n_nodes = _int(environ, "CROSS_SIZE", default=1)
    else:
        n_nodes = _int(environ, "WORLD_SIZE") // max(_int(environ, "LOCAL_WORLD_SIZE", default=0), 1) or 1
    # The SLURM node list names our nodes only when we span exactly that allocation.
    hosts = _slurm_hosts(environ, step=False)
    if hosts is None or len(hosts) != n_nodes:
        hosts = (socket.gethostname(),)
    return LaunchEnv(launcher=launcher, rank=_int(environ, "RANK"), local_rank=_int(environ, "LOCAL_RANK"),
                     world_size=_int(environ, "WORLD_SIZE"), master_addr=environ["MASTER_ADDR"],
                     master_port=_port(environ, 0), node_rank=node_rank, hosts=hosts)


def _from_srun(environ: Mapping[str, str]) -> LaunchEnv:
    hosts = _slurm_hosts(environ, step=True) or (socket.gethostname(),)
    return LaunchEnv(launcher="srun", rank=_int(environ, "SLURM_PROCID"),
                     local_rank=_int(environ, "SLURM_LOCALID"),
                     world_size=_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
                     # rank 0 runs on the step's first node under every srun distribution
                     master_addr=environ.get("MASTER_ADDR") or hosts[0],
                     master_port=_port(environ, slurm_port(environ)),
                     node_rank=_int(environ, "SLURM_NODEID", default=0), hosts=hosts)


def _from_mpi(environ: Mapping[str, str], rank: int, size: int) -> LaunchEnv:
    local_rank = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK",
                      default=rank)  # no local-rank variable: assume one node
    local_size = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=size)
    # mpirun's default mapping fills a node's slots before the next node (by slot).
    node_rank = rank // local_size if local_size > 0 else 0
    hosts = (socket.gethostname(),)
    if local_size != size and "SLURM_JOB_ID" in environ:
        hosts = _slurm_hosts(environ, step=False) or hosts
    port = _port(environ, slurm_port(environ) if environ.get("SLURM_JOB_ID") else DEFAULT_MPI_PORT)
    return LaunchEnv(launcher="mpirun", rank=rank, local_rank=local_rank, world_size=size,
                     master_addr="", master_port=port, node_rank=node_rank, hosts=hosts)


def _from_plain_env(environ: Mapping[str, str]) -> LaunchEnv:
    """No launcher's marks. Honour a hand-set env:// rendezvous (torch's contract), else one process."""
    if all(environ.get(name) for name in _TORCH_VARS) and _int(environ, "WORLD_SIZE") > 1:
        return _from_torch_env(environ, "torchrun", "GROUP_RANK")
    return LaunchEnv(launcher="single", rank=_int(environ, "RANK", default=0),
                     local_rank=_int(environ, "LOCAL_RANK", default=0),
                     world_size=_int(environ, "WORLD_SIZE", default=1),
                     master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
                     master_port=_port(environ, 0) if environ.get("MASTER_PORT") else free_port(),
                     node_rank=0, hosts=(socket.gethostname(),))


def _check(env: LaunchEnv) -> LaunchEnv:
    where = f"launcher {env.launcher}"
    if env.world_size < 1:
        raise UserError(f"{where}: world size {env.world_size} must be at least 1")
    if not 0 <= env.rank < env.world_size:
        raise UserError(f"{where}: rank {env.rank} is outside 0..{env.world_size - 1}")
    if not 0 <= env.local_rank < env.world_size:
        raise UserError(f"{where}: local rank {env.local_rank} is outside 0..{env.world_size - 1}")
    if env.node_rank < 0:
        raise UserError(f"{where}: node rank {env.node_rank} is negative")
    if not env.master_addr and env.launcher != "mpirun":
        raise UserError(f"{where}: no master address", hint="set MASTER_ADDR")
    if not 1 <= env.master_port <= 65535:
        raise UserError(f"{where}: master port {env.master_port} is not a TCP port")
    return env


# -----------------------------------------------------------------------------
# public API


def detect(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Recognise the launcher that started this process and read its rank variables.

    Order matters. The deepspeed launcher and torchrun run inside sbatch jobs too, where the
    batch shell's SLURM_* variables are inherited: their own marks win. An MPI launcher inside
    an allocation starts its daemons with srun, so SLURM_PROCID then counts daemons, not
    ranks: the MPI rank wins unless both agree (a direct `srun --mpi=pmix` launch).
    """
    environ = os.environ if environ is None else environ
    if "CROSS_RANK" in environ and "LOCAL_SIZE" in environ and "RANK" in environ:
        return _check(_from_torch_env(environ, "deepspeed", "CROSS_RANK"))
    if "TORCHELASTIC_RUN_ID" in environ or "GROUP_RANK" in environ:
        return _check(_from_torch_env(environ, "torchrun", "GROUP_RANK"))
    mpi = _mpi_rank_size(environ)
    if _in_srun_step(environ):
        srun = _from_srun(environ)
        if mpi is None or mpi == (srun.rank, srun.world_size):
            return _check(srun)
    if mpi is not None:
        return _check(_from_mpi(environ, *mpi))
    return _check(_from_plain_env(environ))


def export(env: LaunchEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Write torch's env:// variables where the launcher did not, before init_distributed.

    deepspeed and torchrun already set them. Under mpirun they must stay unset (stale ones
    removed) so DeepSpeed's mpi4py discovery runs; it reads MASTER_PORT only through
    `init_distributed(distributed_port=env.master_port)`, but we set it for everyone else.
    """
    environ = os.environ if environ is None else environ
    if env.launcher in ("deepspeed", "torchrun"):
        return
    if env.launcher == "mpirun":
        if environ.get("RANK") != str(env.rank) or environ.get("WORLD_SIZE") != str(env.world_size):
            for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
                environ.pop(name, None)
        environ["MASTER_PORT"] = str(env.master_port)
        return
    environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.world_size),
                   MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))


def main() -> int:
    # One write() per line: ranks sharing a pipe (and `python -u`) must not interleave.
    os.write(1, (json.dumps(detect().to_dict()) + "\n").encode())
    return 0


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.launch_env")
