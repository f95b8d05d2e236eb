"""What a DeepSpeed rank really holds and sends: the measured side of the planner (ds_gpt.plan).

    state = state_bytes_per_rank(engine)      # {"params": B, "grads": B, "optimizer": B}
    counter = CommBytesCounter(); counter.start(); ...one step...; sent = counter.stop()

`state_bytes_per_rank` reads the tensors the engine, its ZeRO/bf16 optimizer wrapper and the
torch optimizer inside hold on this rank, each storage counted once (views share one), with
DeepSpeed's alignment padding, and sorts them into three keys:

- params: the model's weights in their training dtype (bf16 or fp32): every parameter's
  storage (ZeRO-0..2: the whole model; ZeRO-1/2 keep it as one padded flat buffer per
  optimizer group), ZeRO-3's partitions (`ds_tensor`) and the small parameters it keeps whole
  on every rank (`stage3_param_persistence_threshold`).
- optimizer: what the torch optimizer owns: its parameters when they are not the model's (the
  fp32 master weights of bf16 training, whole or ZeRO-partitioned) and its state (AdamW's
  exp_avg, exp_avg_sq and step counters).
- grads: every other tensor reached through a gradient: `.grad` of the model's and of the
  optimizer's parameters, DeepSpeed's gradient buffers and partitions (averaged_gradients,
  all_grad_tensors, grads_in_partition, grad_partitions_flat_buffer, grad_accum) and its
  reduction buckets (ipg_buckets). A partition's gradient that is a slice of a larger
  parameter's gradient keeps that whole gradient alive, and counts whole.

Only tensors on the engine's device count (the GPU; on a CPU run, the CPU): what ZeRO-Offload
keeps in host memory is left out. Gradients and AdamW's state come and go within an iteration,
so the figures depend on when they are read. The planner models one moment, and so should the
caller: after the backward of an iteration's last micro-batch, right before its engine.step(),
from the second iteration on (AdamW creates its state in the first step).

`CommBytesCounter` counts, per collective, the message sizes deepspeed.comm's own logger
records for this rank (its `comms_logger`): for all_reduce the buffer reduced, for
reduce_scatter the whole input, for all_gather this rank's input (its share); times the
number of calls.
"""
from __future__ import annotations

import torch

KEYS = ("params", "grads", "optimizer")
# Attribute names on the path to a tensor that make it gradient storage (DeepSpeed's names).
_GRAD_NAMES = ("grad", "ipg")


def _storage(t: torch.Tensor) -> tuple[tuple, int]:
    st = t.untyped_storage()
    return (t.device.type, t.device.index, st.data_ptr()), st.nbytes()


