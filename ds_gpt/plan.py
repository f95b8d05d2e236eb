"""Plan a run before queueing it: what each GPU holds and sends, how long an iteration takes, days.

    python -m ds_gpt.plan --model 124M --gpus 8 --nodes 2 --gpu a100 --zero_stage 1
    python -m ds_gpt.plan --model 1558M --gpus 16 --gpu h100 --zero_stage 3 --mfu 0.40 --json
    python -m ds_gpt.plan --fit --model 774M --gpus 8 --gpu a100 --write_config ds_configs/gpt2-large.json

Memory per GPU: the model states as DeepSpeed lays them out (ds_gpt.plan_memory, checked
against the tensors of real engines by ds_gpt.accounting), the transients around them, and an
estimate of the activations. Communication: the bytes each collective moves per step
(ds_gpt.plan_comm, checked against deepspeed.comm's logger). Time: the compute at an MFU
measured on one node (--mfu; 0.39 is the reference run's nanoGPT on 2 x A100), plus the
communication compute does not hide, over the links each collective crosses.
docs/planning.md explains every field and assumption.

Pure arithmetic on text and numbers: imports neither torch nor deepspeed.
"""
from __future__ import annotations

import json
import math

from ds_gpt import plan_fit
from ds_gpt.errors import ArgumentParser, UserError, run_cli
from ds_gpt.mfu import PEAK_TFLOPS, dtype_key, flops_per_token, fwd_flops_per_token
from ds_gpt.plan_comm import (
    LINKS,
    Links,
    comm_seconds,
    gathers_per_micro_batch,
    message_bytes,
    offload_seconds,
    wire_bytes,
)
from ds_gpt.plan_memory import (
    DTYPE_BYTES,
    Setup,
    activation_bytes,
    gpt_layout,
    heaviest_rank,
    state_bytes,
    transient_bytes,
)
from ds_gpt.presets import MODELS, canonical
from ds_gpt.recompute import MODES as CHECKPOINTING
from ds_gpt.recompute import hardware_flops_per_token

GB = 1e9

# --gpu: (PEAK_TFLOPS key, memory GB). The reference cluster (Narval) has 40 GB A100s.
GPUS = {
    "a100": ("A100", 40), "a100-80g": ("A100", 80), "h100": ("H100-SXM", 80), "h100-pcie": ("H100-PCIe", 80),
    "h200": ("H200", 141), "gh200": ("GH200", 96), "b200": ("B200", 180), "l40s": ("L40S", 48),
    "l4": ("L4", 24), "a10g": ("A10", 24), "a40": ("A40", 48), "a6000": ("RTX-A6000", 48),
    "rtx4090": ("RTX-4090", 24), "rtx3090": ("RTX-3090", 24), "v100": ("V100-SXM", 32), "t4": ("T4", 16),
    "mi300x": ("MI300X", 192),
}
OFFLOAD = ("none", "optimizer", "all")  # all: optimizer and parameters (ZeRO-3)
# Memory a plan must leave free: a fraction of the GPU (fragmentation, the activations this
# estimate misses) and a fixed allowance for the CUDA context, NCCL's buffers and cuBLAS workspaces.
MEM_MARGIN, CUDA_CONTEXT_GB = 0.10, 1.5
# ZeRO-Offload's CPU AdamW, parameters per second per node: an assumption; measure yours.
CPU_ADAM_PARAMS_PER_S = 1e9


def gpt_num_params(n_layer: int, n_embd: int, vocab_size: int, block_size: int, bias: bool = True,
                   non_embedding: bool = True) -> int:
    """ds_gpt.model.GPT(...).num_params(non_embedding), without building the model."""
    total = gpt_layout(n_layer, n_embd, vocab_size, block_size, bias).numel
    return total - block_size * n_embd if non_embedding else total


def shipped_zero_block(zero_stage: int) -> dict:
    """The zero_optimization block of ds_configs/zero<stage>.json, the shipped engine settings."""
    from ds_gpt.run_config import load_ds_config

    return dict(load_ds_config(f"ds_configs/zero{zero_stage}.json").get("zero_optimization", {}))


