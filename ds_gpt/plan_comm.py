"""What a DeepSpeed rank sends per optimizer step, and how long it takes over the links it crosses.

Message sizes follow deepspeed.comm's logger, so that ds_gpt.accounting.CommBytesCounter
measures the same quantity: for all_reduce the buffer reduced, for reduce_scatter its whole
input, for all_gather this rank's share (the output is world x that). Per stage, with
DeepSpeed's defaults (read from its sources and checked against the logger on real ranks):

- ZeRO-0: one all_reduce of every gradient per step, after the last micro-batch's backward.
- ZeRO-1: the same all_reduce (bucketed; DeepSpeed all-reduces each bucket and keeps its own
  slice rather than reduce-scattering), then an all_gather of the updated 16-bit partitions.
- ZeRO-2: that all_reduce after every micro-batch's backward, then the same all_gather.
- ZeRO-3: per micro-batch an all_gather of each parameter's slice when a module needs it and
  a reduce_scatter of every gradient; per step an all_gather of the small persistent
  parameters. A gathered parameter is freed after use unless the module trace shows it used
  again within `stage3_max_reuse_distance` elements (`zero3_trace`), so below ~5e8 parameters
  the forward's gathers serve the backward too.
Scalar collectives (gradient norm, overflow flags) are a few bytes and left out.

Time: each collective runs hierarchically, as NCCL's ring and tree algorithms do across
nodes: its intra-node part over NVLink/PCIe, its inter-node part over the node's network
links. A ring all-reduce moves 2(n-1)/n of the buffer through each participant, a
reduce-scatter or all-gather (n-1)/n of the whole buffer. Bandwidths are datasheet figures
(`LINKS`), per direction; latency is left out.
"""
from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate

from ds_gpt.plan_memory import Layout, Setup, zero3_partition, zero12_partition


@dataclass(frozen=True)
class Links:
    gpus_per_node: int
    intra_GBps: float  # one GPU to its node peers, per direction (NVLink, or PCIe without it)
    inter_GBps: float  # one node to the network, per direction, all its NICs together
    pcie_GBps: float  # one GPU to host memory, per direction (ZeRO-Offload's copies)
    source: str


# Per --gpu: the node it usually comes in. NVLink/PCIe from NVIDIA's and AMD's datasheets
# (bidirectional figures halved); networks as named. Override with the CLI flags.
LINKS: dict[str, Links] = {
    # The reference cluster: Narval (Digital Research Alliance of Canada), 4 x A100-SXM4-40GB
    # per node on NVLink 3 (600 GB/s per GPU), Mellanox HDR InfiniBand (200 Gb/s).
    "a100": Links(4, 300, 25, 32, "Narval: NVLink 3 600 GB/s (A100 datasheet); 1 x HDR 200 Gb/s per node"),
    "a100-80g": Links(8, 300, 200, 32, "DGX A100: NVLink 3 600 GB/s; 8 x HDR 200 Gb/s per node"),
    "h100": Links(8, 450, 400, 64, "DGX H100: NVLink 4 900 GB/s (H100 datasheet); 8 x NDR 400 Gb/s"),
    "h100-pcie": Links(8, 64, 50, 64, "PCIe Gen5 x16 128 GB/s (H100 PCIe datasheet); 1 x NDR 400 Gb/s"),
    "h200": Links(8, 450, 400, 64, "HGX H200: NVLink 4 900 GB/s (H200 datasheet); 8 x NDR 400 Gb/s"),
    "gh200": Links(4, 450, 100, 450, "GH200: NVLink 900 GB/s, NVLink-C2C to host; 4 x NDR 200 Gb/s"),
    "b200": Links(8, 900, 400, 64, "DGX B200: NVLink 5 1.8 TB/s (B200 datasheet); 8 x 400 Gb/s"),
    "l40s": Links(8, 32, 25, 32, "PCIe Gen4 x16 64 GB/s, no NVLink (L40S datasheet); 200 Gb/s per node"),
    "l4": Links(8, 32, 12.5, 32, "PCIe Gen4 x16 64 GB/s (L4 datasheet); 100 Gb/s per node"),
    "a10g": Links(8, 32, 12.5, 32, "PCIe Gen4 x16 64 GB/s (A10 datasheet); 100 Gb/s per node"),
    "a40": Links(8, 32, 25, 32, "PCIe Gen4 x16 (NVLink bridges join pairs only; A40 datasheet); 200 Gb/s"),
    "a6000": Links(8, 32, 25, 32, "PCIe Gen4 x16 (NVLink bridges join pairs only); 200 Gb/s per node"),
    "rtx4090": Links(8, 32, 12.5, 32, "PCIe Gen4 x16 64 GB/s, no NVLink; 100 Gb/s per node"),
    "rtx3090": Links(8, 32, 12.5, 32, "PCIe Gen4 x16 (NVLink bridges join pairs only); 100 Gb/s per node"),
    "v100": Links(8, 150, 50, 16, "DGX-1V: NVLink 2 300 GB/s (V100 datasheet); 4 x EDR 100 Gb/s"),
    "t4": Links(8, 16, 12.5, 16, "PCIe Gen3 x16 32 GB/s (T4 datasheet); 100 Gb/s per node"),
    "mi300x": Links(8, 448, 400, 64, "MI300X platform: Infinity Fabric 896 GB/s per GPU; 8 x 400 Gb/s"),
}


