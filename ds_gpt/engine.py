"""The DeepSpeed side of a run: the process group, the engine, and the device it runs on.

DeepSpeed is imported when a process group or an engine is built, not with this module: a run's
inputs are checked first (ds_gpt.startup), and `--help` or a bad flag costs no DeepSpeed start-up.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import warnings
from datetime import timedelta
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ds_gpt import build_locks, launch_env, ops, safe_load
from ds_gpt.collectives import all_gather_object
from ds_gpt.errors import UserError
from ds_gpt.launch_env import LaunchEnv
from ds_gpt.model import GPT
from ds_gpt.run_config import RunConfig

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


_lock_watcher: build_locks.StaleLockWatcher | None = None


def _stop_lock_watcher() -> None:
    global _lock_watcher
    if _lock_watcher is not None:
        _lock_watcher.stop()
        _lock_watcher = None


def init_distributed(timeout_s: int, env: LaunchEnv | None = None) -> LaunchEnv:
    """Join the process group as the launcher's environment says (`env`, or read it now).

    `timeout_s` bounds every collective: when a peer rank dies, the others fail with an error
    after this long instead of hanging until the job's time limit.
    """
    env = env or launch_env.detect()
    launch_env.export(env)
    global _lock_watcher
    # DeepSpeed loads (and if need be builds) its ops from here until the engine exists:
    # the CPU all-reduce in deepspeed.init_distributed, then the optimizer in build_engine.
    ops.put_venv_ninja_first()
    _lock_watcher = build_locks.watch()
    # DeepSpeed's INFO lines repeat on every rank; warnings and errors still show.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO all-gather calls torch.distributed.all_gather_into_tensor, which torch
    # deprecates with a FutureWarning on every rank: a note for DeepSpeed's developers, nothing
    # a user can act on. Only that one message is silenced.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Several CPU ranks on one node would each start one OpenMP thread per core; the spinning
        # oversubscribed threads then slow every rank down many times over. Share the cores.
        local_ranks = max(1, env.world_size // max(1, len(env.hosts)))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))
    timeout = timedelta(seconds=timeout_s)
    # DeepSpeed makes its own groups (ZeRO's data-parallel group clones the world) with
    # new_group(ranks), which takes torch's default timeout (30 min on gloo, 10 on NCCL), not
    # ours: a stalled peer would hold the gradient all-reduce that long. new_group reads its
    # default from these module globals, so they carry --pg_timeout to every later group.
    c10d.default_pg_timeout = timeout
    if c10d.default_pg_nccl_timeout is not None:
        c10d.default_pg_nccl_timeout = timeout
    import deepspeed

    with ops.build_errors_reported():  # on CPU it compiles its shared-memory all-reduce on first use
        deepspeed.init_distributed(
            auto_mpi_discovery=env.launcher == "mpirun",  # mpi4py tells ranks and the master address
            distributed_port=env.master_port,
            timeout=timeout,
            verbose=False,
        )
    if not torch.cuda.is_available():
        _unlink_shm_buffers(dist.get_rank())
    return env


def _unlink_shm_buffers(rank: int) -> None:
    """Remove the names of DeepSpeed's CPU shared-memory all-reduce buffers once every rank has mapped them.

    DeepSpeed's CPU comm op creates a /dev/shm segment per rank (69 MB) and never unlinks it:
    every CPU run would leave them behind until reboot, in RAM, and a test suite of many runs
    filled 22 GB of it. Each rank has opened every other rank's segment before
    init_distributed returns; after a barrier the names can go, and the memory is released
    when the last rank exits, SIGKILL included.
    """
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass  # not all ranks on one node: DeepSpeed did not create one


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def build_engine(model: GPT, run: RunConfig) -> DeepSpeedEngine:
    """Wrap the model in a DeepSpeed engine configured by the resolved JSON.

    The optimizer is built by DeepSpeed from the JSON (fused Adam on GPUs), over nanoGPT's
    two parameter groups, so weight decay skips biases and norms; with Muon, over the hidden
    matrices (Muon) and the rest (AdamW), each side at the JSON's settings.
    """
    import deepspeed

    groups = model.optimizer_param_groups(run.weight_decay, run.optimizer_sides)
    with ops.build_errors_reported():  # the optimizer's op (CPU Adam with offload, fused Adam on GPUs)
        with _muon_tags(model) if run.optimizer == "muon" else contextlib.nullcontext():
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=run.ds_config)
    if run.optimizer == "muon":
        _check_muon(engine, model)
    safe_load.install(engine)  # load_checkpoint reads weights only
    _stop_lock_watcher()  # every op this run uses is loaded
    if dist.get_world_size() == 1 and not engine.zero_optimization():
        # Alone, there is nothing to average, but ZeRO-0 would still copy every gradient into a
        # flat buffer, "all-reduce" it with itself, and copy it back, each step: 3% of a CPU step
        # at the benchmark's shape (docs/benchmarks.md). Dividing by one rank is exact, so the
        # gradients are the same bits without it. (ZeRO-1/2 move gradients into their partitions
        # in that reduction: they keep it.)
        engine.enable_backward_allreduce = False
    return engine


@contextlib.contextmanager
def _muon_tags(model: GPT) -> Iterator[None]:
    """Tag Muon's parameters (`use_muon`) as the model says, while deepspeed.initialize runs.

    DeepSpeed tags them itself inside initialize, just before it builds the optimizer, by name: a
    2-D parameter goes to Muon unless its name holds "embed" or "lm_head". GPT-2's embeddings are
    `wte` (tied to lm_head, and named after it) and `wpe`, so that rule puts both on Muon, which is
    meant for hidden matrices only. initialize offers no hook between its tagging and the optimizer,
    so ours runs right after DeepSpeed's, in its place, and the engine is checked afterwards.
    """
    import deepspeed

    hidden = {id(p) for p in model.muon_matrices()}
    deepspeeds_tagger = deepspeed.set_optimizer_flags

    def tag(config, module: torch.nn.Module) -> None:
        deepspeeds_tagger(config, module)  # also its per-head bookkeeping
        for p in module.parameters():
            p.use_muon = id(p) in hidden

    deepspeed.set_optimizer_flags = tag
    try:
        yield
    finally:
        deepspeed.set_optimizer_flags = deepspeeds_tagger


def _check_muon(engine: DeepSpeedEngine, model: GPT) -> None:
    """Muon's known silent failure is a model with nothing tagged (every step then AdamW/SGD): refuse to train."""
    hidden = {id(p) for p in model.muon_matrices()}
    wrong = [n for n, p in model.named_parameters() if getattr(p, "use_muon", None) is not (id(p) in hidden)]
    if wrong or not any(g.get("use_muon") for g in engine.optimizer.param_groups):
        raise UserError(f"DeepSpeed built Muon without the hidden matrices on its Muon side (mis-tagged: "
                        f"{', '.join(wrong[:3]) or 'no Muon group'})",
                        hint="this DeepSpeed tags parameters differently; train with AdamW (ds_configs/zero1.json)")