def plan(n_layer: int, n_head: int, n_embd: int, *, gpus: int, gpu: str, zero_stage: int, mfu: float = 0.39,
         nodes: int | None = None, dtype: str = "bfloat16", vocab_size: int = 50304, block_size: int = 1024,
         bias: bool = False, micro_batch: int = 12, tokens_per_iter: int = 491_520, max_iters: int = 600_000,
         activation_checkpointing: str = "none", offload: str = "none", zero: dict | None = None,
         comm_dtype: str | None = None, gpu_mem_gb: float | None = None, gpus_per_node: int | None = None,
         intra_node_GBps: float | None = None, inter_node_GBps: float | None = None,
         mem_margin: float = MEM_MARGIN, cuda_context_gb: float = CUDA_CONTEXT_GB, optimizer: str = "adamw") -> dict:
    """Everything the CLI prints, as one JSON-able dict. `zero`: the DeepSpeed zero_optimization
    block (default: the shipped ds_configs/zero<stage>.json's)."""
    problems: dict[str, str] = {}  # each problem, and the flag that fixes it

    def problem(message: str, hint: str) -> None:
        problems[message] = hint

    if gpus < 1:
        problem(f"--gpus must be >= 1, got {gpus}", "--gpus is the number of data-parallel ranks: 1 or more")
        gpus = 1
    if gpu not in GPUS:
        problem(f"unknown --gpu {gpu!r} (known: {', '.join(GPUS)})",
                "take the closest known --gpu and give its memory with --gpu_mem_gb")
    if n_embd % n_head:
        problem(f"n_embd {n_embd} is not divisible by n_head {n_head}", "pick an --n_head that divides --n_embd")
    if not 0 < mfu <= 1:
        problem(f"--mfu must be in (0, 1], got {mfu}", "--mfu is a fraction: 0.39 for 39%")
    if zero_stage not in (0, 1, 2, 3):
        problem(f"--zero_stage must be 0-3, got {zero_stage}", "--zero_stage 0, 1, 2 or 3")
    if dtype not in DTYPE_BYTES or (comm_dtype or dtype) not in DTYPE_BYTES:
        problem(f"--dtype/--comm_dtype must be one of {', '.join(DTYPE_BYTES)}", "--dtype bfloat16 on A100 and newer")
    if activation_checkpointing not in CHECKPOINTING:
        problem(f"--activation_checkpointing must be one of {', '.join(CHECKPOINTING)}",
                "--activation_checkpointing none or full")
    if offload not in OFFLOAD or (offload == "optimizer" and zero_stage < 2) or (offload == "all" and zero_stage < 3):
        problem(f"--offload {offload}: optimizer offload needs ZeRO-2 or 3, parameter offload (all) ZeRO-3",
                "--offload optimizer with --zero_stage 2 or 3, --offload all with --zero_stage 3")
    links = LINKS.get(gpu, LINKS["a100"])
    per_node = gpus_per_node or links.gpus_per_node
    if nodes is not None and (nodes < 1 or gpus % nodes):
        divisor = max(d for d in range(1, max(nodes, 1) + 1) if gpus % d == 0)
        problem(f"--gpus {gpus} do not split evenly over --nodes {nodes}",
                f"give --nodes a divisor of {gpus}, e.g. --nodes {divisor}")
        nodes = 1
    elif nodes is None and gpus % math.ceil(gpus / per_node):
        # The node count follows from the GPU's usual node: say so, not as if --nodes had been given.
        need = math.ceil(gpus / per_node)
        problem(f"--gpus {gpus} do not split evenly over the {need} nodes of up to {per_node} GPUs they need "
                f"({'--gpus_per_node' if gpus_per_node else f'the usual {gpu} node'})",
                f"give a GPU count that does (e.g. --gpus {need * (gpus // need)}), or say how they are spread, "
                f"e.g. --nodes {gpus} --gpus_per_node 1")
        nodes = 1
    nodes = nodes or math.ceil(gpus / per_node)
    per_step = micro_batch * block_size * gpus
    if micro_batch < 1 or tokens_per_iter % per_step:
        nearest = max(1, round(tokens_per_iter / per_step)) * per_step
        problem(f"tokens_per_iter {tokens_per_iter} is not a multiple of micro_batch x block_size x gpus "
                f"= {per_step}", f"pass --tokens_per_iter {nearest} (the nearest multiple), or another --micro_batch")
    if problems:
        raise UserError("; ".join(problems), hint="; ".join(dict.fromkeys(problems.values())))
    peak_key, default_mem = GPUS[gpu]
    if dtype_key(dtype) not in PEAK_TFLOPS[peak_key]:
        raise UserError(f"{peak_key} has no {dtype_key(dtype)} peak", hint="pass --dtype float16 or float32")
    peak = PEAK_TFLOPS[peak_key][dtype_key(dtype)] * 1e12
    links = Links(gpus // nodes, intra_node_GBps or links.intra_GBps, inter_node_GBps or links.inter_GBps,
                  links.pcie_GBps, links.source if not (intra_node_GBps or inter_node_GBps) else "--*_node_GBps")
    grad_accum = tokens_per_iter // per_step
    layout = gpt_layout(n_layer, n_embd, vocab_size, block_size, bias)
    setup = Setup(layout, gpus, zero_stage, dtype, offload in ("optimizer", "all"), offload == "all",
                  shipped_zero_block(zero_stage) if zero is None else zero, comm_dtype, optimizer)

    # memory
    rank = heaviest_rank(setup)
    states = state_bytes(setup, rank)
    gathered = gathers_per_micro_batch(setup, activation_checkpointing)[1] if zero_stage == 3 else 0
    if zero_stage == 3 and gpus == 1 and not setup.offload_param:
        gathered = 0  # the one rank's partitions are the whole parameters, already counted
    transient = transient_bytes(setup, gathered)
    act = activation_bytes(n_layer, n_embd, vocab_size, block_size, micro_batch, dtype, activation_checkpointing)
    state_total = sum(states["gpu"].values())
    peak_bytes = state_total + max(act + transient["backward"], transient["step"])
    gpu_mem = gpu_mem_gb or default_mem
    usable = gpu_mem * (1 - mem_margin) - cuda_context_gb

    # time
    n_params = layout.numel - block_size * n_embd  # N for FLOPs: nanoGPT's count, no position embedding
    fpt = flops_per_token(n_params, n_layer, n_embd, block_size)
    hw_fpt = hardware_flops_per_token(n_params, n_layer, n_embd, block_size, activation_checkpointing,
                                      vocab_size=vocab_size)
    compute_s = tokens_per_iter * hw_fpt / (gpus * peak * mfu)
    micro_s = compute_s / grad_accum
    fwd_s = micro_s * fwd_flops_per_token(n_params, n_layer, n_embd, block_size) / hw_fpt
    comm = comm_seconds(setup, nodes, links, grad_accum, fwd_s, micro_s - fwd_s, activation_checkpointing)
    offload_s = offload_seconds(setup, links, gpus // nodes, CPU_ADAM_PARAMS_PER_S, grad_accum,
                                activation_checkpointing)
    iter_s = compute_s + comm["exposed"] + offload_s
    msg = message_bytes(setup, grad_accum, activation_checkpointing)
    wire = {k: sum(wire_bytes(op, b, gpus, nodes)[k] for op, b in msg.items()) for k in ("intra", "inter")}
    total_s = iter_s * max_iters
    tokens_per_s = tokens_per_iter / iter_s
    return {
        "model": {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": block_size,
                  "vocab_size": vocab_size, "bias": bias},
        "n_params": n_params, "n_params_total": layout.numel,
        "gpus": gpus, "nodes": nodes, "gpus_per_node": gpus // nodes, "gpu": gpu, "zero_stage": zero_stage,
        "dtype": dtype, "comm_dtype": comm_dtype or dtype, "offload": offload, "optimizer": optimizer,
        "activation_checkpointing": activation_checkpointing,
        "micro_batch": micro_batch, "grad_accum": grad_accum, "tokens_per_iter": tokens_per_iter,
        "max_iters": max_iters,
        "state_bytes_per_rank": states["gpu"], "state_bytes_rank": rank, "offloaded_bytes_per_rank": states["cpu"],
        "activation_bytes": act, "transient_bytes": transient, "peak_bytes_per_gpu": peak_bytes,
        "memory_gb": {**{k: round(v / GB, 3) for k, v in states["gpu"].items()}, "activations": round(act / GB, 3),
                      "transient": round(max(transient["backward"], transient["step"]) / GB, 3),
                      "total": round(peak_bytes / GB, 3)},
        "gpu_mem_gb": gpu_mem, "mem_margin": mem_margin, "cuda_context_gb": cuda_context_gb,
        "usable_gb": round(usable, 3), "fits": peak_bytes / GB <= usable,
        "comm_bytes_per_step_per_rank": {**msg, "total": sum(msg.values())},
        "wire_bytes_per_step_per_rank": {"intra_node": round(wire["intra"]), "inter_node": round(wire["inter"])},
        "links": {"gpus_per_node": links.gpus_per_node, "intra_node_GBps": links.intra_GBps,
                  "inter_node_GBps": links.inter_GBps, "source": links.source},
        "mfu_single_node": mfu, "peak_tflops": peak / 1e12, "flops_per_token": fpt, "hardware_flops_per_token": hw_fpt,
        "compute_time_s": compute_s, "comm_time_s": comm["total"], "comm_exposed_s": comm["exposed"],
        "comm_time_by_collective_s": comm["by_collective"], "offload_time_s": offload_s, "iter_time_s": iter_s,
        "scaling_efficiency": compute_s / iter_s, "mfu": tokens_per_s * fpt / (gpus * peak),
        "tokens_per_s": tokens_per_s, "total_days": total_s / 86400, "gpu_hours": total_s * gpus / 3600,
        "tokens_to_finish": tokens_per_iter * max_iters, "hours_to_finish": total_s / 3600,
        "days_per_10b_tokens": 1e10 / tokens_per_s / 86400,
        "assumptions": assumptions(setup, mem_margin, cuda_context_gb),
    }


