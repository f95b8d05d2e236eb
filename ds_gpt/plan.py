"""Plan a run before queueing it: per-GPU memory at each ZeRO stage, time per iteration, days.

    python -m ds_gpt.plan --model 124M --gpus 8 --gpu a100 --zero_stage 1
    python -m ds_gpt.plan --model 1558M --gpus 16 --gpu h100 --zero_stage 3 --mfu 0.40 --json

Time comes from the analytic FLOPs (ds_gpt.mfu) at an assumed MFU: the default 0.34 is what
the seed measured for nanoGPT on 8 x A100, which makes the seed's run the reference point
(0.495 s/iter, 3.4 days for 600k iterations). Memory is an estimate (see `model_states`,
`activations`): it ignores the CUDA context, allocator fragmentation and communication buffers
(about 1-3 GB in practice), so leave that headroom.

Pure arithmetic on text and numbers: imports neither torch nor deepspeed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ds_gpt.errors import UserError, run_cli
from ds_gpt.mfu import PEAK_TFLOPS, dtype_key, flops_per_token

GB = 1e9

# GPT-2 sizes (n_layer, n_head, n_embd), as nanoGPT's from_pretrained has them.
MODELS = {"124M": (12, 12, 768), "350M": (24, 16, 1024), "774M": (36, 20, 1280), "1558M": (48, 25, 1600)}

# --gpu: (PEAK_TFLOPS key, memory GB). The seed's cluster (Narval) has 40 GB A100s.
GPUS = {
    "a100": ("A100", 40), "a100-80g": ("A100", 80), "h100": ("H100-SXM", 80), "h100-pcie": ("H100-PCIe", 80),
    "h200": ("H200", 141), "gh200": ("GH200", 96), "b200": ("B200", 180), "l40s": ("L40S", 48),
    "l4": ("L4", 24), "a10g": ("A10", 24), "a40": ("A40", 48), "a6000": ("RTX-A6000", 48),
    "rtx4090": ("RTX-4090", 24), "rtx3090": ("RTX-3090", 24), "v100": ("V100-SXM", 32), "t4": ("T4", 16),
    "mi300x": ("MI300X", 192),
}


@dataclass
class Memory:
    """Bytes per GPU."""

    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def gb(self) -> dict:
        return {**{k: round(v / GB, 3) for k, v in asdict(self).items()}, "total": round(self.total / GB, 3)}


def gpt_num_params(n_layer: int, n_embd: int, vocab_size: int, block_size: int, bias: bool = True,
                   non_embedding: bool = True) -> int:
    """ds_gpt.model.GPT(...).num_params(non_embedding), without building the model."""
    d, b = n_embd, int(bias)
    layer = (2 * (d + b * d)  # ln_1, ln_2
             + (3 * d * d + b * 3 * d) + (d * d + b * d)  # c_attn, attn c_proj
             + (4 * d * d + b * 4 * d) + (4 * d * d + b * d))  # c_fc, mlp c_proj
    total = vocab_size * d + block_size * d + n_layer * layer + (d + b * d)  # wte (tied), wpe, ln_f
    return total - block_size * d if non_embedding else total


def model_states(n_params: int, zero_stage: int, dp: int, dtype: str, largest_layer: int) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per GPU, as DeepSpeed holds them with AdamW.

    16-bit training: 16-bit weights (2 B/param), 16-bit grads (2) and the fp32 grads the
    optimizer reads (4), fp32 master weights + Adam m + v (12). ZeRO-1 partitions the fp32
    state over the dp ranks, ZeRO-2 the 16-bit grads too, ZeRO-3 the 16-bit weights, which
    are gathered a layer or two at a time (DeepSpeed's estimators allow 4 B x largest layer).
    fp32 training: weights 4, grads 4, m + v 8, partitioned by the same rules.
    """
    if dtype_key(dtype) in ("bf16", "fp16"):
        w, g16, g32, opt = 2.0, 2.0, 4.0, 12.0
    else:
        w, g16, g32, opt = 4.0, 4.0, 0.0, 8.0
    weights = w * n_params / dp + 4 * largest_layer if zero_stage >= 3 else w * n_params
    grads = g16 * n_params / (dp if zero_stage >= 2 else 1) + g32 * n_params / (dp if zero_stage >= 1 else 1)
    optimizer = opt * n_params / (dp if zero_stage >= 1 else 1)
    return weights, grads, optimizer


