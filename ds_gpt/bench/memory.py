"""memory: host RSS of a long training run, and of the loader alone: ours, and one long-lived mmap."""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ds_gpt import report
from ds_gpt.bench.common import (
    LongLivedMemmapSampler,
    add_json_arg,
    add_window_args,
    bench_data,
    load,
    loader_rss,
    machine,
    rss_mb,
    sampler_for,
    write_json,
)
from ds_gpt.config import positive_int
from ds_gpt.data import check_token_file
from ds_gpt.errors import UserError
from ds_gpt.paths import REPO_ROOT


def add_memory(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="RSS growth of the trainer over a long run on a big .bin, and the loader's")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data_dir", help="DIR with train.bin and val.bin instead of a synthetic pair")
    src.add_argument("--synthetic_gb", type=float, default=1.0, help="size of the synthetic train.bin in GiB")
    p.add_argument("--iters", type=positive_int, default=3000, help="training iterations, and loader-only batches")
    p.add_argument("--warmup", type=int, default=100, help="iterations before the RSS baseline is taken")
    add_window_args(p)
    p.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), default=1, help="ZeRO stage of the trainer's engine")
    p.add_argument("--vocab_size", type=int, default=64,
                   help="the tiny model's vocabulary; synthetic ids stay below it")
    add_json_arg(p)
    p.set_defaults(func=bench_memory)


def trainer_rss(data_dir: Path, out_dir: Path, args: argparse.Namespace, poll_s: float = 0.05) -> dict[str, float]:
    """Run `python -m ds_gpt.train` (tiny model, full-size windows) and sample its RSS from /proc.

    The iteration each sample belongs to is read from metrics.jsonl as the run writes it.
    """
    log_every = 10
    cmd = [sys.executable, "-m", "ds_gpt.train", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
           f"--deepspeed_config=ds_configs/zero{args.zero_stage}.json", "--dtype=float32", "--compile=False",
           "--n_layer=1", "--n_head=1", "--n_embd=16", f"--block_size={args.block}", f"--vocab_size={args.vocab_size}",
           f"--micro_batch_size={args.batch}", "--gradient_accumulation_steps=1", f"--max_iters={args.iters}",
           f"--eval_interval={args.iters}", "--eval_iters=2", f"--log_interval={log_every}",
           f"--checkpoint_interval={args.iters}", "--warmup_iters=10", f"--lr_decay_iters={args.iters}"]
    out_dir.mkdir()
    last_iter, samples = -1, []
    with open(out_dir.parent / "train.log", "w") as log:
        # One thread: on a loaded 2-core machine a tiny model's T=1024 step runs several times faster
        # with one than with two, and the thread count does not change what this measures.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        try:
            while proc.poll() is None:
                # The whole file, not its tail: between two polls a fast run can log several
                # iterations, then enough eval/checkpoint events to push them out of any tail.
                with contextlib.suppress(UserError):  # no metrics logged yet
                    train, _, _ = report.split_events(report.load_metrics(out_dir))
                    last_iter = train[-1]["iter"] if train else last_iter
                with contextlib.suppress(Exception):  # the process may exit between poll() and here
                    rss = rss_mb(proc.pid)
                    # A process on its way out reads as 0 MiB: once its main thread has gone (the
                    # others still finishing), and as a zombie not yet reaped. Keep live readings only.
                    if rss > 0 and proc.poll() is None:
                        samples.append((last_iter, rss))
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    if proc.returncode:
        tail = (out_dir.parent / "train.log").read_text()[-2000:]
        raise RuntimeError(f"ds_gpt.train exited {proc.returncode}:\n{tail}")
    after = [rss for it, rss in samples if it >= args.warmup]
    if not after:
        raise RuntimeError(f"no RSS sample after iteration {args.warmup}: raise --iters")
    looping = [rss for it, rss in samples if it >= args.warmup and it < args.iters - log_every]
    return {"base": after[0], "end_of_loop": (looping or after)[-1], "max": max(after)}


def bench_memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="ds_gpt-bench-") as tmp:
        data_dir, what = bench_data(args, Path(tmp), int(args.synthetic_gb * 2**30) // 2, args.vocab_size)
        tf = check_token_file(data_dir / "train.bin", args.block, args.vocab_size)
        t0 = time.perf_counter()
        trainer = trainer_rss(data_dir, Path(tmp) / "out", args)
        minutes = (time.perf_counter() - t0) / 60
        # The long-lived map is measured from its first batch (after ours has warmed the allocator
        # with the same shapes): with 2 MiB page-cache folios each window maps a whole folio, so it
        # maps most of a 1 GB file within a few dozen batches, before any warm-up ends.
        alone = {"loader, RandomWindowSampler (ours)": loader_rss(
                     sampler_for(tf, args.batch, args.block, args.vocab_size), args.iters - args.warmup, args.warmup),
                 "loader, one long-lived mmap": loader_rss(
                     sampler_for(tf, args.batch, args.block, args.vocab_size, LongLivedMemmapSampler), args.iters, 0)}
    print(f"\nmemory benchmark: {args.iters} iterations of {args.batch} x {args.block} windows over {what}; "
          f"RSS baseline after {args.warmup} iterations")
    print(f"machine: {machine()}; {load()}")
    print(f"  trainer (python -m ds_gpt.train, ZeRO-{args.zero_stage}, tiny model, {minutes:.1f} min): "
          f"RSS {trainer['base']:,.0f} -> {trainer['end_of_loop']:,.0f} MiB at the last iterations "
          f"= {trainer['end_of_loop'] - trainer['base']:+,.0f} MiB (max {trainer['max'] - trainer['base']:+,.0f}, "
          f"incl. final eval and checkpoint; target within +50)")
    loader = {}
    for (name, (base, end)), batches in zip(alone.items(), (args.iters - args.warmup, args.iters), strict=True):
        print(f"  {name:38s} RSS {base:,.0f} -> {end:,.0f} MiB = {end - base:+,.0f} MiB over {batches} batches")
        loader[name] = {"base_mib": base, "end_mib": end, "growth_mib": end - base, "batches": batches}
    write_json(args.json, "memory", {
        "setting": f"{args.iters} iterations of {args.batch} x {args.block} windows over {what}",
        "zero_stage": args.zero_stage,
        "iters": args.iters, "warmup": args.warmup, "file_tokens": tf.n_tokens,
        "trainer": {"base_mib": trainer["base"], "end_of_loop_mib": trainer["end_of_loop"], "max_mib": trainer["max"],
                    "growth_mib": trainer["end_of_loop"] - trainer["base"], "minutes": minutes},
        "loader": loader})
