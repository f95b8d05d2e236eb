"""Turn a corpus into the trainer's train.bin / val.bin / meta.json.

    python -m ds_gpt.prepare --dataset shakespeare                # -> data/shakespeare (CPU demo)
    python -m ds_gpt.prepare --dataset openwebtext --num_proc 32  # -> data/openwebtext (~17 GB)
    python -m ds_gpt.prepare --dataset fineweb-edu --num_proc 32  # -> data/fineweb-edu (streamed, ~20 GB)
    python -m ds_gpt.prepare --dataset openwebtext --streaming --num_proc 32  # no 55 GB download cache
    python -m ds_gpt.prepare --input 'corpus/*.jsonl' --text_field body --out_dir data/mine
    python -m ds_gpt.prepare --dataset hellaswag                  # -> data/hellaswag (ds_gpt/hellaswag.py)

Output, in nanoGPT's format so either project reads the other's bins:
    train.bin, val.bin  flat uint16 GPT-2 ids, <|endoftext|> (50256) after every document
    meta.json           tokenizer, vocab size, dtype, tokens/documents/sha256 per split,
                        sources (a Hub dataset: its commit), and the split's options

Streamed (fineweb-edu, or --streaming): ds_gpt/stream.py, val a fixed leading slice of the
stream, resumable. Otherwise documents are split as nanoGPT splits them (ceil(n * val_fraction)
val documents, seed 2357), then encoded in batches by --num_proc worker processes. Each batch
comes back as one flat uint16 array (nanoGPT's datasets.map stores a token list per document,
which costs more than the BPE itself) and is appended in order with ordinary file writes, so
memory stays bounded and a full disk is an ENOSPC error (one line, exit 2), not the SIGBUS that
writing through a memmap of a sparse file gets. The three files are written under hidden names,
fsynced, read back against their sha256, and published as one unit (ds_gpt/fileset.py): a run
that fails or is killed at any instant leaves the previous set or the new one, never a mix. A
re-run whose inputs and options match meta.json does nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ds_gpt import corpus, fileset, hellaswag, stream
from ds_gpt.corpus import HUB_CORPORA
from ds_gpt.errors import ArgumentParser, UserError, os_error, run_cli
from ds_gpt.paths import REPO_ROOT
from ds_gpt.stream import TokenWriter, start_pool
from ds_gpt.tokenizer import EOT_TOKEN, RANKS_SHA256, VOCAB_SIZE, encode_documents, get_encoding

FORMAT = 1  # bump when the bytes written for the same inputs change
SPLITS = ("train", "val")
FILES = ("train.bin", "val.bin", "meta.json")  # published together, meta.json last
BATCH_BYTES = 4 << 20  # text per worker task: amortises the IPC, still balances the cores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="ds_gpt.prepare", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    # source: exactly one
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=list(DATASETS),
                     help="openwebtext, fineweb-edu: Hugging Face datasets; shakespeare: 42 plays, 1.57 M tokens; "
                          "hellaswag: its validation set, for the trainer's --hellaswag_interval (ds_gpt/hellaswag.py)")
    src.add_argument("--input", nargs="+", metavar="FILE_OR_GLOB",
                     help=".txt (a document per file) or .jsonl/.json/.parquet (a document per record)")
    p.add_argument("--text_field", default="text", help="field holding the text in .jsonl/.parquet")
    p.add_argument("--data_files", nargs="+", metavar="GLOB",
                   help="a local copy of the --dataset in the Hub's schema (.parquet or .jsonl), read instead")
    p.add_argument("--subset", help="the Hub subset (fineweb-edu: sample-10BT, sample-100BT, ...)")
    # output and split
    p.add_argument("--out_dir", help="default data/<dataset>; required with --input")
    p.add_argument("--val_fraction", type=float, default=0.0005, help="share of documents in val, (0, 1); not streamed")
    p.add_argument("--seed", type=int, default=2357, help="seed of the document split (nanoGPT's); not streamed")
    # streaming
    p.add_argument("--streaming", action="store_true",
                   help="read the Hub dataset as a stream: no download cache, resumable (fineweb-edu: always)")
    p.add_argument("--val_tokens", type=int,
                   help="streamed: val is the stream's leading documents up to this many tokens "
                        f"(default {', '.join(f'{k} {v.val_tokens:,}' for k, v in HUB_CORPORA.items())})")
    p.add_argument("--max_tokens", type=int, help="streamed: stop once train holds this many tokens")
    # resources
    p.add_argument("--num_proc", type=int, default=len(os.sched_getaffinity(0)),
                   help="worker processes (default and most: the cores this process may use)")
    p.add_argument("--cache_dir", help="datasets' cache (default: $HF_DATASETS_CACHE)")
    p.add_argument("--tokenizer_cache", help="dir holding the GPT-2 ranks (default: $TIKTOKEN_CACHE_DIR)")
    args = p.parse_args(argv)
    if args.input and not args.out_dir:
        raise UserError("--input needs --out_dir", hint="e.g. --out_dir data/mycorpus")
    if not 0.0 < args.val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in (0, 1), got {args.val_fraction}")
    if args.num_proc < 1:
        raise UserError(f"--num_proc must be >= 1, got {args.num_proc}")
    if (cpus := len(os.sched_getaffinity(0))) < args.num_proc:  # more workers than cores only costs memory
        print(f"--num_proc {args.num_proc}: capped at the {cpus} CPU(s) this process may use")
        args.num_proc = cpus
    hub = args.dataset in HUB_CORPORA
    if args.data_files and args.dataset in (None, "shakespeare"):
        raise UserError("--data_files is a local copy of a Hub --dataset", hint="use --input for other local files")
    if args.subset and not hub:
        raise UserError("--subset goes with --dataset " + " or ".join(HUB_CORPORA))
    args.streaming = args.streaming or (hub and HUB_CORPORA[args.dataset].streamed)
    if args.streaming and not hub:
        raise UserError("--streaming reads a --dataset " + " or ".join(HUB_CORPORA),
                        hint="--input files are read whole; drop --streaming")
    for flag in ("val_tokens", "max_tokens"):
        if getattr(args, flag) is not None and not args.streaming:
            raise UserError(f"--{flag} applies to a streamed prepare", hint="add --streaming")
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.streaming and args.val_tokens is None:
        args.val_tokens = HUB_CORPORA[args.dataset].val_tokens
    args.out_dir = Path(args.out_dir) if args.out_dir else REPO_ROOT / "data" / args.dataset
    return args


# -----------------------------------------------------------------------------
# writing one split

# Worker state: set once per process by _init_worker, so a task carries only its indices.
# Workers read documents through the dataset's memory map; the pages they touch show in their
# RSS but are clean file cache the kernel reclaims, while their own memory stays one batch.
_docs = None
_enc = None


def _init_worker(docs, tokenizer_cache: str | None) -> None:
    global _docs, _enc
    _docs, _enc = docs, get_encoding(tokenizer_cache)


def _encode_batch(idx: np.ndarray) -> np.ndarray:
    (texts,) = _docs[idx.tolist()].values()  # the dataset has exactly one column
    return encode_documents(texts, _enc)


def make_batches(idx: np.ndarray, nbytes: np.ndarray, batch_bytes: int, min_batches: int) -> list[np.ndarray]:
    """Cut `idx` into runs of about equal text size (never splitting a document)."""
    cum = np.cumsum(nbytes[idx], dtype=np.int64)
    n = max(min_batches, -(-int(cum[-1]) // batch_bytes), 1)
    cuts = np.searchsorted(cum, np.arange(1, n) * (cum[-1] / n), side="right")
    return [b for b in np.split(idx, np.unique(cuts)) if len(b)]


def write_split(imap: Callable, idx: np.ndarray, nbytes: np.ndarray, path: Path,
                num_proc: int, desc: str) -> dict:
    text_bytes = int(nbytes[idx].sum())
    writer = TokenWriter(path)
    batches = make_batches(idx, nbytes, BATCH_BYTES, min_batches=8 * num_proc)
    try:
        with tqdm(total=text_bytes, unit="B", unit_scale=True, desc=desc) as bar:
            for batch, ids in zip(batches, imap(_encode_batch, batches), strict=True):
                writer.write(ids)
                bar.update(int(nbytes[batch].sum()))
                bar.set_postfix(tokens=writer.pos, refresh=False)
        tokens, sha256 = writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"tokens": tokens, "documents": len(idx), "bytes": 2 * tokens, "sha256": sha256}


# -----------------------------------------------------------------------------
# the output directory: no-op check, lock, publish as a unit

def wanted_meta(source: corpus.Source, seed: int = 2357, val_fraction: float = 0.0005, streaming: bool = False,
                val_tokens: int | None = None, max_tokens: int | None = None) -> dict:
    """The meta.json fields that decide whether a re-run has anything to do (or a streamed one
    can resume): the split is seed and val_fraction, or streamed, val_tokens and max_tokens."""
    wanted = {"format": FORMAT, "tokenizer": "gpt2", "tokenizer_sha256": RANKS_SHA256,
              "dataset": source.name, "sources": source.describe(), "text_field": source.text_field}
    if streaming:
        return {**wanted, "streaming": True, "val_tokens": val_tokens, "max_tokens": max_tokens}
    return {**wanted, "seed": seed, "val_fraction": val_fraction}


def up_to_date(out_dir: Path, wanted: dict) -> bool:
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        return not fileset.pending(out_dir) and all(meta.get(k) == v for k, v in wanted.items()) and all(
            (out_dir / f"{s}.bin").stat().st_size == 2 * meta["splits"][s]["tokens"] for s in SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check_writable(out_dir: Path) -> None:
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write --out_dir {out_dir}: {existing} is not a writable directory",
                        hint="pick an --out_dir on a writable filesystem")


def publish(out_dir: Path, wanted: dict, splits: dict, staged: dict[str, Path]) -> dict:
    """Write meta.json beside the staged bins and publish the three as one set; returns the meta."""
    import datasets
    import tiktoken
    meta = {**wanted, "vocab_size": VOCAB_SIZE, "dtype": "uint16", "eot_token": EOT_TOKEN,
            "splits": splits, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"tiktoken": tiktoken.__version__, "datasets": datasets.__version__}}
    expected = {f"{split}.bin": {k: s[k] for k in ("bytes", "sha256")} for split, s in splits.items()}
    expected["meta.json"] = fileset.write_synced(staged["meta.json"], fileset.meta_json(meta))
    fileset.publish(out_dir, staged, expected)
    return meta


# -----------------------------------------------------------------------------

def prepare(docs, out_dir: Path, wanted: dict, num_proc: int, tokenizer_cache: str | None = None) -> dict:
    """Split, encode and publish `docs` (a one-column datasets.Dataset) into out_dir; the split
    follows wanted["seed"] and wanted["val_fraction"]. Returns the meta.json written."""
    import pyarrow.compute as pc

    nbytes = pc.binary_length(docs.data.column(0)).to_numpy()  # from the offsets: no text read
    if not nbytes.any():
        raise UserError(f"the corpus is empty: {len(docs)} document(s), none with any text")
    train_idx, val_idx = corpus.split_indices(len(docs), wanted["val_fraction"], wanted["seed"])
    if not nbytes[train_idx].any():
        print(f"warning: every document with text landed in val ({len(val_idx)} of {len(docs)}): train.bin "
              "will hold only <|endoftext|> tokens (HINT: add documents, or change --seed or --val_fraction)",
              file=sys.stderr)
    staged = {name: fileset.staged_path(out_dir, name) for name in FILES}
    pool = None
    try:
        if num_proc > 1:
            pool = start_pool(num_proc, _init_worker, (docs, tokenizer_cache))
            imap = pool.imap
        else:
            _init_worker(docs, tokenizer_cache)
            imap = map
        splits = {split: write_split(imap, idx, nbytes, staged[f"{split}.bin"], num_proc, split)
                  for split, idx in (("train", train_idx), ("val", val_idx))}
        return publish(out_dir, wanted, splits, staged)
    finally:
        if pool is not None:
            pool.terminate()
        if not fileset.pending(out_dir):  # once committed, the staged files are the set: keep them
            for path in staged.values():
                path.unlink(missing_ok=True)


def prepare_streamed(source: corpus.Source, args: argparse.Namespace, wanted: dict) -> dict:
    """Stream the source into out_dir (ds_gpt/stream.py) and publish; returns the meta.json written.
    Called with the out_dir's lock held; a failure keeps the staged files for the next run."""
    docs = corpus.load_documents(source, hf_cache=args.cache_dir, streaming=True)
    staged = stream.staged_paths(args.out_dir)
    splits = stream.write_stream(docs, args.out_dir, wanted, source.text_field, args.val_tokens,
                                 args.max_tokens, args.num_proc, args.tokenizer_cache,
                                 lambda err: corpus.explain(source, err), corpus.known_documents(source, docs))
    if splits["train"]["tokens"] == 0:
        stream.discard_checkpoint(args.out_dir)
        raise UserError(f"the corpus ended inside the validation slice ({splits['val']['tokens']:,} tokens, "
                        f"--val_tokens {args.val_tokens:,}): train would be empty",
                        hint="a smaller --val_tokens, or a larger corpus")
    meta_path = fileset.staged_path(args.out_dir, "meta.json")
    try:
        meta = publish(args.out_dir, wanted, splits, {"train.bin": staged["train"], "val.bin": staged["val"],
                                                     "meta.json": meta_path})
    finally:
        if not fileset.pending(args.out_dir):
            meta_path.unlink(missing_ok=True)
    stream.discard_checkpoint(args.out_dir)
    return meta


