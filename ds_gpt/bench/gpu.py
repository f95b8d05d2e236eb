"""gpu: every GPU figure in one run of at most ~8 minutes on one H100/H200, for short device windows.

    python -m ds_gpt.bench gpu --json benchmarks/gpu.json

Four parts, each a real command in its own process (a fresh CUDA context, the figures as users
get them), on synthetic data (no download):
1. `bench step --recipe --dtype bfloat16 --compile`: the 124M bf16 step against nanoGPT's plain
   PyTorch loop: tokens/s, MFU, DeepSpeed's overhead.
2. The trainer, 124M bf16, AdamW (ds_configs/zero1.json) and Muon (zero1_muon.json), with the flops
   profiler on one iteration: median step time of each, MFU, the profiler's cross-check, and the
   peak memory against `plan`'s prediction for the same run.
3. HellaSwag in the AdamW run's loop, at its first and last iteration, on a synthetic set as large
   as the validation split (10,042 items, 4 endings each, of about its lengths in tokens; prepared
   by `prepare --dataset hellaswag --data_files`): what one pass adds to a run.
4. One summary table, and one JSON with everything.
CUDA only: on a machine without a GPU it refuses in one line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ds_gpt.bench.common import add_json_arg, machine, write_json, write_synthetic_bin
from ds_gpt.config import positive_int
from ds_gpt.errors import UserError
from ds_gpt.paths import REPO_ROOT
from ds_gpt.presets import GPT2_VOCAB_SIZE, MODELS

WORDS = ("the a man woman dog car house water ball he she they it runs walks holds puts takes opens closes "
         "then while after before into onto with from over under quickly slowly small large red blue green "
         "kitchen field street table door window bread knife rope board camera guitar").split()


def write_synthetic_hellaswag(path: Path, items: int, seed: int = 0) -> None:
    """`items` HellaSwag-shaped items (the original jsonl's fields) of random words: a context of
    ~40 words and 4 endings of ~20, about the validation split's lengths. The scores mean nothing;
    the pass's time is the figure."""
    import random

    rng = random.Random(seed)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    with open(path, "w") as fh:
        for i in range(items):
            ctx_a, ctx_b = sentence(rng.randint(25, 45)), rng.choice(WORDS)
            fh.write(json.dumps({"ind": i, "activity_label": "Synthetic", "ctx_a": ctx_a, "ctx_b": ctx_b,
                                 "ctx": f"{ctx_a} {ctx_b.capitalize()}", "split": "val", "split_type": "indomain",
                                 "endings": [sentence(rng.randint(12, 28)) for _ in range(4)],
                                 "source_id": f"synthetic~{i}", "label": str(rng.randrange(4))}) + "\n")


def add_gpu(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu", help="every GPU figure in one run: step vs plain loop, AdamW vs Muon, memory vs plan")
    p.add_argument("--iters", type=positive_int, default=30, help="trainer iterations per optimizer")
    p.add_argument("--micro_batch_size", type=positive_int, default=12, help="sequences per micro-step (T=1024)")
    add_json_arg(p)
    p.set_defaults(func=bench_gpu)


def _run(cmd: list[str], what: str, timeout: int = 240) -> float:
    print(f"[{what}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, timeout=timeout, stdout=sys.stdout, stderr=sys.stderr)
    if proc.returncode:
        raise UserError(f"{what} exited {proc.returncode}", hint="its output is above")
    return time.perf_counter() - t0


def _trainer(tmp: Path, name: str, ds_json: str, args: argparse.Namespace, *extra: str) -> dict:
    out = tmp / name
    seconds = _run([sys.executable, "-m", "ds_gpt.train", "--deepspeed_config", ds_json, "--data_dir", str(tmp),
                    "--out_dir", str(out), "--model", "124M", "--dtype", "bfloat16", "--compile", "True",
                    "--micro_batch_size", str(args.micro_batch_size), "--gradient_accumulation_steps", "1",
                    "--max_iters", str(args.iters), "--eval_interval", str(10 * args.iters), "--eval_iters", "1",
                    "--warmup_iters", "5", "--lr_decay_iters", str(args.iters), "--checkpoint_interval",
                    str(10 * args.iters), "--profile_step", str(args.iters - 5), *extra], f"trainer {name}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "dt_ms" in r and r["iter"] >= 10]  # after compilation and warmup
    profile = next((r for r in records if r.get("event") == "flops_profile"), {})
    hellaswag = [r for r in records if r.get("event") == "hellaswag"]
    return {"ms_per_iter": statistics.median(r["dt_ms"] for r in steps),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
            "mfu": statistics.median(r["mfu"] for r in steps),
            "peak_mem_mib": max(r["peak_mem_mb"] for r in steps),
            "mfu_profiler": profile.get("mfu_profiler"), "mfu_analytic": profile.get("mfu_analytic"),
            "final_loss": steps[-1]["loss"], "wall_s": seconds,
            "hellaswag": [{"iter": r["iter"], "items": r["items"], "seconds": r["seconds"]} for r in hellaswag]}


def bench_gpu(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError("bench gpu needs a CUDA GPU; this machine has none",
                        hint="run it on a GPU node (docs/benchmarks.md); on CPU see bench step and bench recipe")
    from ds_gpt import plan

    device = torch.cuda.get_device_name()
    started = time.perf_counter()
    figures: dict = {"device": device}
    with tempfile.TemporaryDirectory(prefix="ds_gpt-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        for split, n in (("train", 1 << 24), ("val", 1 << 20)):
            write_synthetic_bin(tmp / f"{split}.bin", n, GPT2_VOCAB_SIZE)  # ids a real corpus holds
        write_synthetic_hellaswag(tmp / "hellaswag.jsonl", 10_042)
        _run([sys.executable, "-m", "ds_gpt.prepare", "--dataset", "hellaswag", "--data_files",
              str(tmp / "hellaswag.jsonl"), "--out_dir", str(tmp / "hellaswag")], "a synthetic HellaSwag set")
        step_json = tmp / "step.json"
        _run([sys.executable, "-m", "ds_gpt.bench", "step", "--recipe", "--dtype", "bfloat16", "--compile",
              "--gradient_accumulation_steps", "1", "--iters", "20", "--warmup", "5", "--json", str(step_json)],
             "step vs plain PyTorch")
        figures["step"] = json.loads(step_json.read_text())
        figures["adamw"] = _trainer(tmp, "adamw", "ds_configs/zero1.json", args, "--hellaswag_dir",
                                    str(tmp / "hellaswag"), "--hellaswag_interval", str(args.iters))
        figures["muon"] = _trainer(tmp, "muon", "ds_configs/zero1_muon.json", args, "--hellaswag_interval", "0")
    predicted = plan.plan(*MODELS["124M"], gpus=1, gpu="h100", zero_stage=1, micro_batch=args.micro_batch_size,
                          tokens_per_iter=args.micro_batch_size * 1024, gpu_mem_gb=torch.cuda.get_device_properties(
                              0).total_memory / 1e9)
    figures["memory"] = {"plan_peak_gib": predicted["peak_bytes_per_gpu"] / 2**30,
                         "measured_peak_gib": figures["adamw"]["peak_mem_mib"] / 1024}
    figures["muon_vs_adamw_step"] = figures["muon"]["ms_per_iter"] / figures["adamw"]["ms_per_iter"]
    figures["wall_s"] = time.perf_counter() - started

    step = figures["step"]["results"]
    print(f"\nGPU benchmark on {device} ({machine()}), {figures['wall_s']:.0f} s in all")
    print(f"  {'what':34s} {'ms/iter':>9s} {'tokens/s':>11s} {'MFU':>7s}")
    for name, r in step.items():
        print(f"  {'step: ' + name:34s} {r['ms_per_iter']:9.1f} {r['tokens_per_s']:11,.0f} {r['mfu']:7.1%}")
    for name in ("adamw", "muon"):
        r = figures[name]
        profiled = f" (profiler {r['mfu_profiler']:.1%})" if r["mfu_profiler"] is not None else ""
        print(f"  {'trainer 124M bf16 ' + name:34s} {r['ms_per_iter']:9.1f} {r['tokens_per_s']:11,.0f} "
              f"{r['mfu']:7.1%}{profiled}")
    print(f"  Muon step / AdamW step: {figures['muon_vs_adamw_step']:.2f}x; DeepSpeed overhead vs the plain loop "
          f"{figures['step']['overhead_paired']:+.1%}; host waits per step "
          f"{figures['step']['host_syncs_per_step']} (the trainer's promise: 1)")
    print(f"  memory: plan {figures['memory']['plan_peak_gib']:.2f} GiB, measured peak "
          f"{figures['memory']['measured_peak_gib']:.2f} GiB (max_memory_allocated)")
    for r in figures["adamw"]["hellaswag"]:
        print(f"  HellaSwag pass at iteration {r['iter']}: {r['items']:,} items in {r['seconds']:.1f} s")
    write_json(args.json, "gpu", figures)