def gathers_per_micro_batch(s: Setup, checkpointing: str = "none") -> tuple[int, int]:
    """ZeRO-3: (slice elements this rank all-gathers per micro-batch, most parameter elements
    gathered at once), replaying DeepSpeed's parameter coordinator over the module trace
    (deepspeed/runtime/zero/partitioned_param_coordinator.py).

    The trace is the forward's modules, then the backward's in reverse (a checkpointed block
    runs its forward again first). A module's parameters are gathered when it runs unless
    already there; then the coordinator prefetches the next `stage3_prefetch_bucket_size`
    elements of the trace. After a module runs, its parameters are freed unless the prefetch
    has already claimed them for a later use, or a module within the next
    `stage3_max_reuse_distance` parameter elements of the trace uses them again. Persistent
    parameters are never gathered.
    """
    if s.world == 1 and not s.offload_param:  # one rank holds every slice on its GPU: nothing to fetch
        return 0, 0
    knobs = tuple(s.knob(k) for k in ("stage3_param_persistence_threshold", "stage3_max_reuse_distance",
                                      "stage3_prefetch_bucket_size", "stage3_max_live_parameters"))
    return _replay(s.layout, s.world, knobs, checkpointing)


@lru_cache(maxsize=256)
def _replay(lay: Layout, world: int, knobs: tuple[int, int, int, int], checkpointing: str) -> tuple[int, int]:
    threshold, reuse, prefetch, max_live = knobs
    numel = [p.numel for p in lay.params]
    persistent = {i for i, n in enumerate(numel) if n <= threshold}
    forward = list(range(len(lay.modules)))
    in_block = {m: b for b, (lo, hi) in enumerate(lay.blocks) for m in range(lo, hi)}
    backward: list[int] = []
    for m in reversed(forward):
        block = in_block.get(m)
        if block is not None and m == lay.blocks[block][1] - 1 and checkpointing == "full":
            backward.extend(range(*lay.blocks[block]))  # the recomputed forward
        backward.append(m)
    trace = [sorted(lay.modules[m][1]) for m in forward + backward]
    # The reuse window after step t: the modules t+1 .. j whose preceding elements stay under `reuse`.
    before = list(accumulate((sum(numel[i] for i in params) for params in trace), initial=0))
    next_use: dict[tuple[int, int], int] = {}
    last_seen: dict[int, int] = {}
    for step in range(len(trace) - 1, -1, -1):
        for i in trace[step]:
            next_use[step, i] = last_seen.get(i, len(trace))
            last_seen[i] = step
    queue = deque((i, step) for step, params in enumerate(trace) for i in params)
    claimed: dict[int, int] = {}  # parameter -> the latest trace step the prefetcher fetched it for
    available: set[int] = set()
    live = gathered = most = 0

    def gather(i: int) -> int:
        nonlocal gathered, live
        if i in persistent or i in available:
            return 0
        available.add(i)
        live += numel[i]
        gathered += zero3_partition(numel[i], world)
        return numel[i]

    for step, params in enumerate(trace):
        for i in params:
            gather(i)
        mine = {i for i in params if claimed.get(i, -1) < step}
        popped: set[int] = set()
        while queue and len(popped) < len(mine):
            i, at = queue.popleft()
            claimed[i] = at
            popped.add(i)
        fetching, budget = 0, min(max_live - live, prefetch)
        while queue and fetching < budget:
            i, at = queue.popleft()
            claimed[i] = max(claimed.get(i, -1), at)
            fetching += gather(i)
        most = max(most, live)
        window_end = bisect_left(before, before[step + 1] + reuse) - 1
        for i in params:
            if i in available and next_use[step, i] > window_end and claimed.get(i, -1) <= step:
                available.discard(i)
                live -= numel[i]
    return gathered, most


def message_bytes(s: Setup, grad_accum: int, checkpointing: str = "none") -> dict[str, int]:
    """Bytes per optimizer step this rank passes to each collective, as DeepSpeed's logger counts."""
    n, pb, cb, psi = s.world, s.pbytes, s.cbytes, s.layout.numel
    out = dict.fromkeys(("all_reduce", "reduce_scatter", "all_gather", "broadcast"), 0)
    if s.zero_stage in (0, 1):
        out["all_reduce"] = psi * cb
    elif s.zero_stage == 2:
        out["all_reduce"] = grad_accum * psi * cb
    if s.zero_stage in (1, 2) and n > 1:  # one rank already holds every updated partition
        out["all_gather"] = sum(zero12_partition(g, n) for g in s.layout.groups()) * pb
    if s.zero_stage == 3:
        out["reduce_scatter"] = grad_accum * n * sum(zero3_partition(p.numel, n) for p in s.layout.params) * cb
        if n > 1:  # (one rank fetches offloaded parameters from host memory: a copy, no collective)
            gathered, _ = gathers_per_micro_batch(s, checkpointing)
            after_step = sum(zero3_partition(p.numel, n) for p in s.persistent())
            out["all_gather"] = (grad_accum * gathered + after_step) * pb
    return out


