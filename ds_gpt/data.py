"""nanoGPT's random-window loader over flat uint16 token files, made a pure function.

A global batch's window offsets are drawn from (seed, stream, step) alone and each rank takes
its slice, so the same seed and global batch give the same samples for every world size and
ZeRO stage, and resuming needs no loader state beyond the step number.
"""
from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ds_gpt import atomic, fileset
from ds_gpt.errors import UserError

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
    meta = None
    if meta_path.exists():
        try:
            meta = json.loads(atomic.read_text(meta_path))
        except json.JSONDecodeError as err:
            raise UserError(f"{meta_path} is not valid JSON ({err.msg})", hint=PREPARE_HINT) from None
        if not isinstance(meta, dict) or not isinstance(meta.get("splits", {}), dict):
            raise UserError(f"{meta_path} is not a ds_gpt meta.json", hint=PREPARE_HINT)
        if meta.get("dtype", "uint16") != "uint16":
            raise UserError(f"{meta_path} says dtype {meta.get('dtype')}; the loader reads uint16")
        if int(meta.get("vocab_size", 0)) > vocab_size:
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
        if expected is not None and path.is_file() and path.stat().st_size != int(expected):
            raise UserError(f"{path} holds {path.stat().st_size // itemsize} tokens but meta.json says "
                            f"{int(expected) // itemsize}: the file is truncated or from another run",
                            hint=redo)
        files[split] = check_token_file(path, block_size, vocab_size)
    return files


class RandomWindowSampler:
    """Random (x, y) windows of one split for this rank, as a pure function of the step.

    Global batch at `step`: `global_batch` offsets drawn from (seed, stream, split, step).
    Rank r owns the contiguous slice [r * per_rank, (r + 1) * per_rank) and takes it in
    `grad_accum` micro-batches of `micro` windows.
    """

    def __init__(self, token_file: TokenFile, split: str, block_size: int, vocab_size: int, seed: int,
                 micro: int, grad_accum: int, world_size: int, rank: int):
        self.file, self.split = token_file, split
        self.block_size, self.vocab_size, self.seed = block_size, vocab_size, seed
        self.micro, self.grad_accum, self.world_size, self.rank = micro, grad_accum, world_size, rank
        self._window = np.arange(block_size + 1, dtype=np.int64)
        self._map: mmap.mmap | None = None  # opened on first use, per process
        self._tokens: np.ndarray | None = None

    def _offsets(self, stream: int, step: int, count: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, SPLIT_IDS[self.split], step])
        return rng.integers(0, self.file.n_tokens - self.block_size, size=count, dtype=np.int64)

    def _read(self, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self._map is None:
            with open(self.file.path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._tokens = np.frombuffer(self._map, dtype=TOKEN_DTYPE)
        windows = self._tokens[offsets[:, None] + self._window].astype(np.int64)  # [B, T+1], one gather
        self._drop_pages()
        if windows.max() >= self.vocab_size:
            raise UserError(f"{self.file.path} holds token id {int(windows.max())} >= vocab_size {self.vocab_size}")
        batch = torch.from_numpy(windows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def _drop_pages(self) -> None:
        # A long-lived map keeps every page it ever touched in the process RSS (a 17 GB file ends up
        # resident, and SLURM's cgroup may charge it to the job: the seed's OOM kill). nanoGPT
        # reopens the memmap per batch; dropping the mapped pages after each gather keeps RSS as
        # flat for about half the cost per batch. The data stays in the page cache.
        self._map.madvise(mmap.MADV_DONTNEED)

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
