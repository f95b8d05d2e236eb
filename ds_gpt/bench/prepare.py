"""prepare: corpus -> train.bin/val.bin throughput, ds_gpt.prepare vs nanoGPT's datasets.map."""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ds_gpt.bench.common import add_json_arg, machine, write_json
from ds_gpt.config import positive_int


def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokens/s of ds_gpt.prepare vs nanoGPT's prepare, on shakespeare")
    p.add_argument("--num_proc", type=positive_int, default=len(os.sched_getaffinity(0)), help="processes for both")
    p.add_argument("--repeat", type=positive_int, default=3, help="runs of each; the best is reported")
    add_json_arg(p)
    p.set_defaults(func=bench_prepare)


def nanogpt_prepare(docs, out_dir: Path, val_fraction: float, seed: int, num_proc: int) -> dict[str, str]:
    """nanoGPT's data/openwebtext/prepare.py: encode_ordinary per document inside datasets.map,
    then concatenate the stored token lists into a memmap. Returns the sha256 of each .bin."""
    from ds_gpt.tokenizer import get_encoding

    enc = get_encoding()
    field = docs.column_names[0]

    def process(example):
        ids = enc.encode_ordinary(example[field])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids)}

    split_dataset = docs.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")
    tokenized = split_dataset.map(process, remove_columns=[field], desc="nanoGPT map",
                                  num_proc=num_proc, load_from_cache_file=False)
    digests = {}
    for split, dset in tokenized.items():
        arr_len = np.sum(dset["len"], dtype=np.uint64)
        path = out_dir / f"{split}.bin"
        arr = np.memmap(path, dtype=np.uint16, mode="w+", shape=(arr_len,))
        total_batches, idx = min(1024, len(dset)), 0  # nanoGPT: 1024 (more shards than plays here)
        for batch_idx in range(total_batches):
            batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
            arr_batch = np.concatenate(batch["ids"])
            arr[idx: idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()
        del arr
        digests[split] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def bench_prepare(args: argparse.Namespace) -> None:
    import datasets

    from ds_gpt import corpus, prepare

    datasets.disable_progress_bars()
    source = corpus.resolve_source("shakespeare", None)
    wanted = prepare.wanted_meta(source, seed=2357, val_fraction=0.0005)
    with tempfile.TemporaryDirectory(prefix="ds_gpt-bench-") as tmp:
        docs = corpus.load_documents(source, hf_cache=str(Path(tmp) / "hf"))
        best = {"ds_gpt.prepare": float("inf"), "nanoGPT (datasets.map)": float("inf")}
        for r in range(args.repeat):
            ours, theirs = Path(tmp) / f"ours{r}", Path(tmp) / f"nanogpt{r}"
            ours.mkdir()
            theirs.mkdir()
            t0 = time.perf_counter()
            meta = prepare.prepare(docs, ours, wanted, args.num_proc)
            t1 = time.perf_counter()
            digests = nanogpt_prepare(docs, theirs, wanted["val_fraction"], wanted["seed"], args.num_proc)
            t2 = time.perf_counter()
            best["ds_gpt.prepare"] = min(best["ds_gpt.prepare"], t1 - t0)
            best["nanoGPT (datasets.map)"] = min(best["nanoGPT (datasets.map)"], t2 - t1)
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    same = all(meta["splits"][s]["sha256"] == digests[s] for s in prepare.SPLITS)
    print(f"\nprepare benchmark: shakespeare, {tokens:,} tokens, {len(docs)} documents, "
          f"num_proc {args.num_proc}, best of {args.repeat}")
    print(f"machine: {machine()}")
    for name, seconds in best.items():
        print(f"  {name:24s} {seconds:6.2f} s  {tokens / seconds / 1e6:6.2f} M tok/s")
    speed_up = best["nanoGPT (datasets.map)"] / best["ds_gpt.prepare"]
    print(f"  speed-up {speed_up:.2f}x; identical train.bin/val.bin: {'yes' if same else 'NO'}")
    write_json(args.json, "prepare", {
        "setting": f"shakespeare, num_proc {args.num_proc}, best of {args.repeat}", "tokens": tokens,
        "documents": len(docs), "num_proc": args.num_proc,
        "results": {name: {"seconds": seconds, "tokens_per_s": tokens / seconds} for name, seconds in best.items()},
        "speed_up": speed_up, "identical_files": same})
