"""What the benchmarks share: the machine they ran on, synthetic token files, the loaders we
compare against, and a process's resident memory (tests/test_memory.py uses these too)."""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import mmap
import os
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from ds_gpt import atomic
from ds_gpt.config import positive_int
from ds_gpt.data import TOKEN_DTYPE, RandomWindowSampler, TokenFile
from ds_gpt.mfu import cpu_model


def machine() -> str:
    """One line naming the CPU, for figures that only mean something with the machine."""
    model = cpu_model()
    cores = len(os.sched_getaffinity(0))
    return f"{model}, {cores} usable cores, {platform.python_implementation()} {platform.python_version()}"


def load() -> str:
    """The 1/5/15-minute load averages: figures from a shared machine mean little without them."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def median_with_spread(values: list[float], resamples: int = 2000) -> dict:
    """The median of `values`, their interquartile range, and a 95% bootstrap confidence interval
    of the median (seeded: the same values give the same interval). A difference whose interval
    does not contain the value compared against is real at that level; one whose interval does
    is not resolved by this run."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"median": statistics.median(values), "iqr": [q1, q3],
            "ci95": [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]], "values": list(values)}


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE as one JSON object")


def write_json(path: Path | None, benchmark: str, figures: dict) -> None:
    """The figures as one JSON object, with what every benchmark records beside them: which one,
    when, on what machine, under what load, with which versions. Nothing when `path` is None."""
    if path is None:
        return
    versions = {"python": platform.python_version()}
    for package in ("numpy", "torch", "deepspeed"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    record = {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "load_average": list(os.getloadavg()), "versions": versions, **figures}
    atomic.write_text(path, json.dumps(record, indent=1) + "\n")


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


class MappedSampler(RandomWindowSampler):
    """The sampler reading its windows through one mmap of the file: one fancy-indexed gather per
    batch, then madvise(MADV_DONTNEED) so the touched pages leave the process RSS (they stay in
    the page cache). This was RandomWindowSampler's way before os.preadv; kept to compare."""

    advice: int | None = None  # madvise()d once on the whole map
    drop_pages = True

    def _read_windows(self, offsets: np.ndarray) -> np.ndarray:
        if not hasattr(self, "_map"):
            with open(self.file.path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            if self.advice is not None:
                self._map.madvise(self.advice)
            self._tokens = np.frombuffer(self._map, dtype=TOKEN_DTYPE)
        windows = self._tokens[offsets[:, None] + np.arange(self.block_size + 1)]  # [B, T+1], one gather
        if self.drop_pages:
            self._map.madvise(mmap.MADV_DONTNEED)
        return windows


class RandomAdviceMappedSampler(MappedSampler):
    """MappedSampler with MADV_RANDOM: a fault on a cold page reads that page, not the pages around it."""

    advice = mmap.MADV_RANDOM


class LongLivedMemmapSampler(MappedSampler):
    """One map kept for the whole run and never dropped, as nanoGPT read its data before its
    per-batch fix: every page a window touches stays mapped, so RSS climbs."""

    drop_pages = False


class FreshBufferSampler(RandomWindowSampler):
    """Our os.preadv reads into a new buffer per batch instead of one kept per thread: what the
    kept buffer saves."""

    def _read_windows(self, offsets: np.ndarray) -> np.ndarray:
        windows = np.empty((len(offsets), self.block_size + 1), dtype=TOKEN_DTYPE)
        rows = memoryview(windows).cast("B")
        width = windows.strides[0]
        for i, offset in enumerate(offsets.tolist()):
            os.preadv(self._fd, [rows[i * width:(i + 1) * width]], offset * windows.itemsize)
        return windows


class PreadSampler(RandomWindowSampler):
    """os.pread per window, each a new bytes object, then one np.stack: what reading straight into
    the batch's buffer with os.preadv saves."""

    def _read_windows(self, offsets: np.ndarray) -> np.ndarray:
        size = (self.block_size + 1) * np.dtype(TOKEN_DTYPE).itemsize
        return np.stack([np.frombuffer(os.pread(self._fd, size, offset * np.dtype(TOKEN_DTYPE).itemsize),
                                       dtype=TOKEN_DTYPE) for offset in offsets.tolist()])


def drop_from_page_cache(path: Path) -> None:
    """Evict a file's clean pages from the page cache (no root needed): its next reads are cold,
    as at the start of a job. Pages some process still maps stay."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_into_page_cache(path: Path, chunk: int = 1 << 24) -> None:
    """Read a file once, sequentially, so that its pages are in the page cache: warm reads."""
    buf = bytearray(chunk)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
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


class TrainerStep:
    """train.main's step for one rank, less logging and checkpoints: each optimizer side at the
    schedule's lr, then train.train_step with the trainer's default guard (--on_nan stop) and no
    profiler. The benchmarks time and sweep exactly what a run executes."""

    def __init__(self, model: torch.nn.Module, run) -> None:
        from ds_gpt import engine as ds_engine
        from ds_gpt.flops_profile import FlopsProfileCapture
        from ds_gpt.nonfinite import NonFiniteGuard
        from ds_gpt.signals import GracefulStop
        from ds_gpt.train import train_step

        self.run = run
        self._set_lr, self._train_step = ds_engine.set_lr, train_step  # bound once, out of the timed step
        self.engine = ds_engine.build_engine(model, run)
        self.guard = NonFiniteGuard("stop", run.batch.grad_accum, self.engine.module)
        self.stop = GracefulStop()  # not installed: Ctrl-C stops a benchmark as usual
        self.no_profile = FlopsProfileCapture(self.engine, profile_step=None, output_file=os.devnull,
                                              n_params=model.num_params(), n_layer=model.config.n_layer,
                                              n_embd=model.config.n_embd, peak_flops=1.0)

    def __call__(self, batches, it: int):
        """One iteration `it` on `batches` (a BatchPrefetcher); train.train_step's result."""
        self._set_lr(self.engine, self.run.side_lrs(self.run.lr_at(it)))
        return self._train_step(self.engine, batches, it, self.guard, self.stop, self.no_profile)
