"""loader: batches/s of one vectorised gather vs nanoGPT's per-row get_batch."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ds_gpt.bench.common import add_window_args, bench_data, load, machine, nanogpt_get_batch, positive_int, sampler_for
from ds_gpt.data import check_token_file


def add_loader(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loader", help="batches/s of RandomWindowSampler vs nanoGPT's per-row get_batch")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data_dir", help="read DIR/train.bin (python -m ds_gpt.prepare) instead of a synthetic file")
    src.add_argument("--synthetic_mb", type=positive_int, default=400, help="size of the synthetic train.bin in MiB")
    add_window_args(p)
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per loader, over --rounds rounds")
    p.add_argument("--rounds", type=positive_int, default=6, help="alternating rounds; the median round is reported")
    p.set_defaults(func=bench_loader)


def bench_loader(args: argparse.Namespace) -> None:
    vocab = 50304
    with tempfile.TemporaryDirectory(prefix="ds_gpt-bench-") as tmp:
        data_dir, what = bench_data(args, Path(tmp), args.synthetic_mb * 2**20 // 2, vocab)
        tf = check_token_file(data_dir / "train.bin", args.block, vocab)
        ours = sampler_for(tf, args.batch, args.block, vocab)
        loaders = {"RandomWindowSampler": lambda step: ours.micro_batch(step, 0),
                   "nanoGPT get_batch": lambda step: nanogpt_get_batch(tf.path, args.block, args.batch)}
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        step = 0
        for fn in loaders.values():  # warm-up: imports, the file's pages in the page cache
            for _ in range(20):
                fn(step := step + 1)
        # Alternate short rounds so that load from other jobs falls on both loaders alike.
        for _ in range(args.rounds):
            for name, fn in loaders.items():
                n, t0 = 0, time.perf_counter()
                deadline = t0 + args.seconds / args.rounds
                while time.perf_counter() < deadline:
                    fn(step := step + 1)
                    n += 1
                rates[name].append(n / (time.perf_counter() - t0))
    print(f"\nloader benchmark: {args.batch} x {args.block} batches from {what} "
          f"({tf.n_tokens:,} tokens), median of {args.rounds} alternating rounds")
    print(f"machine: {machine()}; {load()}")
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in median.items():
        print(f"  {name:22s} {rate:9,.0f} batches/s  ({rate * args.batch * args.block / 1e6:7.1f} M tokens/s)")
    print(f"  speed-up {median['RandomWindowSampler'] / median['nanoGPT get_batch']:.1f}x (target >= 5x)")
