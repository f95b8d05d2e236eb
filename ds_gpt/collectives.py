"""The few collectives a run needs besides DeepSpeed's own: a sum of a few numbers, a gather, a barrier.

The loop, the checkpointer and the elastic resume all use them, so they live here, below all
three; every rank calls each one. `Collectives` bundles them so that a checkpointer can be given
one-rank stand-ins where no process group exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


def all_reduce_sum(values: list[float] | torch.Tensor) -> list[float]:
    """Sum a few numbers over all ranks in one collective (loss, counts, flags), read back to the host.

    A tensor already on the device stays there for the collective: reading the result is the
    one device-to-host sync of a training step.
    """
    comm_device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # "cuda": the rank's current device
    t = torch.as_tensor(values, dtype=torch.float64).to(comm_device)
    if dist.get_world_size() > 1:  # alone, the sum is the values: no round trip through the backend
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_object(obj: object) -> list:
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    dist.barrier()


@dataclass
class Collectives:
    """The few collectives a save needs, passed in so that the checkpointer stays testable."""

    all_reduce_sum: Callable[[list[float]], list[float]]
    barrier: Callable[[], None]
    all_gather_object: Callable[[object], list]


def of_process_group() -> Collectives:
    """The collectives over the run's process group (ds_gpt.engine.init_distributed joins it)."""
    return Collectives(all_reduce_sum=all_reduce_sum, barrier=barrier, all_gather_object=all_gather_object)
