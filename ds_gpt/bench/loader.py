"""loader: batches/s of RandomWindowSampler vs nanoGPT's per-row get_batch, warm and cold."""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from ds_gpt.bench.common import (
    FreshBufferSampler,
    LongLivedMemmapSampler,
    MappedSampler,
    PreadSampler,
    RandomAdviceMappedSampler,
    add_json_arg,
    add_window_args,
    bench_data,
    drop_from_page_cache,
    load,
    machine,
    nanogpt_get_batch,
    read_into_page_cache,
    sampler_for,
    write_json,
)
from ds_gpt.config import positive_int
from ds_gpt.data import TokenFile, check_token_file
from ds_gpt.presets import PADDED_VOCAB_SIZE

VOCAB = PADDED_VOCAB_SIZE
OURS, NANOGPT = "RandomWindowSampler", "nanoGPT get_batch"
# --alternatives: the other ways of reading the same windows, each the sampler with another reader.
ALTERNATIVES = {"mmap + MADV_DONTNEED (previous)": MappedSampler,
                "mmap + MADV_RANDOM + MADV_DONTNEED": RandomAdviceMappedSampler,
                "one long-lived mmap (RSS grows)": LongLivedMemmapSampler,
                "os.preadv into a fresh buffer per batch": FreshBufferSampler,
                "os.pread per window, then np.stack": PreadSampler}


def add_loader(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loader", help="batches/s of RandomWindowSampler vs nanoGPT's get_batch, warm and cold")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data_dir", help="read DIR/train.bin (python -m ds_gpt.prepare) instead of a synthetic file")
    src.add_argument("--synthetic_mb", type=positive_int, default=400, help="size of the synthetic train.bin in MiB")
    add_window_args(p)
    p.add_argument("--cold", action="store_true",
                   help="also time every loader cold: train.bin's pages dropped from the page cache before each "
                        "round, as at a job's start or requeue. The file is --cold_data_dir's train.bin, else a "
                        "sparse --cold_gb GiB one made in the temp dir (zeros, no disk space)")
    p.add_argument("--cold_data_dir", help="time cold on DIR/train.bin (implies --cold), e.g. a real dataset on the "
                   "cluster's filesystem")
    p.add_argument("--cold_gb", type=positive_int, default=17, help="with --cold: size of the sparse train.bin "
                   "(17 GiB: OpenWebText's train.bin)")
    p.add_argument("--alternatives", action="store_true",
                   help="also time the other readers measured: mmap with MADV_DONTNEED (the previous sampler), with "
                        "MADV_RANDOM too, one long-lived mmap, os.preadv into a fresh buffer per batch, and os.pread")
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per loader, over --rounds rounds")
    p.add_argument("--rounds", type=positive_int, default=6, help="alternating rounds; the median round is reported")
    add_json_arg(p)
    p.set_defaults(func=bench_loader)


def loaders(tf: TokenFile, args: argparse.Namespace, cold: bool = False) -> dict[str, Callable[[int, int], object]]:
    """name -> (step, micro_step) -> a batch, for each loader compared on `tf`. A long-lived map
    keeps its pages mapped, so the page cache cannot drop them: it is not timed cold."""
    ours = sampler_for(tf, args.batch, args.block, VOCAB)
    fns = {OURS: ours.micro_batch,
           NANOGPT: lambda step, micro_step: nanogpt_get_batch(tf.path, args.block, args.batch)}
    if args.alternatives:
        for name, cls in ALTERNATIVES.items():
            if not (cold and cls is LongLivedMemmapSampler):
                fns[name] = sampler_for(tf, args.batch, args.block, VOCAB, cls).micro_batch
    return fns


def time_loaders(fns: dict[str, Callable[[int, int], object]], args: argparse.Namespace,
                 before_round: Callable[[], None]) -> dict[str, dict]:
    """batches/s and us/window of each loader: the median of `rounds` alternating rounds, so that
    load from other jobs falls on every loader alike. `before_round` runs before each one's round."""
    rates: dict[str, list[float]] = {name: [] for name in fns}
    step = 0
    for _ in range(args.rounds):
        for name, fn in fns.items():
            before_round()
            n, t0 = 0, time.perf_counter()
            deadline = t0 + args.seconds / args.rounds
            while time.perf_counter() < deadline:
                fn(step := step + 1, 0)
                n += 1
            rates[name].append(n / (time.perf_counter() - t0))
    return {name: {"batches_per_s": statistics.median(r), "us_per_window": 1e6 / (statistics.median(r) * args.batch),
                   "rounds_batches_per_s": r} for name, r in rates.items()}


def bench_loader(args: argparse.Namespace) -> None:
    results = {}
    with tempfile.TemporaryDirectory(prefix="ds_gpt-bench-") as tmp:
        data_dir, what = bench_data(args, Path(tmp), args.synthetic_mb * 2**20 // 2, VOCAB)
        tf = check_token_file(data_dir / "train.bin", args.block, VOCAB)
        fns = loaders(tf, args)
        read_into_page_cache(tf.path)
        for fn in fns.values():  # imports, allocator, first maps
            for step in range(20):
                fn(step, 0)
        results["warm"] = {"file": what, "tokens": tf.n_tokens, "loaders": time_loaders(fns, args, lambda: None)}
        if args.cold or args.cold_data_dir:
            if args.cold_data_dir:
                cold_path, cold_what = Path(args.cold_data_dir) / "train.bin", f"data {args.cold_data_dir}"
            else:
                cold_path, cold_what = Path(tmp) / "cold" / "train.bin", f"sparse {args.cold_gb} GiB train.bin"
                cold_path.parent.mkdir()
                with open(cold_path, "wb") as fh:
                    os.truncate(fh.fileno(), args.cold_gb * 2**30)
            cold = check_token_file(cold_path, args.block, VOCAB)
            timed = time_loaders(loaders(cold, args, cold=True), args, lambda: drop_from_page_cache(cold_path))
            results["cold"] = {"file": cold_what, "tokens": cold.n_tokens, "loaders": timed}
            drop_from_page_cache(cold_path)  # give back the page cache the cold rounds filled
    for mode in results.values():
        mode["speed_up"] = mode["loaders"][OURS]["batches_per_s"] / mode["loaders"][NANOGPT]["batches_per_s"]

    setting = f"{args.batch} x {args.block} batches, median of {args.rounds} alternating rounds"
    print(f"\nloader benchmark: {setting}")
    print(f"machine: {machine()}; {load()}")
    for mode, r in results.items():
        print(f" {mode}: {r['file']} ({r['tokens']:,} tokens)")
        for name, fig in r["loaders"].items():
            print(f"  {name:40s} {fig['batches_per_s']:9,.0f} batches/s  {fig['us_per_window']:9.1f} us/window  "
                  f"({fig['batches_per_s'] * args.batch * args.block / 1e6:7.1f} M tokens/s)")
        print(f"  speed-up {r['speed_up']:.1f}x over nanoGPT {mode}" + (" (target >= 5x)" if mode == "warm" else ""))
    write_json(args.json, "loader", {"setting": setting, "batch": args.batch, "block": args.block, **results})