def set_lr(engine: DeepSpeedEngine, lrs: dict[str, float] | float) -> None:
    """Set each parameter group's learning rate: `lrs` by optimizer side (RunConfig.side_lrs), or one for all.

    DeepSpeed marks Muon's groups `use_muon`; every other group is on AdamW's side.
    """
    for group in engine.optimizer.param_groups:
        group["lr"] = lrs if isinstance(lrs, float) else lrs["muon" if group.get("use_muon") else "adam"]


def is_peer_failure(err: BaseException) -> bool:
    """Did a collective fail because another rank died or stalled past the process-group timeout?

    gloo and NCCL raise plain RuntimeErrors for both; their messages are the only tell.
    """
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "NCCL", "ProcessGroup",
        "gloo"))


def hostnames(env: LaunchEnv) -> list[str]:
    """The run's hosts. The launcher's list (SLURM's node names) when it names at least as many
    hosts as the ranks report; else what the ranks report, in rank order: outside SLURM, ranks
    started over ssh by `deepspeed --hostfile` only know their own host."""
    reported = list(dict.fromkeys(all_gather_object(socket.gethostname())))
    return list(env.hosts) if len(env.hosts) >= len(reported) else reported


def shutdown() -> None:
    """Tear the process group down before the interpreter does: left to exit, gloo's threads are
    destroyed mid-flight now and then and the rank aborts ("terminate called without an active
    exception"), turning a finished run into a failed one."""
    _stop_lock_watcher()
    if dist.is_initialized():
        dist.destroy_process_group()
    mpi = sys.modules.get("mpi4py.MPI")  # imported only under mpirun, by DeepSpeed's MPI discovery
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        # mpi4py finalizes at interpreter exit, which the trainer skips (errors.run_cli), and
        # MPICH removes its /dev/shm segment only in MPI_Finalize.
        mpi.Finalize()


def peak_memory_mb() -> float:
    """Peak device memory on CUDA; peak host RSS (VmHWM) on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open(f"/proc/{os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
