"""Per-rank memory of a DeepSpeed GPT-2 run, by ZeRO stage, precision, world size and offload.

Model states follow DeepSpeed's own layout (read from deepspeed/runtime/zero/stage_1_and_2.py,
stage3.py and fp16/unfused_optimizer.py, and checked tensor by tensor against
ds_gpt.accounting.state_bytes_per_rank on real engines):

- ZeRO-0: the weights and their gradients whole; AdamW's exp_avg and exp_avg_sq whole; in
  bf16 DeepSpeed's DDP-bf16 path (FP16_UnfusedOptimizer) adds fp32 master weights.
- ZeRO-1/2: each optimizer group flattened into one buffer padded to a multiple of 2 x world
  size and cut into equal partitions; a rank keeps the fp32 master weights and AdamW state of
  its partition. After the last backward of an iteration it holds the gradients of the
  parameters that overlap its partition, whole: a parameter cut by a partition boundary keeps
  its entire gradient on both ranks (the tied 50304 x d embedding does this on up to
  ceil(V·d / partition) ranks). ZeRO-1 and ZeRO-2 differ in what they hold during the
  backward (see `transient_bytes`), not at the optimizer step.
- ZeRO-3: every parameter cut into world-size slices of ceil(numel / world) elements; parameters
  of at most `stage3_param_persistence_threshold` elements are also kept whole on every rank.
  The gradient partitions live in one flat buffer, and the reduction bucket
  (`reduce_bucket_size` elements) is allocated once at start-up.

Gradients are in the training dtype (DeepSpeed's default gradient_accumulation_dtype);
the optimizer state is fp32. Activations are the rough part: `activation_bytes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# DeepSpeed's defaults for the zero_optimization keys the model reads (deepspeed/runtime/zero/config.py).
ZERO_DEFAULTS = {
    "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000, "contiguous_gradients": True,
    "overlap_comm": False, "stage3_param_persistence_threshold": 100_000, "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_prefetch_bucket_size": 50_000_000, "stage3_max_live_parameters": 1_000_000_000,
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The fp32 gradient copy DeepSpeed's ZeRO-0 all-reduce flattens grads into, at most this many elements.
ZERO0_ALLREDUCE_BUFFER = 500_000_000


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    decay: bool  # 2-D tensors: AdamW's decayed group (nanoGPT's split), the optimizer's first group

    @property
    def muon(self) -> bool:  # a hidden matrix: Muon's side (GPT.muon_matrices)
        return self.decay and ".h." in self.name


@dataclass(frozen=True)
class Layout:
    """A GPT-2's parameters in model.parameters() order, and its modules in forward order."""

    params: tuple[Param, ...]
    modules: tuple[tuple[str, tuple[int, ...]], ...]  # (module, indices of its own params) as called in forward
    blocks: tuple[tuple[int, int], ...]  # [start, end) in `modules` of each transformer block

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    def groups(self, muon: bool = False) -> list[list[int]]:
        """Parameter sizes per optimizer group, in DeepSpeed's order: decayed, then not; with Muon, its
        hidden matrices first, then the AdamW side's decayed and undecayed (ds_gpt.model's groups)."""
        if muon:
            return [[p.numel for p in self.params if p.muon],
                    [p.numel for p in self.params if p.decay and not p.muon],
                    [p.numel for p in self.params if not p.decay]]
        return [[p.numel for p in self.params if p.decay], [p.numel for p in self.params if not p.decay]]


def gpt_layout(n_layer: int, n_embd: int, vocab_size: int, block_size: int, bias: bool = False) -> Layout:
    """ds_gpt.model.GPT's parameters and the order its modules run, without building it."""
    d = n_embd
    params: list[Param] = []
    modules: list[tuple[str, tuple[int, ...]]] = []
    blocks: list[tuple[int, int]] = []

    def module(name: str, *shapes: tuple[str, int, bool]) -> None:
        idx = []
        for suffix, numel, decay in shapes:
            idx.append(len(params))
            params.append(Param(f"{name}.{suffix}", numel, decay))
        modules.append((name, tuple(idx)))

    def linear(name: str, fan_in: int, fan_out: int) -> None:
        module(name, ("weight", fan_in * fan_out, True), *([("bias", fan_out, False)] if bias else []))

    def norm(name: str) -> None:
        module(name, ("weight", d, False), *([("bias", d, False)] if bias else []))

    module("transformer.wte", ("weight", vocab_size * d, True))  # tied: lm_head uses it too
    module("transformer.wpe", ("weight", block_size * d, True))
    for i in range(n_layer):
        start = len(modules)
        h = f"transformer.h.{i}"
        norm(f"{h}.ln_1")
        linear(f"{h}.attn.c_attn", d, 3 * d)
        linear(f"{h}.attn.c_proj", d, d)
        norm(f"{h}.ln_2")
        linear(f"{h}.mlp.c_fc", d, 4 * d)
        linear(f"{h}.mlp.c_proj", 4 * d, d)
        blocks.append((start, len(modules)))
    norm("transformer.ln_f")
    modules.append(("lm_head", (0,)))
    return Layout(tuple(params), tuple(modules), tuple(blocks))


