"""DeepSpeed's flops profiler over one training iteration: the second measure of MFU.

The flops-profiler cross-check (`--profile_step N`) runs DeepSpeed's FlopsProfiler:

    ds_config = deep_merge(ds_config, profiler_ds_overrides(N, zero_stage))   # resolver
    engine, *_ = deepspeed.initialize(...)
    capture = FlopsProfileCapture(engine, profile_step=N, output_file=OUT / PROFILE_FILE, ...)
    for iter_num ...:
        for each micro-batch:
            with capture.count(iter_num, x):  # around the training forward only
                loss = engine(x, y)[1]
            ...
        if (event := capture.step_done(iter_num, step_time_s=dt)) is not None:  # after the last step()
            metrics.profile(event)           # {"event": "flops_profile", ...}, rank 0 only

How it works: on iteration N, on rank 0, `count` starts the profiler before each training forward
(which resets its counts and patches torch.nn.functional) and stops it after, then reads its API
(get_total_flops/macs/duration/params). `step_done` sums the micro-batches, computes the analytic
figure for exactly the tokens those forwards saw, writes DeepSpeed's print of the last micro-batch
to OUT/flops_profile.txt with our totals under it, and removes the profiler's hooks. Eval forwards
are not wrapped, so not counted.

Why not the engine's own profiler (the JSON's `flops_profiler` block, which runs the same class
from the engine's forward hooks): enabling that block also turns on DeepSpeed's wall-clock
breakdown for the whole run (runtime/config.py ORs the two). That logs timer lines and syncs the
device on every micro-step of every iteration, and under engine.compile() on CUDA it fails the
first step: the forward timers' CUDA events are created inside the compiled module's hooks, and
reading them raises "Both events must be recorded before calculating elapsed time" (seen on an
H200, DeepSpeed 0.19.8, torch 2.11). `count` runs outside the compiled call instead.

Under torch.compile (the default) the profiled forwards run eagerly (torch.compiler.set_stance
"force_eager"): the profiler works through module hooks and patched torch functions, which would
make dynamo re-trace the model until it hits its recompile limit and leaves parts of the model
eager for the rest of the run. So the counts are eager's, the profiled iteration is slower (and
holds eager's activations), and the MFU figures use the step time of the iteration before it.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from ds_gpt.mfu import fwd_flops_per_token

AGREE_TOLERANCE = 0.05  # analytic vs profiler forward FLOPs: |profiler/analytic - 1| <= 5%


PROFILE_FILE = "flops_profile.txt"


def graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far (0 while dynamo was never imported)."""
    dynamo = sys.modules.get("torch._dynamo")
    return int(dynamo.utils.counters["stats"]["unique_graphs"]) if dynamo is not None else 0


def profiler_ds_overrides(profile_step: int | None, zero_stage: int) -> dict:
    """What the config resolver merges into the ds_config for `--profile_step`.

    The engine's own profiler block is always off; see the module docstring for why.
    """
    overrides: dict = {"flops_profiler": {"enabled": False}}
    if profile_step is not None and zero_stage == 3:
        # ZeRO-3 swaps torch.nn.functional.linear for its memory-efficient autograd function
        # (deepspeed/runtime/zero/linear.py), whose forward calls input.matmul(weight.t()).
        # The profiler wraps both F.linear and Tensor.matmul, so it counts every linear layer
        # twice (243.8 vs 126.4 MFLOPs measured on the test model). With this off ZeRO-3 keeps
        # torch's F.linear: parameters are still partitioned and gathered by module hooks; only
        # the linear layers' backward keeps their gathered weight a little longer. We pay that
        # only on runs that ask for a profile.
        overrides["zero_optimization"] = {"memory_efficient_linear": False}
    return overrides


