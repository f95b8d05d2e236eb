"""Streaming prepare: a Hub dataset (or a local copy of it) to train.bin / val.bin, no download cache.

    python -m ds_gpt.prepare --dataset fineweb-edu --num_proc 32              # sample-10BT, ~10B tokens
    python -m ds_gpt.prepare --dataset openwebtext --streaming --num_proc 32

Documents arrive in the dataset's own order (datasets' streaming mode reads the parquet files
over HTTP, one row group at a time, text column only) and are cut into batches of
DOCS_PER_BATCH. --num_proc worker processes encode the batches while the next ones arrive, with
at most IN_FLIGHT_PER_WORKER x num_proc batches out at once, and the results are appended in
order: memory holds a few batches, whatever the size of the corpus. Written by hand because
`IterableDataset.map` has no num_proc (in streaming mode it runs in the reading process, on one
core) and `Pool.imap` reads its input as fast as it can, which for a stream means without bound.

The split is a fixed slice, the same for every run and user: val is the stream's leading
documents until it holds `val_tokens` tokens (the document that crosses the line stays whole);
train is every document after it, up to --max_tokens (again whole documents).

Resumable: each time another SHARD_TOKENS tokens are written, the staged files are fsynced and
a checkpoint (CHECKPOINT) records their lengths and the stream's position
(`IterableDataset.state_dict()`). A run killed at any point and started again with the same
inputs and options truncates the staged files to the last checkpoint and reads on from there.
The staged files stay hidden until the whole set is published as one unit by ds_gpt.fileset:
readers see the previous set or the new one, never a part.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from ds_gpt import atomic
from ds_gpt.errors import UserError, fork_failed
from ds_gpt.tokenizer import EOT_TOKEN, encode_documents, get_encoding

DOCS_PER_BATCH = 512  # documents per worker task: ~2.5 MB of web text, enough to amortise the IPC
IN_FLIGHT_PER_WORKER = 2  # batches out per worker: one being encoded, one waiting
SHARD_TOKENS = 100_000_000  # a checkpoint every this many tokens (build-nanogpt's shard size)
STAGED = {"train": ".train.bin.stream", "val": ".val.bin.stream"}  # kept across runs, for resuming
CHECKPOINT = ".stream-checkpoint.json"


class TokenWriter:
    """Appends uint16 ids to a file with ordinary buffered writes, hashing them on the way.

    A full disk raises ENOSPC from write() or close(), which the command reports; a memmap of a
    preallocated sparse file would take SIGBUS instead, which no Python code can catch.
    `keep_tokens` reopens an existing file cut to its first `keep_tokens` tokens (re-hashed),
    to append after a resumed checkpoint."""

    def __init__(self, path: Path, keep_tokens: int | None = None):
        self.path = path
        self.sha256 = hashlib.sha256()
        if keep_tokens is None:
            self.file = open(path, "wb")
            self.pos = 0  # tokens written
            return
        self.file = open(path, "r+b")
        self.file.truncate(2 * keep_tokens)
        while block := self.file.read(64 << 20):
            self.sha256.update(block)
        self.pos = keep_tokens

    def write(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.uint16)
        self.sha256.update(ids)
        self.file.write(ids.data)
        self.pos += len(ids)

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> tuple[int, str]:
        """Flush and fsync; returns (tokens, sha256 of the bytes)."""
        with self.file:
            self.sync()
        return self.pos, self.sha256.hexdigest()

    def abort(self) -> None:
        """Close after a failure: the buffered rest may not fit either."""
        with contextlib.suppress(OSError):
            self.file.close()


def start_pool(num_proc: int, initializer: Callable, initargs: tuple) -> multiprocessing.pool.Pool:
    """`num_proc` worker processes; a fork the system refuses is one line about the workers."""
    try:
        return multiprocessing.Pool(num_proc, initializer, initargs)
    except OSError as err:  # EAGAIN (process limit), ENOMEM: nothing to do with the out_dir
        raise fork_failed(err, f"{num_proc} worker processes") from None


# -----------------------------------------------------------------------------
# encoding, in order, with a bounded number of batches in flight

_enc = None  # each worker's encoding, set once by _init_encoder


def _init_encoder(tokenizer_cache: str | None) -> None:
    global _enc
    _enc = get_encoding(tokenizer_cache)


def _encode(texts: list[str]) -> np.ndarray:
    return encode_documents(texts, _enc)


def encode_in_order(batches: Iterator[tuple[list[str], dict]], pool,
                    in_flight: int) -> Iterator[tuple[dict, np.ndarray]]:
    """(position, ids) per batch, in the order read; at most `in_flight` batches read ahead."""
    pending: deque = deque()
    for texts, position in batches:
        pending.append((position, pool.apply_async(_encode, (texts,)) if pool else _encode(texts)))
        if len(pending) >= in_flight:
            position, ids = pending.popleft()
            yield position, ids if pool is None else ids.get()
    while pending:
        position, ids = pending.popleft()
        yield position, ids if pool is None else ids.get()


def leading_documents(ids: np.ndarray, room: int) -> tuple[int, int]:
    """(documents, tokens) of the leading documents of `ids` that start before `room` tokens."""
    ends = np.flatnonzero(ids == EOT_TOKEN) + 1  # encode_ordinary never yields EOT inside a text
    starts = np.concatenate(([0], ends))[:len(ends)]
    n = int(np.searchsorted(starts, room, side="left"))
    return n, int(ends[n - 1]) if n else 0


# -----------------------------------------------------------------------------
# checkpoints

def staged_paths(out_dir: Path) -> dict[str, Path]:
    """Where each split is written until the set is published: out_dir / STAGED[split]."""
    return {split: out_dir / name for split, name in STAGED.items()}


def load_checkpoint(out_dir: Path, wanted: dict) -> dict | None:
    """The last checkpoint of a run with the same inputs and options, if its files are there."""
    try:
        checkpoint = json.loads((out_dir / CHECKPOINT).read_text())
        if checkpoint["wanted"] != wanted:
            return None
        for split, path in staged_paths(out_dir).items():
            if path.stat().st_size < 2 * checkpoint["splits"][split]["tokens"]:
                return None
        return checkpoint
    except (OSError, ValueError, KeyError, TypeError):
        return None


def discard_checkpoint(out_dir: Path) -> None:
    for name in (CHECKPOINT, *STAGED.values()):
        (out_dir / name).unlink(missing_ok=True)


def save_checkpoint(out_dir: Path, wanted: dict, writers: dict, documents: dict, state: dict) -> None:
    for writer in writers.values():
        writer.sync()  # the bytes first, then the checkpoint that counts them
    splits = {s: {"tokens": w.pos, "documents": documents[s]} for s, w in writers.items()}
    atomic.write_text(out_dir / CHECKPOINT, json.dumps({"wanted": wanted, "splits": splits, "state": state}) + "\n")


# -----------------------------------------------------------------------------

class Progress:
    """One bar: tokens when their total is known (--max_tokens), else documents (their total
    where the dataset says it); the postfix carries the other count and documents per second."""

    def __init__(self, total_docs: int | None, total_tokens: int | None, docs: int, tokens: int):
        self.by_tokens = total_tokens is not None or total_docs is None
        self.docs, self.tokens, self.docs0, self.t0 = docs, tokens, docs, time.time()
        self.bar = tqdm(total=total_tokens if self.by_tokens else total_docs,
                        initial=tokens if self.by_tokens else docs, unit="tok" if self.by_tokens else "doc",
                        unit_scale=True, desc="tokenizing", dynamic_ncols=True)

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bar.update(tokens if self.by_tokens else docs)
        rate = (self.docs - self.docs0) / max(time.time() - self.t0, 1e-9)
        other = f"{self.docs:,} docs" if self.by_tokens else f"{self.tokens / 1e6:,.1f}M tok"
        self.bar.set_postfix_str(f"{other}, {rate:,.0f} docs/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def read_batches(ds, field: str, explain: Callable[[Exception], UserError]) -> Iterator[tuple[list[str], dict]]:
    """(texts, the stream's position after them) per batch of DOCS_PER_BATCH documents."""
    batches = ds.iter(batch_size=DOCS_PER_BATCH)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UserError:
            raise
        except Exception as err:  # a file that cannot be read or cast, the network: one line
            raise explain(err) from None
        texts = batch.get(field)
        if texts is None or any(t is None for t in texts):  # explain names the file where it can
            raise explain(ValueError(f"a record has no {field!r}"))
        yield texts, ds.state_dict()


def write_stream(ds, out_dir: Path, wanted: dict, field: str, val_tokens: int,
                 max_tokens: int | None, num_proc: int, tokenizer_cache: str | None,
                 explain: Callable[[Exception], UserError], total_docs: int | None) -> dict:
    """Stream `ds` (an IterableDataset) into the staged train and val files (staged_paths), resuming
    from the last checkpoint of the same `wanted`; returns each split's {"tokens", "documents", "bytes", "sha256"}."""
    checkpoint = load_checkpoint(out_dir, wanted)
    if checkpoint is None:
        discard_checkpoint(out_dir)
        done = {s: {"tokens": None, "documents": 0} for s in STAGED}
    else:
        ds.load_state_dict(checkpoint["state"])
        done = checkpoint["splits"]
        print(f"resuming from the checkpoint at {sum(s['tokens'] for s in done.values()):,} tokens")
    pool = start_pool(num_proc, _init_encoder, (tokenizer_cache,)) if num_proc > 1 else None
    if pool is None:
        _init_encoder(tokenizer_cache)
    writers = {s: TokenWriter(path, done[s]["tokens"]) for s, path in staged_paths(out_dir).items()}
    documents = {s: done[s]["documents"] for s in STAGED}
    total_tokens = None if max_tokens is None else val_tokens + max_tokens
    progress = Progress(total_docs, total_tokens, sum(documents.values()), sum(w.pos for w in writers.values()))
    last_checkpoint = progress.tokens
    try:
        batches = read_batches(ds, field, explain)
        for position, ids in encode_in_order(batches, pool, IN_FLIGHT_PER_WORKER * num_proc):
            docs, cut = leading_documents(ids, val_tokens - writers["val"].pos)  # (0, 0) once val is full
            writers["val"].write(ids[:cut])
            documents["val"] += docs
            room = len(ids) if max_tokens is None else max_tokens - writers["train"].pos
            train_docs, train_cut = leading_documents(ids[cut:], room)
            writers["train"].write(ids[cut:cut + train_cut])
            documents["train"] += train_docs
            progress.update(docs + train_docs, cut + train_cut)
            if cut + train_cut < len(ids):  # --max_tokens reached
                break
            if progress.tokens - last_checkpoint >= SHARD_TOKENS:
                save_checkpoint(out_dir, wanted, writers, documents, position)
                last_checkpoint = progress.tokens
        splits = {}
        for split, writer in writers.items():
            tokens, sha256 = writer.close()
            splits[split] = {"tokens": tokens, "documents": documents[split], "bytes": 2 * tokens, "sha256": sha256}
        return splits
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