# -----------------------------------------------------------------------------
# ZeRO partitions

def zero12_partition(group: list[int], world: int) -> int:
    """Elements per rank of one ZeRO-1/2 group: padded to a multiple of 2 x world, then split."""
    align = 2 * world
    return math.ceil(sum(group) / align) * align // world


def zero12_rank_grad_numel(group: list[int], world: int, rank: int) -> int:
    """Gradient elements rank `rank` holds for one group at the step: whole gradients of the
    parameters overlapping its partition, plus the zero padding inside it."""
    size = zero12_partition(group, world)
    lo, hi, total, start = rank * size, (rank + 1) * size, 0, 0
    for numel in group:
        if start < hi and start + numel > lo:
            total += numel
        start += numel
    return total + max(0, hi - max(lo, sum(group)))


def zero3_partition(numel: int, world: int) -> int:
    return math.ceil(numel / world)


# -----------------------------------------------------------------------------
# Model states per rank

@dataclass
class Setup:
    """What the memory and communication models need to know about a run."""

    layout: Layout
    world: int
    zero_stage: int
    dtype: str = "bfloat16"
    offload_optimizer: bool = False  # ZeRO-2/3: optimizer state, master weights and fp32 grads on CPU
    offload_param: bool = False  # ZeRO-3: parameter partitions on CPU too
    zero: dict | None = None  # the DeepSpeed zero_optimization block (DeepSpeed's defaults fill gaps)
    comm_dtype: str | None = None  # DeepSpeed's communication_data_type; None: the training dtype
    optimizer: str = "adamw"  # or "muon": one momentum buffer for the hidden matrices instead of two moments

    def knob(self, key: str):
        return {**ZERO_DEFAULTS, **(self.zero or {})}[key]

    @property
    def pbytes(self) -> int:  # parameters and gradients
        return DTYPE_BYTES[self.dtype]

    @property
    def cbytes(self) -> int:  # gradient reduction
        return DTYPE_BYTES[self.comm_dtype or self.dtype]

    def persistent(self) -> list[Param]:
        """ZeRO-3's parameters kept whole on every rank."""
        limit = self.knob("stage3_param_persistence_threshold")
        return [p for p in self.layout.params if p.numel <= limit]


def state_bytes(s: Setup, rank: int = 0) -> dict[str, dict[str, int]]:
    """{"gpu": {params, grads, optimizer}, "cpu": {...}}: bytes rank `rank` holds after the last
    backward of an iteration, before the optimizer step (what accounting.state_bytes_per_rank
    reads), on its GPU and, under ZeRO-Offload, in host memory."""
    n, pb, psi = s.world, s.pbytes, s.layout.numel
    gpu = dict.fromkeys(("params", "grads", "optimizer"), 0)
    cpu = dict(gpu)
    muon = s.optimizer == "muon"
    hidden = sum(p.numel for p in s.layout.params if p.muon) if muon else 0
    if s.zero_stage == 0:
        gpu["params"] = gpu["grads"] = psi * pb
        gpu["optimizer"] = (8 if pb == 4 else 12) * psi - 4 * hidden  # m, v (+ fp32 master weights in 16-bit)
    elif s.zero_stage in (1, 2):
        groups = s.layout.groups(muon)
        part = sum(zero12_partition(g, n) for g in groups)
        gpu["params"] = part * n * pb  # the padded flat buffers, whole on every rank
        grads = sum(zero12_rank_grad_numel(g, n, rank) for g in groups) * pb
        if s.offload_optimizer:
            # Reduced gradients go to an fp32 partition in host memory through a staging buffer
            # of the largest parameter's size (one on each side); the host also keeps a 16-bit
            # copy of the partition for the upload after the step. Accumulation over micro-batches
            # (16-bit, host) is not counted.
            largest = max(p.numel for p in s.layout.params)
            gpu["grads"] = largest * pb
            cpu["grads"], cpu["optimizer"] = 4 * part + largest * pb, 12 * part + part * pb
        elif muon:
            # fp32 master weights, AdamW's two moments on its side, and Muon's momentum in the gradient
            # dtype, plus the copy DeepSpeed stages it into during the step (held with the gradients).
            muon_part = zero12_partition(groups[0], n)
            gpu["grads"], gpu["optimizer"] = grads + pb * muon_part, 4 * part + 8 * (part - muon_part) + pb * muon_part
        else:
            gpu["grads"], gpu["optimizer"] = grads, 12 * part
    else:
        part = sum(zero3_partition(p.numel, n) for p in s.layout.params)
        whole = sum(p.numel for p in s.persistent()) if n > 1 else 0
        bucket = s.knob("reduce_bucket_size") * s.cbytes if s.knob("contiguous_gradients") else 0
        (cpu if s.offload_param else gpu)["params"] += part * pb
        gpu["params"] += whole * pb
        gpu["grads"] = bucket
        if s.offload_optimizer:  # the 16-bit gradient partitions and their fp32 copy at the step
            cpu["grads"], cpu["optimizer"] = part * pb + 4 * part, 12 * part
        else:
            gpu["grads"] += part * pb
            gpu["optimizer"] = 12 * part
    return {"gpu": gpu, "cpu": cpu}