class FlopsProfileCapture:
    """DeepSpeed's FlopsProfiler over the training forwards of one iteration, on rank 0.

    A no-op when profile_step is None, on other ranks, and on other iterations.
    """

    def __init__(self, engine, *, profile_step: int | None, output_file: str | os.PathLike,
                 n_params: int, n_layer: int, n_embd: int, peak_flops: float):
        self.engine = engine
        self.profile_step = profile_step if engine.global_rank == 0 else None
        self.output_file = Path(output_file)
        self.n_params, self.n_layer, self.n_embd = n_params, n_layer, n_embd
        self.peak_flops = peak_flops
        self._profiler = None
        self._micro: list[dict] = []  # one entry per profiled training forward
        self._previous_step_time_s: float | None = None
        self._graphs_before: int | None = None  # graphs compiled before the profiled iteration
        # Imported here: run_config imports this module for its overrides, and the commands that
        # only read configs (preflight on a login node, plan) should not pay torch's import.
        from ds_gpt.accounting import CommBytesCounter

        self._comm = CommBytesCounter()
        self._counting_comm = False

    @contextlib.contextmanager
    def count(self, iter_num: int, idx) -> Iterator[None]:
        """Wrap one training forward (idx: [B, T]); on the profiled iteration, count its FLOPs."""
        if iter_num != self.profile_step:
            yield
            return
        import torch
        from deepspeed.profiling.flops_profiler import FlopsProfiler

        if self._profiler is None:
            self._graphs_before = graphs_compiled()
            self._profiler = FlopsProfiler(self.engine.module, self.engine)
            self._comm.start()  # the profiled step's collectives, from its first forward to its optimizer step
            self._counting_comm = True
        prof = self._profiler
        prof.start_profile()  # resets the counts; patches torch.nn.functional
        try:
            # Eager, also under torch.compile: the profiler's hooks and patched functions would make
            # dynamo re-trace the model and hit its recompile limit, which leaves parts of the
            # model eager for the rest of the run (seen on an H200: MFU 40% -> 18-27% afterwards).
            with torch.compiler.set_stance("force_eager"):
                yield
        finally:
            prof.stop_profile()  # restores torch.nn.functional; the counts stay readable
        batch, seq_len = idx.shape[0], idx.shape[1]
        self._micro.append({
            "flops": prof.get_total_flops(), "macs": prof.get_total_macs(),
            "latency_s": prof.get_total_duration(), "params": prof.get_total_params(),
            "tokens": batch * seq_len,
            "analytic": fwd_flops_per_token(self.n_params, self.n_layer, self.n_embd, seq_len) * batch * seq_len,
        })

    def step_done(self, iter_num: int, step_time_s: float) -> dict | None:
        """The `flops_profile` event once the profiled iteration is done, else None.

        Call after each iteration's last engine.step() with its wall time. The profiled iteration
        is slowed by the profiler's hooks (a device sync per module), so the MFUs use the time of
        the iteration before it, comparable with metrics' `mfu`. Both MFUs use the same time, so
        they differ only in how FLOPs were counted.
        """
        step_time_s, self._previous_step_time_s = self._previous_step_time_s or step_time_s, step_time_s
        if iter_num != self.profile_step or not self._micro:
            return None
        micro, self._micro = self._micro, []
        self._profiler.print_model_profile(profile_step=iter_num, module_depth=-1, top_modules=1, detailed=True,
                                           output_file=str(self.output_file))
        comm_bytes = self._stop_comm()
        self.close()
        prof_flops = sum(m["flops"] for m in micro)
        analytic = sum(m["analytic"] for m in micro)
        ratio = prof_flops / analytic
        zero_stage = int(self.engine.zero_optimization_stage())
        event = {
            "event": "flops_profile",
            "iter": iter_num,
            "zero_stage": zero_stage,
            "micro_batches": len(micro),
            "tokens": sum(m["tokens"] for m in micro),
            "profiler_fwd_flops": prof_flops,
            "profiler_fwd_macs": sum(m["macs"] for m in micro),
            "profiler_fwd_latency_s": sum(m["latency_s"] for m in micro),
            "profiler_params": micro[-1]["params"],
            "analytic_fwd_flops": analytic,
            "flops_ratio": ratio,
            "agree": abs(ratio - 1) <= AGREE_TOLERANCE,
            "step_time_s": step_time_s,
            "peak_flops": self.peak_flops,
            # Training = forward + backward (2x forward): the profiler's own convention.
            "mfu_profiler": 3 * prof_flops / step_time_s / self.peak_flops,
            "mfu_analytic": 3 * analytic / step_time_s / self.peak_flops,
            "profile_file": str(self.output_file),
            "comm_bytes_per_rank": comm_bytes,  # what DeepSpeed's collectives moved for this rank
            # Under torch.compile: graphs compiled from the profiled iteration's first forward to its
            # optimizer step; anything but 0 means profiling made dynamo re-trace the model.
            "graphs_compiled": graphs_compiled() - self._graphs_before,
        }
        zero_config = getattr(getattr(self.engine, "_config", None), "zero_config", None)
        if zero_stage == 3 and getattr(zero_config, "memory_efficient_linear", False):
            event["warning"] = ("ZeRO-3 memory_efficient_linear is on: the profiler counts linear "
                                "layers twice (set by profiler_ds_overrides)")
        self._append_summary(event)
        return event

    def _append_summary(self, event: dict) -> None:
        """Add our cross-check under DeepSpeed's printed profile (of the last micro-batch)."""
        with open(self.output_file, "a") as f:
            f.write(f"\n# ds_gpt cross-check, iteration {event['iter']} (ZeRO-{event['zero_stage']}): "
                    f"the profile above is DeepSpeed's print for the last of {event['micro_batches']} "
                    f"micro-batches; totals over all of them:\n")
            for k in ("tokens", "profiler_fwd_flops", "analytic_fwd_flops", "flops_ratio", "agree",
                      "profiler_fwd_latency_s", "step_time_s", "mfu_profiler", "mfu_analytic"):
                f.write(f"{k}: {event[k]}\n")

    def _stop_comm(self) -> dict[str, int] | None:
        if not self._counting_comm:
            return None
        self._counting_comm = False
        return self._comm.stop()

    def close(self) -> None:
        """Remove the profiler's module hooks and attributes (a run stopped mid-profile included)."""
        self._stop_comm()  # DeepSpeed's comms logger back as it was
        if self._profiler is not None:
            self._profiler.end_profile()
            self._profiler = None
