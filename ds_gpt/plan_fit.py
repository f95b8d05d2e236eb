"""`python -m ds_gpt.plan --fit`: the fastest configuration that fits, and the files that run it.

The search tries every ZeRO stage, every micro-batch that keeps the recipe's global batch
(micro x accumulation x GPUs = global), activation checkpointing none|full, and CPU offload
where DeepSpeed has it (optimizer: ZeRO-2/3; optimizer and parameters: ZeRO-3). A candidate
fits when its peak memory stays under the GPU's memory less the margin (ds_gpt.plan). Among
those it takes the best predicted tokens/s; candidates within TOLERANCE of the best count as
equal (the model is not more accurate than that), and the simplest of them wins: no offload,
then no checkpointing, then the larger micro-batch (fewer micro-steps, larger matmuls), then
the lower stage (fewer collectives and hooks than the model counts).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ds_gpt import atomic
from ds_gpt.errors import UserError

TOLERANCE = 0.02
STAGE_OFFLOADS = {0: ("none",), 1: ("none",), 2: ("none", "optimizer"), 3: ("none", "optimizer", "all")}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(plan: Callable[..., dict], n_layer: int, n_head: int, n_embd: int, **common) -> list[dict]:
    """Every configuration's plan (fitting or not) for this model, GPUs and global batch."""
    seqs = common["tokens_per_iter"] // common.get("block_size", 1024)
    gpus = common["gpus"]
    if common["tokens_per_iter"] % common.get("block_size", 1024) or seqs % gpus:
        raise UserError(f"the global batch ({seqs} sequences) does not split evenly over {gpus} GPUs",
                        hint="pick a GPU count that divides it, or pass --tokens_per_iter")
    out = []
    for stage, offloads in STAGE_OFFLOADS.items():
        for offload in offloads:
            for ckpt in ("none", "full"):
                for micro in divisors(seqs // gpus):
                    out.append(plan(n_layer, n_head, n_embd, zero_stage=stage, micro_batch=micro,
                                    activation_checkpointing=ckpt, offload=offload, **common))
    return out


def simplicity(p: dict) -> tuple:
    return (p["offload"] != "none", p["activation_checkpointing"] != "none", -p["micro_batch"], p["zero_stage"])


def fit(plan: Callable[..., dict], n_layer: int, n_head: int, n_embd: int, **common) -> dict:
    """The chosen configuration's plan, with a "fit" entry saying how it was chosen."""
    every = candidates(plan, n_layer, n_head, n_embd, **common)
    fitting = [p for p in every if p["fits"]]
    if not fitting:
        raise UserError(*no_fit_message(plan, every, n_layer, n_head, n_embd, common))
    best = max(p["tokens_per_s"] for p in fitting)
    near = [p for p in fitting if p["tokens_per_s"] >= best * (1 - TOLERANCE)]
    chosen = min(near, key=simplicity)
    ranked = sorted(fitting, key=lambda p: -p["tokens_per_s"])
    chosen["fit"] = {
        "candidates": len(every), "fitting": len(fitting), "tolerance": TOLERANCE,
        "rule": "best tokens/s; within the tolerance, the simplest (no offload, no checkpointing, larger "
                "micro-batch, lower stage)",
        "alternatives": [summary(p) for p in ranked[:6]],
    }
    return chosen


def summary(p: dict) -> dict:
    return {"zero_stage": p["zero_stage"], "micro_batch": p["micro_batch"], "grad_accum": p["grad_accum"],
            "activation_checkpointing": p["activation_checkpointing"], "offload": p["offload"],
            "peak_gb": round(p["peak_bytes_per_gpu"] / 1e9, 2), "iter_time_s": round(p["iter_time_s"], 4),
            "tokens_per_s": round(p["tokens_per_s"])}


def no_fit_message(plan, every: list[dict], n_layer: int, n_head: int, n_embd: int, common: dict) -> tuple[str, str]:
    """What it would take: the leanest configuration's need, the GPU memory that holds it, and the
    GPU count at which ZeRO-3 fits without offload (more GPUs shrink every partition, not the
    activations or the parameters a layer gathers)."""
    lean = min(every, key=lambda p: p["peak_bytes_per_gpu"])
    need = lean["peak_bytes_per_gpu"] / 1e9
    gpu_needed = (need + lean["cuda_context_gb"]) / (1 - lean["mem_margin"])
    what = (f"ZeRO-{lean['zero_stage']}, micro-batch {lean['micro_batch']}, checkpointing "
            f"{lean['activation_checkpointing']}, offload {lean['offload']}")
    message = (f"the model does not fit on {common['gpus']} x {common['gpu']} ({lean['gpu_mem_gb']:g} GB, "
               f"{lean['usable_gb']:.1f} GB usable after the margin): the leanest configuration ({what}) needs "
               f"{need:.1f} GB per GPU")
    hint = f"use GPUs with >= {gpu_needed:.0f} GB"
    seqs = common["tokens_per_iter"] // common.get("block_size", 1024)
    for gpus in (g for g in range(common["gpus"] + 1, min(seqs, 4096) + 1) if seqs % g == 0):
        try:
            trial = plan(n_layer, n_head, n_embd, zero_stage=3, micro_batch=1, activation_checkpointing="full",
                         offload="none", **{**common, "gpus": gpus, "nodes": None})
        except UserError:  # a count that does not fill whole nodes
            continue
        if trial["fits"]:
            return message, f"{hint}, or >= {gpus} GPUs (ZeRO-3 without offload)"
    return message, hint


def ds_config(p: dict) -> dict:
    """The DeepSpeed JSON that runs plan `p`: the shipped ds_configs/zero<stage>.json with the plan's
    micro-batch, global batch, precision and offload. Gradient accumulation is left for the resolver
    to derive from them (at the planned GPU count it is the plan's), so the file also runs at
    other GPU counts that divide the global batch."""
    from ds_gpt.run_config import load_ds_config

    ds = load_ds_config(f"ds_configs/zero{p['zero_stage']}.json")
    ds.pop("gradient_accumulation_steps", None)
    ds["train_micro_batch_size_per_gpu"] = p["micro_batch"]
    ds["train_batch_size"] = p["tokens_per_iter"] // p["model"]["block_size"]
    ds["bf16"] = {"enabled": p["dtype"] == "bfloat16"}
    if p["dtype"] == "float16":
        ds["fp16"] = {"enabled": True}
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = p["zero_stage"]
    zero.pop("offload_optimizer", None)
    zero.pop("offload_param", None)
    if p["offload"] in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if p["offload"] == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return ds


def run_config_toml(p: dict, model: str, ds_path: str | None) -> str:
    """A --config TOML for the trainer: the model, the checkpointing choice and the JSON."""
    command = f"python -m ds_gpt.plan --fit --model {model} --gpus {p['gpus']} --nodes {p['nodes']} --gpu {p['gpu']}"
    lines = [f"# GPT-2 {model} on {p['gpus']} x {p['gpu']} ({p['nodes']} node(s)), as chosen by",
             f"#   {command}",
             f"# ZeRO-{p['zero_stage']}, micro-batch {p['micro_batch']} x accumulation {p['grad_accum']}, predicted "
             f"{p['peak_bytes_per_gpu'] / 1e9:.1f} GB per GPU and {p['iter_time_s'] * 1e3:.0f} ms per iteration.",
             "# A plan, not a measurement: the activation memory is the planner's estimate. Check the peak",
             "# on one GPU first (docs/training.md, \"Shipped configurations\").",
             f'model = "{model}"', f'activation_checkpointing = "{p["activation_checkpointing"]}"',
             f'out_dir = "out/gpt2-{model.lower()}"']
    if ds_path:
        lines.append(f'deepspeed_config = "{ds_path}"')
    return "\n".join(lines) + "\n"


def write(p: dict, json_path: str | None, toml_path: str | None, model: str) -> None:
    if json_path:
        atomic.write_text(json_path, json.dumps(ds_config(p), indent=2) + "\n")
    if toml_path:
        atomic.write_text(toml_path, run_config_toml(p, model, json_path))
    p["written"] = [str(Path(f)) for f in (json_path, toml_path) if f]


def render(p: dict, render_plan: Callable[[dict], str]) -> str:
    f = p["fit"]
    lines = [f"chosen from {f['fitting']} fitting of {f['candidates']} configurations ({f['rule']}, "
             f"tolerance {f['tolerance']:.0%}):", render_plan(p), "", "fastest that fit:"]
    for a in f["alternatives"]:
        lines.append(f"  ZeRO-{a['zero_stage']} micro {a['micro_batch']:>3} x {a['grad_accum']:>3} ckpt "
                     f"{a['activation_checkpointing']:<4} offload {a['offload']:<9} {a['peak_gb']:6.2f} GB "
                     f"{a['iter_time_s'] * 1e3:8.1f} ms {a['tokens_per_s']:>10,} tokens/s")
    lines += [f"wrote {w}" for w in p.get("written", [])]
    return "\n".join(lines)