def heaviest_rank(s: Setup) -> int:
    """The rank with the most GPU state (ZeRO-1/2 ranks differ by the gradients they hold)."""
    if s.zero_stage not in (1, 2) or s.offload_optimizer:
        return 0
    groups = s.layout.groups()
    return max(range(s.world), key=lambda r: sum(zero12_rank_grad_numel(g, s.world, r) for g in groups))


def transient_bytes(s: Setup, gathered_numel: int = 0) -> dict[str, int]:
    """Peak GPU bytes that come and go within an iteration, on top of the model states:
    "backward" while gradients are produced and reduced, "step" during the optimizer step.
    `gathered_numel`: ZeRO-3's most parameter elements gathered at once (plan_comm.zero3_trace)."""
    n, pb, psi = s.world, s.pbytes, s.layout.numel
    bucket = s.knob("reduce_bucket_size") * s.cbytes if s.knob("contiguous_gradients") else 0
    largest = max(p.numel for p in s.layout.params)
    if s.zero_stage == 0:
        backward = min(psi, ZERO0_ALLREDUCE_BUFFER) * s.cbytes  # the flattened copy it all-reduces
        step = 4 * psi if pb == 2 else 0  # FP16_UnfusedOptimizer's fp32 gradients
    elif s.zero_stage in (1, 2):
        part = sum(zero12_partition(g, n) for g in s.layout.groups())
        held = state_bytes(s, heaviest_rank(s))["gpu"]["grads"]
        # ZeRO-1 keeps every gradient until the last micro-batch's backward reduces them (and
        # DeepSpeed's hooks keep a reduction bucket alive meanwhile); ZeRO-2 reduces as they come.
        backward = bucket + (psi * pb - held if s.zero_stage == 1 else largest * pb)
        step = 0 if s.offload_optimizer else 4 * part  # the fp32 gradient partition AdamW reads
    else:
        part = sum(zero3_partition(p.numel, n) for p in s.layout.params)
        backward = gathered_numel * pb + largest * pb  # gathered weights + one unreduced gradient
        step = 0 if s.offload_optimizer else 4 * part
    return {"backward": backward, "step": step}


def activation_bytes(n_layer: int, n_embd: int, vocab_size: int, seq_len: int, micro_batch: int, dtype: str,
                     checkpointing: str = "none") -> int:
    """Bytes one micro-batch keeps for its backward: an estimate, not a measurement.

    Per block 34·s·b·h bytes in 16-bit (Korthikanti et al. 2022, "Reducing Activation
    Recomputation", eq. 1; the 5·a·s²·b attention-score term is gone with fused SDPA), twice
    that in fp32. With full checkpointing a block keeps only its input (2·s·b·h in 16-bit) and
    one block's activations exist at a time, while it is recomputed. Plus the logits at the
    loss's backward, the peak for them: the fp32 log-softmax the loss saved, its gradient and
    the gradient of the fp32 logits (3 x 4 B per element). Allocator fragmentation and other
    temporary buffers are not counted.
    """
    scale = 1 if DTYPE_BYTES[dtype] == 2 else 2
    block = 34 * seq_len * micro_batch * n_embd * scale
    if checkpointing == "full":
        kept = n_layer * 2 * seq_len * micro_batch * n_embd * scale + block
    else:
        kept = n_layer * block
    logits = micro_batch * seq_len * vocab_size * 12
    return kept + logits
