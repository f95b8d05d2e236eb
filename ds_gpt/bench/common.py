"""What the benchmarks share: the machine they ran on, synthetic token files, the loaders we
compare against, and a process's resident memory (tests/test_memory.py uses these too)."""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
from pathlib import Path

import numpy as np
import psutil
import torch

from ds_gpt.data import TOKEN_DTYPE, RandomWindowSampler, TokenFile


def machine() -> str:
    """One line naming the CPU, for figures that only mean something with the machine."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"{model}, {len(os.sched_getaffinity(0))} usable cores, {platform.python_implementation()} {platform.python_version()}"


def load() -> str:
    """The 1/5/15-minute load averages: figures from a shared machine mean little without them."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def write_synthetic_bin(path: Path, n_tokens: int, vocab_size: int, seed: int = 0) -> TokenFile:
    """A flat uint16 file of uniform random ids below `vocab_size`, written in 32 MB chunks
    so that making a 1 GB file does not need 1 GB of memory."""
    rng = np.random.default_rng(seed)
    chunk = 1 << 24
    with open(path, "wb") as fh:
        for start in range(0, n_tokens, chunk):
            rng.integers(0, vocab_size, size=min(chunk, n_tokens - start), dtype=TOKEN_DTYPE).tofile(fh)
    return TokenFile(path=path, n_tokens=n_tokens)


def nanogpt_get_batch(path: Path, block_size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's train.py get_batch on CPU, as it is there: a memmap per call (its leak fix),
    torch.randint offsets, then one slice, copy and int64 cast per row, stacked."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy((data[i:i + block_size]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + block_size]).astype(np.int64)) for i in ix])
    return x, y


class LongLivedMemmapSampler(RandomWindowSampler):
    """Our sampler without the page drop: one map kept for the whole run, as nanoGPT read its
    data before its per-batch fix. Every page a window touches stays mapped, so RSS climbs."""

    def _drop_pages(self) -> None:
        pass


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of a process (this one by default) in MiB, file-backed pages included."""
    return psutil.Process(pid).memory_info().rss / 2**20


def loader_rss(sampler: RandomWindowSampler, batches: int, warmup: int) -> tuple[float, float]:
    """(RSS after `warmup` batches, RSS after `batches` more), in MiB, reading steps in order."""
    for step in range(warmup):
        sampler.micro_batch(step, 0)
    base = rss_mb()
    for step in range(warmup, warmup + batches):
        sampler.micro_batch(step, 0)
    return base, rss_mb()


def sampler_for(token_file: TokenFile, batch: int, block: int, vocab_size: int,
                cls: type[RandomWindowSampler] = RandomWindowSampler) -> RandomWindowSampler:
    """A one-rank, no-accumulation sampler: each step is one batch x block micro-batch."""
    return cls(token_file, "train", block, vocab_size, seed=1337, micro=batch, grad_accum=1, world_size=1, rank=0)


def positive_int(text: str) -> int:
    """argparse type for counts: a zero or negative one would only fail later, less clearly."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def add_window_args(p: argparse.ArgumentParser) -> None:
    """nanoGPT's GPT-2 batch shape: full-size windows touch as many pages as a real run does."""
    p.add_argument("--batch", type=positive_int, default=12, help="windows per batch (nanoGPT's batch_size)")
    p.add_argument("--block", type=positive_int, default=1024, help="tokens per window (nanoGPT's block_size)")


def bench_data(args: argparse.Namespace, tmp: Path, n_tokens: int, vocab_size: int) -> tuple[Path, str]:
    """--data_dir as given, else a synthetic train.bin of `n_tokens` and a small val.bin under `tmp`."""
    if args.data_dir:
        return Path(args.data_dir), f"data {args.data_dir}"
    data = tmp / "data"
    data.mkdir()
    write_synthetic_bin(data / "train.bin", n_tokens, vocab_size)
    write_synthetic_bin(data / "val.bin", 64 * (args.block + 1), vocab_size, seed=1)
    return data, f"synthetic {n_tokens * 2 / 2**20:,.0f} MiB train.bin"
