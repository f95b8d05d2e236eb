"""Where a training step's time goes: the model's own work, and everything around it.

A wall-clock ratio between two loops on a shared machine moves by several percent from one
minute to the next. A fraction of one step's own time moves much less: load from other jobs
slows the model's kernels and the Python around them alike. So each loop runs a few steps under
torch.profiler, and every step is split into

- forward: the model module's call (between a forward pre-hook and a forward hook on it);
- backward: the autograd engine's node evaluations (`autograd::engine::evaluate_function: ...`),
  which include whatever hooks run inside them;
- optimizer: the update (gradient clipping, the optimizer's step, zeroing the gradients): the
  plain loop's `update` and DeepSpeed's `_take_model_step`;
- overhead: the rest of the step's wall time: the Python of the loop and of the engine, hooks
  and bookkeeping outside the model, tensor operations the model does not need (a gradient
  copy, a finiteness check), collectives, timers and logging.

On CUDA the same split is of the host's time; `gpu_idle_fraction` adds the part of the step in
which no kernel ran on the GPU, which is what host overhead costs there.
"""
from __future__ import annotations

import bisect
import contextlib
import statistics
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

STEP, FORWARD, UPDATE = "ds_gpt.bench: step", "ds_gpt.bench: forward", "ds_gpt.bench: optimizer"
BACKWARD_PREFIX = "autograd::engine::evaluate_function:"
PARTS = ("forward", "backward", "optimizer")


@contextlib.contextmanager
def marked_forward(module: torch.nn.Module) -> Iterator[None]:
    """A profiler range around every call of `module`, tight around its own forward: the pre-hook
    goes after any other (DeepSpeed's prologue), the hook before any other (its epilogue)."""
    ranges: list[record_function] = []

    def enter(*_):
        ranges.append(record_function(FORWARD).__enter__())

    def leave(*_):
        ranges.pop().__exit__(None, None, None)

    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, prepend=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def marked_method(owner: object, name: str) -> Iterator[None]:
    """A profiler range around every call of `owner.name` (an instance attribute shadows the method)."""
    method = getattr(owner, name)

    def marked(*args, **kwargs):
        with record_function(UPDATE):
            return method(*args, **kwargs)

    setattr(owner, name, marked)
    try:
        yield
    finally:
        delattr(owner, name)


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of the intervals, as sorted disjoint intervals."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _union(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in _merged(intervals))


def _covered(merged: list[tuple[float, float]], starts: list[float], a: float, b: float) -> bool:
    i = bisect.bisect_right(starts, a) - 1
    return i >= 0 and merged[i][1] >= b


def _clip(intervals: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    return [(max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi]


def profile_steps(steps: dict[str, Callable[[int], object]], iters: range, *, cuda: bool) -> dict[str, dict]:
    """Run each loop's `step(it)` for each `it` (taking turns, as the timed rounds do) under
    torch.profiler; per loop, the median split of a step (see the module doc).

    The forward and update ranges must already be marked (marked_forward, marked_method).
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False, profile_memory=False, with_stack=False) as prof:
        for it in iters:
            for name in (list(steps) if it % 2 == 0 else list(steps)[::-1]):
                with record_function(f"{STEP} {name}"):
                    steps[name](it)
                    if cuda:
                        torch.cuda.synchronize()  # the step ends when its kernels have
    events = prof.events()
    return {name: _split(events, f"{STEP} {name}", cuda) for name in steps}


def _split(events, step_name: str, cuda: bool) -> dict:
    steps = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == step_name)
    loop_thread = next(e.thread for e in events if e.name == step_name)  # not the batch prefetcher's
    spans: dict[str, list[tuple[float, float]]] = {"forward": [], "backward": [], "optimizer": [], "kernels": []}
    top_level_ops = []
    for e in events:
        span = (e.time_range.start, e.time_range.end)
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            spans["kernels"].append(span)
        elif e.name == FORWARD:
            spans["forward"].append(span)
        elif e.name == UPDATE:
            spans["optimizer"].append(span)
        elif e.name.startswith(BACKWARD_PREFIX):
            spans["backward"].append(span)
        elif (e.thread == loop_thread and not e.name.startswith(STEP)
              and (e.cpu_parent is None or e.cpu_parent.name.startswith(STEP))):
            top_level_ops.append((e.name, span))
    per_step = []
    outside_ops: dict[str, float] = {}
    for lo, hi in steps:
        wall = hi - lo
        inside = _merged([s for part in PARTS for s in _clip(spans[part], lo, hi)])
        starts = [a for a, _ in inside]
        model = sum(b - a for a, b in inside)
        figures = {"step_ms": wall / 1e3, **{f"{p}_ms": _union(_clip(spans[p], lo, hi)) / 1e3 for p in PARTS},
                   "overhead_ms": (wall - model) / 1e3, "overhead_fraction": (wall - model) / wall}
        if cuda:
            figures["gpu_idle_fraction"] = 1 - _union(_clip(spans["kernels"], lo, hi)) / wall
        per_step.append(figures)
        for name, (a, b) in top_level_ops:
            if lo <= a < hi and not _covered(inside, starts, a, b):
                outside_ops[name] = outside_ops.get(name, 0.0) + (b - a) / 1e3 / len(steps)
    result: dict = {key: statistics.median(s[key] for s in per_step) for key in per_step[0]}
    result["steps"] = len(per_step)
    # What the overhead is made of, where it is tensor operations: the top ones by ms per step.
    result["outside_ops_ms"] = dict(sorted(outside_ops.items(), key=lambda kv: -kv[1])[:8])
    return result