def activations(n_layer: int, n_embd: int, vocab_size: int, seq_len: int, micro_batch: int, dtype: str) -> float:
    """Bytes kept for backward by one micro-batch, without activation checkpointing.

    Per layer 34·s·b·h bytes in 16-bit (Korthikanti et al. 2022, "Reducing Activation
    Recomputation", eq. 1); the 5·a·s²·b term for attention scores is gone with fused SDPA.
    Plus the logits: 16-bit logits, their fp32 copy for the loss, and the loss's fp32
    log-softmax (2 + 4 + 4 B per element); in fp32, 4 + 4.
    """
    sixteen = dtype_key(dtype) in ("bf16", "fp16")
    per_layer = 34 * seq_len * micro_batch * n_embd * (1 if sixteen else 2)
    logits = micro_batch * seq_len * vocab_size * (10 if sixteen else 8)
    return n_layer * per_layer + logits


def plan(n_layer: int, n_head: int, n_embd: int, *, gpus: int, gpu: str, zero_stage: int, mfu: float = 0.34,
         dtype: str = "bfloat16", vocab_size: int = 50304, block_size: int = 1024, micro_batch: int = 12,
         tokens_per_iter: int = 491_520, max_iters: int = 600_000, gpu_mem_gb: float | None = None) -> dict:
    """Everything the CLI prints, as one JSON-able dict."""
    problems = []
    if gpus < 1:
        problems.append(f"--gpus must be >= 1, got {gpus}")
        gpus = 1
    if gpu not in GPUS:
        problems.append(f"unknown --gpu {gpu!r} (known: {', '.join(GPUS)})")
    if n_embd % n_head:
        problems.append(f"n_embd {n_embd} is not divisible by n_head {n_head}")
    if not 0 < mfu <= 1:
        problems.append(f"--mfu must be in (0, 1], got {mfu}")
    if zero_stage not in (0, 1, 2, 3):
        problems.append(f"--zero_stage must be 0-3, got {zero_stage}")
    per_step = micro_batch * block_size * gpus
    if tokens_per_iter % per_step:
        problems.append(f"tokens_per_iter {tokens_per_iter} is not a multiple of micro_batch x block_size x gpus "
                        f"= {per_step}")
    if problems:
        raise UserError("; ".join(problems))
    peak_key, default_mem = GPUS[gpu]
    key = dtype_key(dtype)
    if key not in PEAK_TFLOPS[peak_key]:
        raise UserError(f"{peak_key} has no {key} peak", hint="pass --dtype float16 or float32")
    peak = PEAK_TFLOPS[peak_key][key] * 1e12

    n_params = gpt_num_params(n_layer, n_embd, vocab_size, block_size)  # N for FLOPs
    n_total = gpt_num_params(n_layer, n_embd, vocab_size, block_size, non_embedding=False)  # all stored
    largest_layer = max(vocab_size * n_embd, 4 * n_embd * n_embd)  # the tied embedding, for GPT-2
    act = activations(n_layer, n_embd, vocab_size, block_size, micro_batch, dtype)
    by_stage = {s: Memory(*model_states(n_total, s, gpus, dtype, largest_layer), act) for s in range(4)}

    fpt = flops_per_token(n_params, n_layer, n_embd, block_size)
    iter_time_s = tokens_per_iter * fpt / (gpus * peak * mfu)
    total_s = iter_time_s * max_iters
    gpu_mem = gpu_mem_gb or default_mem
    return {
        "model": {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": block_size,
                  "vocab_size": vocab_size},
        "n_params": n_params, "n_params_total": n_total, "gpus": gpus, "gpu": gpu, "zero_stage": zero_stage,
        "dtype": dtype, "mfu": mfu, "peak_tflops": peak / 1e12, "flops_per_token": fpt,
        "tokens_per_iter": tokens_per_iter, "micro_batch": micro_batch, "grad_accum": tokens_per_iter // per_step,
        "max_iters": max_iters, "iter_time_s": iter_time_s, "tokens_per_s": tokens_per_iter / iter_time_s,
        "total_days": total_s / 86400, "gpu_hours": total_s * gpus / 3600,
        "memory_gb": by_stage[zero_stage].gb(), "memory_gb_by_stage": {s: m.gb() for s, m in by_stage.items()},
        "gpu_mem_gb": gpu_mem, "fits": by_stage[zero_stage].total / GB <= gpu_mem,
    }