def wire_seconds(op: str, nbytes: float, world: int, nodes: int, links: Links) -> float:
    """Seconds for one collective of `nbytes` (logger's message size), hierarchical over nodes."""
    if world <= 1 or nbytes == 0:
        return 0.0
    per_node = world // nodes
    if op == "all_gather":
        nbytes *= world  # the gathered output
    passes = 2 if op == "all_reduce" else 1  # all_reduce = reduce_scatter + all_gather
    intra = passes * (per_node - 1) / per_node * nbytes / (links.intra_GBps * 1e9)
    inter = passes * (nodes - 1) / nodes * nbytes / (links.inter_GBps * 1e9) if nodes > 1 else 0.0
    return intra + inter


def wire_bytes(op: str, nbytes: float, world: int, nodes: int) -> dict[str, float]:
    """Bytes one rank sends over its node's links (intra) and its share of the network (inter)."""
    if world <= 1:
        return {"intra": 0.0, "inter": 0.0}
    per_node = world // nodes
    full = nbytes * (world if op == "all_gather" else 1)
    passes = 2 if op == "all_reduce" else 1
    return {"intra": passes * (per_node - 1) / per_node * full,
            "inter": passes * (nodes - 1) / nodes * full / per_node}


def comm_seconds(s: Setup, nodes: int, links: Links, grad_accum: int, fwd_s: float, bwd_s: float,
                 checkpointing: str = "none") -> dict:
    """{"total": all communication, "exposed": the part compute does not hide, "by_collective"} per step.

    Overlap (the assumption, from what DeepSpeed does): ZeRO-0 reduces after the backward, and
    ZeRO-1 too unless overlap_comm; with overlap_comm ZeRO-1/2 reduce during the backward they
    follow, and ZeRO-3 prefetches during the forward and reduces during the backward, each hidden
    up to that pass's compute time (fwd_s, bwd_s: one micro-batch), except the last reduction
    bucket (and ZeRO-3's first gather), which has no compute left to hide behind. The all_gather
    after the optimizer step hides behind nothing.
    """
    msg = message_bytes(s, grad_accum, checkpointing)
    n = s.world

    def secs(op: str, nbytes: float) -> float:
        return wire_seconds(op, nbytes, n, nodes, links)

    t = {op: secs(op, b) for op, b in msg.items()}
    overlap = bool(s.knob("overlap_comm"))
    bucket = s.knob("reduce_bucket_size") * s.cbytes

    def hidden(total: float, window: float, tail: float) -> float:
        return max(total - window, tail) if overlap else total

    if s.zero_stage in (0, 1):
        tail = secs("all_reduce", min(bucket, msg["all_reduce"]))
        exposed = t["all_reduce"] if s.zero_stage == 0 else hidden(t["all_reduce"], bwd_s, tail)
        exposed += t["all_gather"]
    elif s.zero_stage == 2:
        per_micro = msg["all_reduce"] / grad_accum
        tail = secs("all_reduce", min(bucket, per_micro))
        exposed = grad_accum * hidden(t["all_reduce"] / grad_accum, bwd_s, tail) + t["all_gather"]
    else:
        gathered = gathers_per_micro_batch(s, checkpointing)[0] if n > 1 else 0
        g_micro = secs("all_gather", gathered * s.pbytes)
        rs_micro = msg["reduce_scatter"] / grad_accum
        first = sum(zero3_partition(s.layout.params[i].numel, n) for i in s.layout.modules[0][1]) if gathered else 0
        after_step = t["all_gather"] - grad_accum * g_micro
        exposed = grad_accum * (hidden(g_micro, fwd_s, secs("all_gather", first * s.pbytes))
                                + hidden(t["reduce_scatter"] / grad_accum, bwd_s,
                                         secs("reduce_scatter", min(bucket, rs_micro)))) + after_step
    return {"total": sum(t.values()), "exposed": exposed, "by_collective": t}


def offload_seconds(s: Setup, links: Links, gpus_per_node: int, cpu_adam_params_per_s: float,
                    grad_accum: int = 1, checkpointing: str = "none") -> float:
    """ZeRO-Offload per step, not hidden behind compute: gradients down and weights up over PCIe,
    AdamW on the CPU (the node's CPU shared by its GPUs' partitions), and with parameter offload
    every fetched parameter slice up from host memory."""
    if not s.offload_optimizer:
        return 0.0
    part = (sum(zero12_partition(g, s.world) for g in s.layout.groups()) if s.zero_stage < 3
            else sum(zero3_partition(p.numel, s.world) for p in s.layout.params))
    pcie = 2 * part * s.pbytes
    if s.offload_param:
        pcie += grad_accum * gathers_per_micro_batch(s, checkpointing)[0] * s.pbytes
    return pcie / (links.pcie_GBps * 1e9) + part * gpus_per_node / cpu_adam_params_per_s