def prepare_corpus(args: argparse.Namespace) -> int:
    """A text corpus (a Hub dataset, local files, the plays) to train.bin / val.bin / meta.json."""
    check_writable(args.out_dir)
    if fileset.pending(args.out_dir):
        with fileset.writing(args.out_dir):  # finishes the set a killed run committed, so it can be up to date
            pass
    source = corpus.resolve_source(args.dataset, args.input, args.text_field, args.data_files, args.subset)
    get_encoding(args.tokenizer_cache)  # no ranks: fail now, not after loading the corpus
    wanted = wanted_meta(source, args.seed, args.val_fraction, args.streaming, args.val_tokens, args.max_tokens)
    if up_to_date(args.out_dir, wanted):
        print(f"{args.out_dir}: up to date (meta.json matches the inputs); nothing to do")
        return 0
    if source.repo:
        print(f"reading {source.repo} {source.subset or ''} at {source.revision} ({source.how})".replace("  ", " "))
    t0 = time.time()
    docs = None if args.streaming else corpus.load_documents(source, args.num_proc, args.cache_dir)
    t1 = time.time()
    try:
        with fileset.writing(args.out_dir):
            if up_to_date(args.out_dir, wanted):  # another process just wrote it
                return 0
            if args.streaming:
                meta = prepare_streamed(source, args, wanted)
            else:
                meta = prepare(docs, args.out_dir, wanted, args.num_proc, args.tokenizer_cache)
    except OSError as err:  # the previous set is intact; what this run staged is removed (streamed: kept to resume)
        raise os_error(err, doing=f"writing --out_dir {args.out_dir} failed") from None
    dt = time.time() - t1
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    for split, s in meta["splits"].items():
        print(f"{split}: {s['tokens']:,} tokens, {s['documents']:,} documents")
    steps = "read+encode+write" if args.streaming else f"load {t1 - t0:.1f}s, encode+write"
    print(f"wrote {args.out_dir} ({steps} {dt:.1f}s, {tokens / dt / 1e6:.2f} M tok/s)")
    return 0


def prepare_hellaswag(args: argparse.Namespace) -> int:
    """A benchmark, not a corpus: its items tokenized beside the bins, no split (ds_gpt/hellaswag.py)."""
    check_writable(args.out_dir)
    hellaswag.prepare(args.out_dir, args.data_files, args.cache_dir)
    return 0


# --dataset NAME -> the function that prepares it from the parsed arguments.
DATASETS: dict[str, Callable[[argparse.Namespace], int]] = {
    "openwebtext": prepare_corpus,
    "fineweb-edu": prepare_corpus,
    "shakespeare": prepare_corpus,
    "hellaswag": prepare_hellaswag,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return DATASETS.get(args.dataset, prepare_corpus)(args)


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.prepare")
