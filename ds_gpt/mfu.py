"""Model FLOPs utilization: FLOPs per token and device peaks, pure accounting.

MFU = achieved model FLOPs/s / peak FLOPs/s of the hardware, as nanoGPT's `estimate_mfu` and
the PaLM paper define it. The model FLOPs are analytic (6N + 12·L·T·d per trained token), so
MFU counts the work the model needs, not what the kernels happened to do.

    fpt = flops_per_token(n_params, n_layer, n_embd, block_size)   # once, at startup
    peak, source = peak_flops_per_device(device_name, "bfloat16", override_tflops=None)
    mfu(tokens_per_s, fpt, world_size, peak)                        # every logged iteration

The planner needs nothing else; DeepSpeed's flops profiler, which measures the same FLOPs a
second way, is run by ds_gpt.flops_profile.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from pathlib import Path

from ds_gpt import atomic
from ds_gpt.errors import UserError
from ds_gpt.paths import cache_dir

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
# count this process has, cached per (dtype, threads, CPU model) so every run agrees. A probe
# taken on a busy machine reads low (a third of the peak under a load of 3x the cores, which made
# MFUs over 100%), so a cached figure is final only if the load average was within the machine's
# usable cores when it was taken (two 1-thread ranks on 2 cores are a quiet machine; the same with
# other jobs is not); until then every run probes again and the cache keeps the best.


def cpu_model() -> str:
    """The CPU's model name, which keys the measured peak (and names the machine in benchmarks)."""
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


def usable_cores() -> int:
    """The cores this process may run on (its affinity: what SLURM or taskset gave it)."""
    return len(os.sched_getaffinity(0))


def cpu_peak_flops(dtype: str = "fp32", cache_path: Path | None = None) -> float:
    """The CPU's measured matmul peak in FLOPs/s, from the cache or a fresh probe."""
    import torch

    path = cache_path or cache_dir() / "cpu_peak.json"
    key = f"{dtype}|linear|threads={torch.get_num_threads()}|{cpu_model()}"  # "linear": not the old matmul probe
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cached = cache.get(key) or {}
    if cached and cached.get("load", math.inf) <= usable_cores():
        return float(cached["flops"])
    load = round(os.getloadavg()[0], 2)
    fresh = {"flops": probe_matmul_flops(dtype), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "load": load}
    if cached and float(cached["flops"]) >= fresh["flops"]:  # the best figure stays; a quiet probe confirms it
        fresh = {**cached, "load": min(load, cached.get("load", math.inf))}
    cache[key] = fresh
    atomic.write_text(path, json.dumps(cache, indent=1))  # ranks may probe at the same time
    return float(fresh["flops"])
