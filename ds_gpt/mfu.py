"""Model FLOPs utilization: FLOPs per token, device peaks, and DeepSpeed's flops profiler.

MFU = achieved model FLOPs/s / peak FLOPs/s of the hardware, as nanoGPT's `estimate_mfu` and
the PaLM paper define it. The model FLOPs are analytic (6N + 12·L·T·d per trained token), so
MFU counts the work the model needs, not what the kernels happened to do.

    fpt = flops_per_token(n_params, n_layer, n_embd, block_size)   # once, at startup
    peak, source = peak_flops_per_device(detect_device_name(), "bfloat16", override_tflops=None)
    mfu(tokens_per_s, fpt, world_size, peak)                        # every logged iteration

The flops-profiler cross-check (`--profile_step N`) runs DeepSpeed's FlopsProfiler:

    ds_config = deep_merge(ds_config, profiler_ds_overrides(N, zero_stage))   # resolver
    engine, *_ = deepspeed.initialize(...)
    capture = FlopsProfileCapture(engine, profile_step=N, output_file=OUT / PROFILE_FILE, ...)
    for iter_num ...:
        for each micro-batch:
            with capture.count(iter_num, x):  # around the training forward only
                loss = engine(x, y)[1]
            ...
        if (event := capture.collect(iter_num, step_time_s=dt)) is not None:  # after the last step()
            metrics.log(event)               # {"event": "flops_profile", ...}, rank 0 only

How it works: on iteration N, on rank 0, `count` starts the profiler before each training forward
(which resets its counts and patches torch.nn.functional) and stops it after, then reads its API
(get_total_flops/macs/duration/params). `collect` sums the micro-batches, computes the analytic
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
import json
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Iterator

from ds_gpt import atomic
from ds_gpt.errors import UserError
from ds_gpt.paths import cache_dir

AGREE_TOLERANCE = 0.05  # analytic vs profiler forward FLOPs: |profiler/analytic - 1| <= 5%

# -----------------------------------------------------------------------------
# FLOPs per token (nanoGPT's estimate_mfu, after the PaLM paper, appendix B)


def flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int) -> float:
    """Training (forward + backward) FLOPs per token: 6N + 12·L·T·d.

    n_params is N as nanoGPT counts it (`get_num_params(non_embedding=True)`): every parameter
    but the position embedding; the tied token embedding counts once, as the output head's
    matmul. 6N: each weight does one multiply-add (2 FLOPs) per token forward, twice that
    backward. 12·L·T·d: attention scores and the weighted sum of values, 2·2·T·d per token per
    layer forward, 3x for training. T is the full context: no discount for the causal mask.
    """
    return 6 * n_params + 12 * n_layer * block_size * n_embd


def fwd_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Forward-only FLOPs per token, 2N + 4·L·T·d: one third of training, the part that
    DeepSpeed's profiler counts (it assumes backward costs 2x forward).

    The attention term counts T x T scores, as the profiler counts scaled_dot_product_attention
    (q·kᵀ and att·v over all T keys, is_causal ignored); nanoGPT's formula makes the same
    choice, so the two figures are comparable term by term.
    """
    return 2 * n_params + 4 * n_layer * seq_len * n_embd


def mfu(tokens_per_s: float, flops_per_token: float, world_size: int,
        peak_flops_per_device: float) -> float:
    """Fraction of the cluster's peak spent on model FLOPs. tokens_per_s is global (all ranks)."""
    return tokens_per_s * flops_per_token / (world_size * peak_flops_per_device)