def _reachable_tensors(root) -> dict[tuple, tuple[int, torch.device, bool]]:
    """{storage key: (nbytes, device, reached through a gradient)} for every tensor reachable
    from `root` through attributes, containers and tensor attributes DeepSpeed sets.

    Walked by hand: DeepSpeed keeps its buffers in plain attributes of several objects
    (engine, optimizer wrapper, parameter coordinator, per-parameter mappings), and no API of
    its lists them all. Only DeepSpeed's, torch's and our own objects are entered.
    """
    found: dict[tuple, tuple[int, torch.device, bool]] = {}
    seen: set[tuple[int, bool]] = set()  # an object is walked once as gradient storage and once not
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        obj, via_grad = stack.pop()
        if isinstance(obj, torch.Tensor):
            if (id(obj), via_grad) in seen:
                continue
            seen.add((id(obj), via_grad))
            if obj.device.type != "meta":
                key, nbytes = _storage(obj)
                if nbytes:
                    old = found.get(key)
                    found[key] = (nbytes, obj.device, via_grad or (old is not None and old[2]))
            if obj.is_leaf and obj.grad is not None:
                stack.append((obj.grad, True))
            for name in ("ds_tensor", "grad_accum", "_hp_mapping"):
                value = getattr(obj, name, None)
                if value is not None:
                    stack.append((value, via_grad or name == "grad_accum"))
            continue
        if (id(obj), via_grad) in seen:
            continue
        seen.add((id(obj), via_grad))
        if isinstance(obj, dict):
            items = obj.items()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = ((None, v) for v in obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch", "ds_gpt"):
            items = vars(obj).items()
        else:
            continue
        for name, value in items:
            if isinstance(value, (str, bytes, int, float, bool, type(None))):
                continue
            grad_name = isinstance(name, str) and any(g in name.lower() for g in _GRAD_NAMES)
            stack.append((value, via_grad or grad_name))
    return found


def _storages_of(tensors) -> set[tuple]:
    return {_storage(t)[0] for t in tensors if isinstance(t, torch.Tensor) and t.device.type != "meta"}


def state_bytes_per_rank(engine) -> dict[str, int]:
    """{"params", "grads", "optimizer"}: bytes this rank holds on its device (module docstring)."""
    module_params = list(engine.module.parameters())
    param_keys = _storages_of(module_params) | _storages_of(
        getattr(p, "ds_tensor", None) for p in module_params)
    torch_opt = getattr(engine, "basic_optimizer", None) or engine.optimizer
    opt_tensors = [p for g in torch_opt.param_groups for p in g["params"]]
    opt_tensors += [v for state in torch_opt.state.values() for v in state.values()]
    # ZeRO-3's fp32 master partitions are also reachable outside the torch optimizer's groups.
    opt_tensors += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    opt_keys = _storages_of(opt_tensors) - param_keys
    device = _engine_device(engine, module_params)
    totals = dict.fromkeys(KEYS, 0)
    for key, (nbytes, dev, via_grad) in _reachable_tensors(engine).items():
        if dev.type != device.type:
            continue
        if key in param_keys:
            totals["params"] += nbytes
        elif key in opt_keys:
            totals["optimizer"] += nbytes
        elif via_grad:
            totals["grads"] += nbytes
    return totals


def _engine_device(engine, module_params) -> torch.device:
    device = getattr(engine, "device", None)
    if isinstance(device, (str, torch.device)):
        return torch.device(device)
    return module_params[0].device if module_params else torch.device("cpu")


# -----------------------------------------------------------------------------
# Communication, as deepspeed.comm's logger records it

# deepspeed.comm op names -> the collective they are.
COLLECTIVES = {
    "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "inference_all_reduce": "all_reduce",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter": "reduce_scatter",
    "all_gather_into_tensor": "all_gather", "all_gather": "all_gather", "allgather_fn": "all_gather",
    "broadcast": "broadcast",
}


class CommBytesCounter:
    """Bytes per collective this rank passed to deepspeed.comm between start() and stop().

    Turns DeepSpeed's comms logger on for every op while counting and restores it after. The
    logger synchronizes the device after each op it times, so wrap one step (e.g. the profiled
    one), not a whole run. Ops other than the four collectives (barriers, sends) go under "other".
    """

    def __init__(self):
        self._before: dict[tuple[str, int], int] | None = None
        self._saved: tuple | None = None

    @staticmethod
    def _counts() -> dict[tuple[str, int], int]:
        from deepspeed.comm import comm

        return {(name, size): record[0] for name, sizes in comm.comms_logger.comms_dict.items()
                for size, record in sizes.items()}

    def start(self) -> None:
        from deepspeed.comm import comm

        log = comm.comms_logger
        self._saved = (log.enabled, log.prof_all, log.verbose)
        log.enabled, log.prof_all, log.verbose = True, True, False
        self._before = self._counts()

    def stop(self) -> dict[str, int]:
        """{"all_reduce", "reduce_scatter", "all_gather", "broadcast", "other", "total"}: bytes."""
        from deepspeed.comm import comm

        if self._before is None:
            raise RuntimeError("CommBytesCounter.stop() without start()")
        after = self._counts()
        log = comm.comms_logger
        log.enabled, log.prof_all, log.verbose = self._saved
        out = dict.fromkeys((*dict.fromkeys(COLLECTIVES.values()), "other"), 0)
        for (name, size), count in after.items():
            calls = count - self._before.get((name, size), 0)
            op = name.split(" | ")[0].strip()  # with the logger's debug on: "op | [Caller Func: f]"
            out[COLLECTIVES.get(op, "other")] += calls * size
        self._before = None
        out["total"] = sum(out.values())
        return out