def render(p: dict) -> str:
    m = p["model"]
    lines = [
        f"model: {m['n_layer']} layers, {m['n_head']} heads, d={m['n_embd']}, T={m['block_size']}: "
        f"N={p['n_params'] / 1e6:.2f}M (stored {p['n_params_total'] / 1e6:.2f}M), "
        f"{p['flops_per_token'] / 1e9:.3f} GFLOPs/token",
        f"run: {p['gpus']} x {p['gpu']} ({p['peak_tflops']:g} TFLOPS {p['dtype']}), ZeRO-{p['zero_stage']}, "
        f"{p['tokens_per_iter']:,} tokens/iter = micro {p['micro_batch']} x grad_accum {p['grad_accum']} x "
        f"{p['gpus']} GPUs, {p['max_iters']:,} iters",
        f"at MFU {p['mfu']:.0%}: {p['iter_time_s'] * 1000:.0f} ms/iter, {p['tokens_per_s']:,.0f} tokens/s, "
        f"{p['total_days']:.2f} days, {p['gpu_hours']:,.0f} GPU-hours",
        "",
        "per-GPU memory, GB (no checkpointing; add 1-3 GB for CUDA context and buffers):",
        "stage  weights   grads  optimizer  activations   total",
    ]
    for s, mem in p["memory_gb_by_stage"].items():
        mark = " <-" if int(s) == p["zero_stage"] else ""
        lines.append(f"ZeRO-{s} {mem['weights']:8.2f} {mem['grads']:7.2f} {mem['optimizer']:10.2f} "
                     f"{mem['activations']:12.2f} {mem['total']:7.2f}{mark}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"ZeRO-{p['zero_stage']} {verdict} in {p['gpu_mem_gb']:g} GB"
                 + ("" if p["fits"] else ": try a higher --zero_stage or a smaller --micro_batch"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import math

    from ds_gpt.errors import ArgumentParser

    ap = ArgumentParser(prog="python -m ds_gpt.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="124M", choices=list(MODELS), help="GPT-2 size")
    ap.add_argument("--n_layer", type=int, help="override the preset's layers")
    ap.add_argument("--n_head", type=int, help="override the preset's heads")
    ap.add_argument("--n_embd", type=int, help="override the preset's width")
    ap.add_argument("--block_size", type=int, default=1024)
    ap.add_argument("--vocab_size", type=int, default=50304)
    ap.add_argument("--gpus", type=int, default=8, help="world size (data-parallel ranks)")
    ap.add_argument("--gpu", default="a100", help=f"one of {', '.join(GPUS)}")
    ap.add_argument("--gpu_mem_gb", type=float, help="memory of one GPU (default: the --gpu's)")
    ap.add_argument("--zero_stage", type=int, default=1)
    ap.add_argument("--mfu", type=float, default=0.34, help="assumed MFU (the seed measured 0.34 on 8 x A100)")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    ap.add_argument("--micro_batch", type=int, default=12, help="sequences per GPU per micro-step")
    ap.add_argument("--tokens_per_iter", type=int, default=491_520, help="global batch in tokens")
    ap.add_argument("--max_iters", type=int, default=600_000)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    # Counts below 1 and non-finite numbers would end in a ZeroDivisionError or a nan plan.
    bad = [f"--{k} must be >= 1 (got {v})" for k, v in vars(args).items()
           if k not in ("zero_stage", "json") and isinstance(v, int) and not isinstance(v, bool) and v < 1]
    bad += [f"--{k} must be a finite number > 0 (got {v})" for k, v in vars(args).items()
            if isinstance(v, float) and not (math.isfinite(v) and v > 0)]
    if bad:
        raise UserError("; ".join(bad))
    preset = MODELS[args.model]
    n_layer, n_head, n_embd = (v if v is not None else d
                               for v, d in zip((args.n_layer, args.n_head, args.n_embd), preset, strict=True))
    p = plan(n_layer, n_head, n_embd, gpus=args.gpus, gpu=args.gpu.lower(), zero_stage=args.zero_stage, mfu=args.mfu,
             dtype=args.dtype, vocab_size=args.vocab_size, block_size=args.block_size, micro_batch=args.micro_batch,
             tokens_per_iter=args.tokens_per_iter, max_iters=args.max_iters, gpu_mem_gb=args.gpu_mem_gb)
    print(json.dumps(p, indent=1) if args.json else render(p))
    return 0


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.plan")