# -----------------------------------------------------------------------------
# Device peaks: dense (not 2:4 sparse) TFLOPS from the vendors' datasheets.
# "fp32" is the non-tensor-core rate, what a float32 matmul gets unless TF32 is enabled
# (torch.backends.cuda.matmul.allow_tf32, off by default); pass dtype "tf32" when it is.
# Consumer cards: tensor rates with fp32 accumulation, which is what PyTorch asks for.

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250, "fp16": 2250, "tf32": 1100, "fp32": 80},
    "GH200": {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},
    "H200": {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},
    "H100-PCIe": {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51},
    "H100-NVL": {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60},
    "H100-SXM": {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},
    "A100": {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5},
    "A40": {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4},
    "A30": {"bf16": 165, "fp16": 165, "tf32": 82, "fp32": 10.3},
    "A10": {"bf16": 125, "fp16": 125, "tf32": 62.5, "fp32": 31.2},  # A10G: no separate sheet
    "L40S": {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6},
    "L40": {"bf16": 181, "fp16": 181, "tf32": 90.5, "fp32": 90.5},
    "L4": {"bf16": 121, "fp16": 121, "tf32": 60, "fp32": 30.3},
    "RTX-A6000": {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7},
    "RTX-4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "RTX-3090": {"bf16": 71, "fp16": 71, "tf32": 35.6, "fp32": 35.6},
    "V100-SXM": {"fp16": 125, "fp32": 15.7},  # no bf16 tensor cores
    "V100-PCIe": {"fp16": 112, "fp32": 14},
    "T4": {"fp16": 65, "fp32": 8.1},
    "MI300X": {"bf16": 1307, "fp16": 1307, "tf32": 654, "fp32": 163},
    "MI250X": {"bf16": 383, "fp16": 383, "fp32": 95.7},
}

# CUDA names -> table keys, most specific first ("NVIDIA H100 PCIe" before "H100",
# "GH200" before "H200", "L40S" before "L40" before "L4").
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"\bB200\b", "B200"), (r"\bGH200\b", "GH200"), (r"\bH200\b", "H200"),
    (r"\bH100\b.*\bPCIe\b", "H100-PCIe"), (r"\bH100\b.*\bNVL\b", "H100-NVL"), (r"\bH100\b", "H100-SXM"),
    (r"\bA100\b", "A100"), (r"\bA40\b", "A40"), (r"\bA30\b", "A30"), (r"\bA10G?\b", "A10"),
    (r"\bL40S\b", "L40S"), (r"\bL40\b", "L40"), (r"\bL4\b", "L4"),
    (r"\bRTX A6000\b", "RTX-A6000"), (r"\bRTX 4090\b", "RTX-4090"), (r"\bRTX 3090\b", "RTX-3090"),
    (r"\bV100\b.*\bPCIE\b", "V100-PCIe"), (r"\bV100\b", "V100-SXM"), (r"\bT4\b", "T4"),
    (r"\bMI300X\b", "MI300X"), (r"\bMI250X?\b", "MI250X"),
]

_DTYPE_KEYS = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
               "float32": "fp32", "fp32": "fp32", "float": "fp32", "tf32": "tf32"}


def dtype_key(dtype: str) -> str:
    """'bfloat16' / 'torch.bfloat16' / 'bf16' -> 'bf16' (the table's keys)."""
    key = _DTYPE_KEYS.get(str(dtype).removeprefix("torch."))
    if key is None:
        raise UserError(f"unknown dtype {dtype!r} for the peak-FLOPs table",
                        hint="use one of bfloat16, float16, float32, tf32")
    return key