def assumptions(s: Setup, mem_margin: float, cuda_context_gb: float) -> list[str]:
    overlap = s.knob("overlap_comm")
    hidden = {0: "the gradient all-reduce runs after the backward: nothing hidden",
              1: ("the gradient all-reduce overlaps the last backward" if overlap
                  else "the gradient all-reduce runs after the backward: nothing hidden"),
              2: ("each micro-batch's all-reduce hides behind its backward" if overlap
                  else "each micro-batch's all-reduce runs after its backward: nothing hidden"),
              3: ("parameter gathers hide behind the forward, reduce-scatters behind the backward" if overlap
                  else "gathers and reduce-scatters run between computations: nothing hidden")}[s.zero_stage]
    return [
        f"overlap: {hidden} (overlap_comm={bool(overlap)}); the all-gather after the optimizer step is never hidden",
        "compute runs at the single-node MFU at every scale and micro-batch; collectives at datasheet bandwidths,"
        " hierarchical over nodes, no latency",
        f"fits: peak memory <= GPU memory x {1 - mem_margin:.2f} - {cuda_context_gb:g} GB for the CUDA context;"
        " activations are an estimate",
    ]


def render(p: dict) -> str:
    m, st, link = p["model"], p["state_bytes_per_rank"], p["links"]
    lines = [
        f"model: {m['n_layer']} layers, {m['n_head']} heads, d={m['n_embd']}, T={m['block_size']}: "
        f"N={p['n_params'] / 1e6:.2f}M (stored {p['n_params_total'] / 1e6:.2f}M), "
        f"{p['flops_per_token'] / 1e9:.3f} GFLOPs/token",
        f"run: {p['gpus']} x {p['gpu']} ({p['peak_tflops']:g} TFLOPS {p['dtype']}) on {p['nodes']} node(s), "
        f"ZeRO-{p['zero_stage']}, offload {p['offload']}, checkpointing {p['activation_checkpointing']}, "
        f"{p['tokens_per_iter']:,} tokens/iter = micro {p['micro_batch']} x grad_accum {p['grad_accum']} x "
        f"{p['gpus']} GPUs",
        f"links: {link['intra_node_GBps']:g} GB/s in a node, {link['inter_node_GBps']:g} GB/s per node between "
        f"nodes ({link['source']})",
        "",
        f"per-GPU memory, GB (rank {p['state_bytes_rank']}): params {st['params'] / GB:.2f}, grads "
        f"{st['grads'] / GB:.2f}, optimizer {st['optimizer'] / GB:.2f}, activations {p['activation_bytes'] / GB:.2f}, "
        f"transient {p['memory_gb']['transient']:.2f} -> peak {p['peak_bytes_per_gpu'] / GB:.2f} of "
        f"{p['usable_gb']:.2f} usable: "
        + ("fits" if p["fits"] else "does NOT fit (try --fit, a smaller --micro_batch, --activation_checkpointing "
                                   "full, a higher --zero_stage or --offload)"),
        "per-rank communication per step, MB: " + ", ".join(
            f"{k} {v / 1e6:.1f}" for k, v in p["comm_bytes_per_step_per_rank"].items() if v),
        f"time per iteration: compute {p['compute_time_s'] * 1e3:.0f} ms (at {p['mfu_single_node']:.0%} MFU) + "
        f"communication {p['comm_exposed_s'] * 1e3:.0f} ms not hidden (of {p['comm_time_s'] * 1e3:.0f})"
        + (f" + offload {p['offload_time_s'] * 1e3:.0f} ms" if p["offload_time_s"] else "")
        + f" = {p['iter_time_s'] * 1e3:.0f} ms; scaling efficiency {p['scaling_efficiency']:.0%}, MFU {p['mfu']:.0%}",
        f"{p['tokens_per_s']:,.0f} tokens/s: {p['max_iters']:,} iters in {p['total_days']:.2f} days "
        f"({p['gpu_hours']:,.0f} GPU-hours); 10B tokens in {p['days_per_10b_tokens']:.2f} days",
        f"to finish: {p['tokens_to_finish'] / 1e9:,.2f}B tokens, {p['max_iters']:,} iterations, "
        f"{p['hours_to_finish']:,.1f} h wall-clock, {p['gpu_hours']:,.0f} GPU-hours",
        "assumptions: " + "; ".join(p["assumptions"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m ds_gpt.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", metavar="TOML", help="a training config (config/*.toml, with its DeepSpeed JSON): "
                    "its model, batch, ZeRO stage, precision and max_iters replace the flags below")
    ap.add_argument("--model", default="124M", help=f"GPT-2 size: {', '.join(MODELS)} (or gpt2, gpt2-medium ...)")
    ap.add_argument("--n_layer", type=int, help="override the preset's layers")
    ap.add_argument("--n_head", type=int, help="override the preset's heads")
    ap.add_argument("--n_embd", type=int, help="override the preset's width")
    ap.add_argument("--block_size", type=int, default=1024)
    ap.add_argument("--vocab_size", type=int, default=50304)
    ap.add_argument("--bias", action="store_true", help="biases in Linear and LayerNorm (the trainer's default: none)")
    ap.add_argument("--gpus", type=int, default=8, help="world size (data-parallel ranks)")
    ap.add_argument("--nodes", type=int, help="nodes the GPUs are spread over (default: as many as the --gpu's "
                    "usual node needs)")
    ap.add_argument("--gpu", default="a100", help=f"one of {', '.join(GPUS)}")
    ap.add_argument("--gpu_mem_gb", type=float, help="memory of one GPU (default: the --gpu's)")
    ap.add_argument("--gpus_per_node", type=int, help="GPUs in one node (default: the --gpu's usual node)")
    ap.add_argument("--intra_node_GBps", type=float, help="GPU-to-GPU bandwidth in a node, GB/s per direction")
    ap.add_argument("--inter_node_GBps", type=float, help="node-to-network bandwidth, GB/s per direction "
                    "(one HDR 200 Gb/s link = 25)")
    ap.add_argument("--zero_stage", type=int, default=1)
    ap.add_argument("--mfu", type=float, default=0.39, help="MFU measured on one node (the reference run: 0.39 "
                    "on 2 x A100)")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    ap.add_argument("--comm_dtype", help="DeepSpeed's communication_data_type (default: --dtype)")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "muon"),
                    help="muon: DeepSpeed's Muon, one momentum buffer for the hidden matrices (ZeRO-0..2)")
    ap.add_argument("--micro_batch", type=int, default=12, help="sequences per GPU per micro-step")
    ap.add_argument("--activation_checkpointing", default="none", help=" | ".join(CHECKPOINTING))
    ap.add_argument("--offload", default="none", help="none | optimizer (ZeRO-2/3) | all (optimizer and "
                    "parameters, ZeRO-3)")
    ap.add_argument("--tokens_per_iter", type=int, default=491_520, help="global batch in tokens")
    ap.add_argument("--max_iters", type=int, default=600_000)
    ap.add_argument("--fit", action="store_true", help="search stage, micro-batch, checkpointing and offload for the "
                    "fastest configuration that fits")
    ap.add_argument("--write_config", metavar="FILE", help="with --fit: write the chosen DeepSpeed JSON here")
    ap.add_argument("--write_run_config", metavar="FILE", help="with --fit: write a TOML for --config (model, "
                    "activation checkpointing, the JSON)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.config:
        adopt_run_config(args)
    check_numbers(args)
    shape = MODELS[canonical(args.model)]
    n_layer, n_head, n_embd = (v if v is not None else d
                               for v, d in zip((args.n_layer, args.n_head, args.n_embd), shape, strict=True))
    common = dict(gpus=args.gpus, gpu=args.gpu.lower(), mfu=args.mfu, nodes=args.nodes, dtype=args.dtype,
                  vocab_size=args.vocab_size, block_size=args.block_size, bias=args.bias,
                  tokens_per_iter=args.tokens_per_iter, max_iters=args.max_iters, comm_dtype=args.comm_dtype,
                  gpu_mem_gb=args.gpu_mem_gb, gpus_per_node=args.gpus_per_node,
                  intra_node_GBps=args.intra_node_GBps, inter_node_GBps=args.inter_node_GBps,
                  optimizer=args.optimizer)
    if args.fit:
        if args.write_run_config and (n_layer, n_head, n_embd) != shape:
            raise UserError(f"--write_run_config writes a GPT-2 preset (model = ...), and this plan's shape "
                            f"({n_layer} layers, {n_head} heads, d={n_embd}) is none of {', '.join(MODELS)}",
                            hint="plan a preset (--model, or a --config that names one), or write the TOML by hand")
        p = plan_fit.fit(plan, n_layer, n_head, n_embd, **common)
        plan_fit.write(p, args.write_config, args.write_run_config, model=canonical(args.model))
        print(json.dumps(p, indent=1) if args.json else plan_fit.render(p, render))
        return 0
    if args.write_config or args.write_run_config:
        raise UserError("--write_config/--write_run_config need --fit")
    p = plan(n_layer, n_head, n_embd, zero_stage=args.zero_stage, micro_batch=args.micro_batch,
             activation_checkpointing=args.activation_checkpointing, offload=args.offload, **common)
    print(json.dumps(p, indent=1) if args.json else render(p))
    return 0


def adopt_run_config(args) -> None:
    """Take the model, batch, ZeRO stage, precision and length of the run `--config` describes, as the
    trainer would resolve them on `--gpus` ranks (ds_gpt.run_config: the same arithmetic, the same errors)."""
    from ds_gpt.config import parse_args
    from ds_gpt.run_config import resolve

    run = resolve(parse_args(["--config", args.config]), args.gpus, cuda=True)
    m = run.model
    # the preset the TOML names, if any, is what --write_run_config writes back (shape flags set the rest)
    args.model = run.train.model or "124M"
    args.n_layer, args.n_head, args.n_embd = m["n_layer"], m["n_head"], m["n_embd"]
    args.block_size, args.vocab_size, args.bias = m["block_size"], m["vocab_size"], m["bias"]
    args.zero_stage, args.dtype, args.micro_batch = run.zero_stage, run.dtype, run.batch.micro
    args.tokens_per_iter, args.max_iters = run.tokens_per_iter, run.train.max_iters
    args.activation_checkpointing, args.optimizer = run.train.activation_checkpointing, run.optimizer


def check_numbers(args) -> None:
    """Counts below 1 and non-finite numbers would end in a ZeroDivisionError or a nan plan."""
    bad = [f"--{k} must be >= 1 (got {v})" for k, v in vars(args).items()
           if k not in ("zero_stage", "json") and isinstance(v, int) and not isinstance(v, bool) and v < 1]
    bad += [f"--{k} must be a finite number > 0 (got {v})" for k, v in vars(args).items()
            if isinstance(v, float) and not (math.isfinite(v) and v > 0)]
    if bad:
        raise UserError("; ".join(bad), hint="counts are 1 or more; --mfu is a fraction such as 0.39 "
                                             "(python -m ds_gpt.plan --help shows every default)")


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.plan")
