"""nanoGPT's random-window loader over flat uint16 token files, made a pure function.

A global batch's window offsets are drawn from (seed, stream, step) alone and each rank takes
its slice, so the same seed and global batch give the same samples for every world size and
ZeRO stage, and resuming needs no loader state beyond the step number. BatchPrefetcher reads
the next micro-batches on a background thread while the current ones train.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ds_gpt import fileset
from ds_gpt.errors import UserError
from ds_gpt.stage import read_meta

TOKEN_DTYPE = np.uint16
PREPARE_HINT = "python -m ds_gpt.prepare --dataset shakespeare (or --dataset openwebtext) writes them"
# Independent random streams per use, so eval windows never shift the training sequence.
STREAM_TRAIN, STREAM_EVAL = 0, 1
SPLIT_IDS = {"train": 0, "val": 1}
_SCAN_CHUNK = 1 << 24  # tokens per chunk when checking ids (32 MB of uint16)


@dataclass(frozen=True)
class TokenFile:
    path: Path
    n_tokens: int


def check_token_file(path: Path, block_size: int, vocab_size: int, full_scan_limit: int = 1 << 28,
                     end_tokens: int = _SCAN_CHUNK) -> TokenFile:
    """Fail early, with the command that fixes it, on a file the loader would choke on later."""
    if not path.exists():
        raise UserError(f"{path} not found", hint=PREPARE_HINT)
    if not path.is_file():
        raise UserError(f"{path} is not a file", hint=PREPARE_HINT)
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty", hint=PREPARE_HINT)
    if size % np.dtype(TOKEN_DTYPE).itemsize:
        raise UserError(f"{path} has an odd size ({size} bytes): not a flat uint16 token file "
                        "(truncated copy?)", hint=PREPARE_HINT)
    n_tokens = size // np.dtype(TOKEN_DTYPE).itemsize
    if n_tokens <= block_size + 1:
        raise UserError(f"{path} holds {n_tokens} tokens, too few for block_size {block_size}",
                        hint="lower --block_size or prepare a larger corpus")
    # Small files are checked whole; big ones at both ends (every batch is checked as it is read).
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")  # short-lived: dropped below
    spans = [(0, n_tokens)] if n_tokens <= full_scan_limit else [(0, end_tokens), (n_tokens - end_tokens, n_tokens)]
    for lo, hi in spans:
        for start in range(lo, hi, _SCAN_CHUNK):
            top = int(tokens[start:min(hi, start + _SCAN_CHUNK)].max())
            if top >= vocab_size:
                raise UserError(f"{path} holds token id {top} >= vocab_size {vocab_size}",
                                hint="prepare the data with the model's tokenizer or raise --vocab_size")
    del tokens
    return TokenFile(path=path, n_tokens=n_tokens)


def check_data_dir(data_dir: str | Path, block_size: int, vocab_size: int) -> dict[str, TokenFile]:
    """train.bin and val.bin, checked against each other, meta.json (if any) and the model.

    A publish that prepare committed but could not finish (killed between its renames) is
    finished first, so the set read is whole. With a meta.json (ours), each file's size must be
    the one it records: sizes only, as a checksum of 17 GB on every start would take minutes.
    nanoGPT's bins come without a meta.json and are read all the same.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"data directory {root} {'is not a directory' if root.exists() else 'not found'}",
                        hint=PREPARE_HINT)
    fileset.recover(root, hint=PREPARE_HINT)
    meta_path = root / "meta.json"
    meta = read_meta(root)
    if meta is not None:
        if meta.get("dtype", "uint16") != "uint16":
            raise UserError(f"{meta_path} says dtype {meta.get('dtype')}; the loader reads uint16", hint=PREPARE_HINT)
        if meta.get("vocab_size", 0) > vocab_size:
            raise UserError(f"{meta_path} has vocab_size {meta['vocab_size']} > the model's {vocab_size}",
                            hint="raise --vocab_size")
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    dataset = (meta or {}).get("dataset")
    redo = "rewrite the set: python -m ds_gpt.prepare " + (
        f"--dataset {dataset}" if dataset in ("shakespeare", "openwebtext") else "--input <the sources in meta.json>"
    ) + f" --out_dir {root}"
    files = {}
    for split in ("train", "val"):
        path = root / f"{split}.bin"
        recorded = (meta or {}).get("splits", {}).get(split) or {}
        expected = recorded.get("bytes", itemsize * recorded["tokens"] if "tokens" in recorded else None)
        if expected is not None and path.is_file() and path.stat().st_size != expected:
            raise UserError(f"{path} holds {path.stat().st_size // itemsize} tokens but meta.json says "
                            f"{expected // itemsize}: the file is truncated or from another run",
                            hint=redo)
        files[split] = check_token_file(path, block_size, vocab_size)
    return files