def table_device(device_name: str) -> str | None:
    """The PEAK_TFLOPS key for a CUDA device name, or None when the table lacks it."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return key
    return None


def detect_device_name() -> str:
    """The CUDA device name ("NVIDIA A100-SXM4-40GB") when torch sees a GPU, else "cpu"."""
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def peak_flops_per_device(device_name: str, dtype: str,
                          override_tflops: float | None = None) -> tuple[float, str]:
    """Peak FLOPs/s of one device for matmuls in `dtype`, and where the figure came from:
    "override" (--peak_tflops), "table:<key>", or "measured:cpu" (the cached probe)."""
    if override_tflops is not None:
        if override_tflops <= 0:
            raise UserError(f"--peak_tflops must be positive, got {override_tflops}")
        return override_tflops * 1e12, "override"
    key = dtype_key(dtype)
    if device_name == "cpu":
        return cpu_peak_flops(key if key != "tf32" else "fp32"), "measured:cpu"
    device = table_device(device_name)
    if device is None or key not in PEAK_TFLOPS[device]:
        what = f"{device_name!r}" if device is None else f"{device} in {key}"
        raise UserError(f"no peak FLOPs known for {what}",
                        hint="pass --peak_tflops <dense TFLOPS of one device from its datasheet>")
    return PEAK_TFLOPS[device][key] * 1e12, f"table:{device}"


# -----------------------------------------------------------------------------
# CPU: no datasheet figure means anything (cores, AVX-512/AMX, threads we are given), so the
# peak is measured: the best of a few square matmuls in the run's dtype, with the thread
# count this process has, cached per (dtype, threads, CPU model) so every run agrees.


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_matmul_flops(dtype: str = "fp32", n: int = 1024, seconds: float = 0.5) -> float:
    """Best FLOPs/s of an n x n x n F.linear (2n³ FLOPs) over ~`seconds` of repeats.

    F.linear, the op the model's layers run, rather than torch.matmul: on a CPU without bf16
    units torch's bf16 matmul takes a path about 20x slower than F.linear's (0.8 vs 16.7 GFLOPS
    on the development VM), which made bf16 runs report MFUs over 100%.
    """
    import torch
    import torch.nn.functional as F

    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a = torch.randn(n, n).to(tdtype)
    b = torch.randn(n, n).to(tdtype)
    F.linear(a, b)  # warm-up: thread pool, kernel selection
    best = math.inf
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        F.linear(a, b)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return 2 * n**3 / best


def cpu_peak_flops(dtype: str = "fp32", cache_path: Path | None = None) -> float:
    """The CPU's measured matmul peak in FLOPs/s, from the cache or a fresh probe."""
    import torch

    path = cache_path or cache_dir() / "cpu_peak.json"
    key = f"{dtype}|linear|threads={torch.get_num_threads()}|{_cpu_model()}"  # "linear": not the old matmul probe
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key]["flops"])
    flops = probe_matmul_flops(dtype)
    cache[key] = {"flops": flops, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic.write_text(path, json.dumps(cache, indent=1))  # ranks may probe at the same time
    return flops


# -----------------------------------------------------------------------------
# DeepSpeed's flops profiler: the config it needs, and counting the profiled iteration

PROFILE_FILE = "flops_profile.txt"


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

    @contextlib.contextmanager
    def count(self, iter_num: int, idx) -> Iterator[None]:
        """Wrap one training forward (idx: [B, T]); on the profiled iteration, count its FLOPs."""
        if iter_num != self.profile_step:
            yield
            return
        import torch
        from deepspeed.profiling.flops_profiler import FlopsProfiler

        if self._profiler is None:
            self._profiler = FlopsProfiler(self.engine.module, self.engine)
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

    def collect(self, iter_num: int, step_time_s: float) -> dict | None:
        """The `flops_profile` event once the profiled iteration is done, else None.

        Call after each iteration's last engine.step(). step_time_s is the wall time of one
        iteration; the profiled one is slowed by the profiler's hooks (a device sync per
        module), so the previous iteration's time gives MFUs comparable with metrics' `mfu`.
        Both MFUs below use the same time, so they differ only in how FLOPs were counted.
        """
        if iter_num != self.profile_step or not self._micro:
            return None
        micro, self._micro = self._micro, []
        self._profiler.print_model_profile(profile_step=iter_num, module_depth=-1, top_modules=1, detailed=True,
                                           output_file=str(self.output_file))
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

    def close(self) -> None:
        """Remove the profiler's module hooks and attributes (a run stopped mid-profile included)."""
        if self._profiler is not None:
            self._profiler.end_profile()
            self._profiler = None