class RandomWindowSampler:
    """Random (x, y) windows of one split for this rank, as a pure function of the step.

    Global batch at `step`: `global_batch` offsets drawn from (seed, stream, split, step).
    Rank r owns the contiguous slice [r * per_rank, (r + 1) * per_rank) and takes it in
    `grad_accum` micro-batches of `micro` windows. Safe to call from two threads at once
    (a BatchPrefetcher's reader and an evaluation on the training thread).
    """

    def __init__(self, token_file: TokenFile, split: str, block_size: int, vocab_size: int, seed: int,
                 micro: int, grad_accum: int, world_size: int, rank: int):
        self.file, self.split = token_file, split
        self.block_size, self.vocab_size, self.seed = block_size, vocab_size, seed
        self.micro, self.grad_accum, self.world_size, self.rank = micro, grad_accum, world_size, rank
        self._fd = os.open(token_file.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        # Every micro-batch of a step draws the same global offsets: keep the last ones. One tuple,
        # replaced whole, so a reader on another thread never sees a key with another step's offsets.
        self._last_offsets: tuple[tuple[int, int, int, int], np.ndarray] | None = None
        self._per_thread = threading.local()  # each reading thread's window buffer

    def _offsets(self, stream: int, step: int, count: int) -> np.ndarray:
        key = (self.seed, stream, step, count)
        last = self._last_offsets
        if last is not None and last[0] == key:
            return last[1]
        entropy = [self.seed, stream, SPLIT_IDS[self.split], step]
        if 0 <= min(entropy) and max(entropy) < 2**32:
            # numpy turns a list of ints below 2**32 into exactly this array, one Python call per
            # item: the same random stream, ~10 us sooner.
            entropy = np.array(entropy, dtype=np.uint32)
        rng = np.random.default_rng(entropy)
        offsets = rng.integers(0, self.file.n_tokens - self.block_size, size=count, dtype=np.int64)
        self._last_offsets = (key, offsets)
        return offsets

    def _read_windows(self, offsets: np.ndarray) -> np.ndarray:
        """[len(offsets), block_size + 1] uint16 tokens: one os.preadv per window into this thread's
        buffer, valid until the thread's next read.

        Not a mmap: a page fault on a mapping of a file not yet in the page cache (every job's start,
        every requeue) makes the kernel read around the page, ~5 ms per window on a 17 GB train.bin,
        and every mapped page counts in the process RSS until dropped. preadv copies the window's
        bytes and nothing else (docs/benchmarks.md has the measurements). One buffer per thread: a
        prefetcher's reader and an evaluation on the training thread may read at the same time.
        """
        mine = self._per_thread
        if getattr(mine, "windows", None) is None or len(mine.windows) != len(offsets):
            mine.windows = np.empty((len(offsets), self.block_size + 1), dtype=TOKEN_DTYPE)
            mine.rows = [[memoryview(row).cast("B")] for row in mine.windows]  # preadv's list of one buffer each
        windows, width = mine.windows, mine.windows.strides[0]
        for row, offset in zip(mine.rows, offsets.tolist(), strict=True):
            got = os.preadv(self._fd, row, offset * windows.itemsize)
            if got != width:
                now = os.fstat(self._fd).st_size // windows.itemsize  # its length now, not where the read stopped
                raise UserError(f"{self.file.path} now holds {now} tokens, short of the {self.file.n_tokens} it held "
                                f"when the run started (a window at token {offset} ran past its end): was it replaced "
                                "or truncated?", hint=PREPARE_HINT)
        return windows

    def _read(self, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self._read_windows(offsets)  # [B, T+1]
        top = int(windows.max())  # every batch: a big file is only scanned at its ends up front
        if top >= self.vocab_size:
            raise UserError(f"{self.file.path} holds token id {top} >= vocab_size {self.vocab_size}")
        x, y = windows[:, :-1].astype(np.int64), windows[:, 1:].astype(np.int64)  # contiguous copies, [B, T] each
        return torch.from_numpy(x), torch.from_numpy(y)

    def micro_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape [micro, block_size] for this rank's `micro_step` of global `step`."""
        offsets = self._offsets(STREAM_TRAIN, step, self.micro * self.grad_accum * self.world_size)
        start = self.rank * self.micro * self.grad_accum + micro_step * self.micro
        return self._read(offsets[start:start + self.micro])

    def eval_batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k-th evaluation batch: the same windows at every evaluation, so curves compare."""
        offsets = self._offsets(STREAM_EVAL, k, self.micro * self.world_size)
        return self._read(offsets[self.rank * self.micro:(self.rank + 1) * self.micro])

    def state_dict(self) -> dict:
        # The position is the step number, which the checkpoint carries; the seed fixes the rest.
        return {"seed": self.seed, "split": self.split, "scheme": "global-step-keyed-v1"}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])


class BatchPrefetcher:
    """The training micro-batches of a sampler, read ahead on a background thread, on `device`.

        prefetcher = BatchPrefetcher(sampler, device)
        for step in range(start, max_iters):
            for x, y in prefetcher.batches(step):  # micro-batches 0 .. grad_accum-1 of `step`
                ...
        prefetcher.close()

    Contract:
    - `batches(step)` yields exactly `sampler.micro_batch(step, m)` for m = 0 .. grad_accum-1, in
      order, moved to `device`. On CUDA they come from pinned host memory through non_blocking
      copies on the current stream, so kernels queued after them see the data; elsewhere they
      are the sampler's tensors, moved with a plain `.to(device)`.
    - One thread reads ahead in the loop's order, (step, 0), (step, 1), ..., (step + 1, 0), ...,
      holding at most `depth` micro-batches. A request for anything but the next micro-batch in
      that order (the first call, a resume, a step asked again after being abandoned midway)
      drops what was read ahead and restarts the reader there: any order gives the right
      batches, the loop's order gives them without waiting.
    - An exception raised while reading (UserError for a bad token id, OSError) is raised by
      `batches` where that micro-batch would have come, with its traceback; the reader stops
      there, and the next request starts a new one.
    - `close()` stops the reader, waits for it and drops what it read; it is idempotent, also
      runs when the prefetcher is garbage-collected or the interpreter exits, and the object
      is a context manager. The thread is a daemon and never holds the prefetcher itself.
    - One consumer: `batches` is not itself thread-safe. The sampler stays usable meanwhile
      (evaluation may call `sampler.eval_batch` on the training thread).
    """

    def __init__(self, sampler: RandomWindowSampler, device: torch.device | str, depth: int = 4):
        if depth < 1:
            raise ValueError(f"depth {depth} < 1")
        self.sampler, self.device, self.depth = sampler, torch.device(device), depth
        # Pinned buffers belong to the GPU's context: the reader thread must use this rank's GPU,
        # not the GPU 0 a new thread starts on.
        self._cuda_index = None
        if self.device.type == "cuda":
            self._cuda_index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._reader: _Reader | None = None
        self._next: tuple[int, int] | None = None  # (step, micro) at the head of the reader's queue
        self._closed = False

    def batches(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) of each micro-batch of optimizer step `step`, in order, on the device."""
        for micro in range(self.sampler.grad_accum):
            item = self._take((step, micro))
            if isinstance(item, BaseException):
                self._stop_reader()  # it ended with this error
                raise item
            x, y = item
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _take(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | BaseException:
        if self._closed:
            raise RuntimeError("BatchPrefetcher.batches() after close()")
        if self._reader is None or self._next != key:
            self._stop_reader()
            self._reader = _Reader(self.sampler, key, self.depth, self._cuda_index)
        step, micro = key
        self._next = (step, micro + 1) if micro + 1 < self.sampler.grad_accum else (step + 1, 0)
        return self._reader.queue.get()

    def _stop_reader(self) -> None:
        if self._reader is not None:
            self._reader.stop()
            self._reader = None

    def close(self) -> None:
        """Stop the reader thread and drop what it read ahead. Safe to call more than once."""
        self._stop_reader()
        self._closed = True

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Reader:
    """One daemon thread putting micro-batches, from `start` on in the loop's order, into a bounded queue."""

    def __init__(self, sampler: RandomWindowSampler, start: tuple[int, int], depth: int, cuda_index: int | None):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=_read_ahead, name="ds_gpt-batch-prefetch", daemon=True,
                                        args=(sampler, start, self.queue, self._stopping, cuda_index))
        self._thread.start()
        # Without close(): stopped when its prefetcher drops it, or at interpreter exit.
        self.stop = weakref.finalize(self, _stop_thread, self._thread, self.queue, self._stopping)


def _stop_thread(thread: threading.Thread, out: queue.Queue, stopping: threading.Event) -> None:
    stopping.set()
    # Emptying the queue frees a put() blocked on it; the thread then sees `stopping` before its
    # next read, so it puts at most one more item, which fits, and returns.
    with contextlib.suppress(queue.Empty):
        while True:
            out.get_nowait()
    if thread is not threading.current_thread():  # a garbage collection may run on the reader itself
        thread.join()


def _read_ahead(sampler: RandomWindowSampler, start: tuple[int, int], out: queue.Queue,
                stopping: threading.Event, cuda_index: int | None) -> None:
    step, micro = start
    try:
        if cuda_index is not None:
            torch.cuda.set_device(cuda_index)
        while not stopping.is_set():
            x, y = sampler.micro_batch(step, micro)
            if cuda_index is not None:
                x, y = x.pin_memory(), y.pin_memory()
            out.put((x, y))
            step, micro = (step, micro + 1) if micro + 1 < sampler.grad_accum else (step + 1, 0)
    except BaseException as err:  # handed to the consumer, raised where this micro-batch was due
        out.put(err)
