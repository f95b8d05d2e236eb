"""Benchmarks that print figures and never pass or fail: `python -m ds_gpt.bench <what>`.

    python -m ds_gpt.bench prepare --num_proc 2   # tokens/s: ours vs nanoGPT's datasets.map
    python -m ds_gpt.bench loader                 # batches/s: RandomWindowSampler vs nanoGPT's get_batch
    python -m ds_gpt.bench step --zero_stage 1    # tokens/s and MFU: our DeepSpeed step vs a plain PyTorch loop
    python -m ds_gpt.bench memory --iters 3000    # host RSS over a 3000-iteration run on a 1 GB .bin

Each benchmark is a function `bench_<what>(args)` plus an `add_<what>(subparsers)` that
declares its flags; adding one is those two functions and one entry in BENCHES.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from ds_gpt import mfu
from ds_gpt.data import TOKEN_DTYPE, RandomWindowSampler, TokenFile, check_token_file
from ds_gpt.errors import run_cli


def machine() -> str:
    """One line naming the CPU, for figures that only mean something with the machine."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"{model}, {len(os.sched_getaffinity(0))} usable cores, {platform.python_implementation()} {platform.python_version()}"


def load() -> str:
    """The 1/5/15-minute load averages: figures from a shared machine mean little without them."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


# -----------------------------------------------------------------------------
# prepare: corpus -> train.bin/val.bin throughput

def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokens/s of ds_gpt.prepare vs nanoGPT's prepare, on shakespeare")
    p.add_argument("--num_proc", type=int, default=len(os.sched_getaffinity(0)), help="processes for both")
    p.add_argument("--repeat", type=int, default=3, help="runs of each; the best is reported")
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
    print(f"  speed-up {best['nanoGPT (datasets.map)'] / best['ds_gpt.prepare']:.2f}x; "
          f"identical train.bin/val.bin: {'yes' if same else 'NO'}")


# -----------------------------------------------------------------------------
# Shared by loader, memory and tests/test_memory.py: synthetic token files, the loaders we
# compare against, and the process's resident memory.

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
    """Our sampler with one np.memmap kept open for the whole run, as nanoGPT read its data
    before the per-batch fix: every page a window touches stays mapped, so RSS climbs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokens = np.memmap(self.file.path, dtype=TOKEN_DTYPE, mode="r")

    def _read(self, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.from_numpy(self._tokens[offsets[:, None] + self._window].astype(np.int64))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


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
    p.add_argument("--batch", type=int, default=12, help="windows per batch (nanoGPT's batch_size)")
    p.add_argument("--block", type=int, default=1024, help="tokens per window (nanoGPT's block_size)")


def bench_data(args: argparse.Namespace, tmp: Path, n_tokens: int, vocab_size: int) -> tuple[Path, str]:
    """--data_dir as given, else a synthetic train.bin of `n_tokens` and a small val.bin under `tmp`."""
    if args.data_dir:
        return Path(args.data_dir), f"data {args.data_dir}"
    data = tmp / "data"
    data.mkdir()
    write_synthetic_bin(data / "train.bin", n_tokens, vocab_size)
    write_synthetic_bin(data / "val.bin", 64 * (args.block + 1), vocab_size, seed=1)
    return data, f"synthetic {n_tokens * 2 / 2**20:,.0f} MiB train.bin"


# -----------------------------------------------------------------------------
# loader: batches/s of one vectorised gather vs nanoGPT's per-row get_batch

def add_loader(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loader", help="batches/s of RandomWindowSampler vs nanoGPT's per-row get_batch")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data_dir", help="read DIR/train.bin (python -m ds_gpt.prepare) instead of a synthetic file")
    src.add_argument("--synthetic_mb", type=int, default=400, help="size of the synthetic train.bin in MiB")
    add_window_args(p)
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per loader, over --rounds rounds")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds; the median round is reported")
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


# -----------------------------------------------------------------------------
# step: our trainer's DeepSpeed step vs a plain PyTorch loop on the same model and data

def add_step(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("step", help="tokens/s and MFU of our DeepSpeed step vs a plain PyTorch AdamW loop")
    p.add_argument("--zero_stage", type=int, choices=(0, 1, 2), default=1, help="ds_configs/zero<N>.json")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: DeepSpeed's bf16 engine vs torch.autocast in the plain loop (nanoGPT's way)")
    # CPU-sized model; --vocab_size 50304 is GPT-2's, whose head then dominates a CPU step.
    for flag, default in (("n_layer", 4), ("n_head", 4), ("n_embd", 256), ("block_size", 256), ("vocab_size", 8192),
                          ("micro_batch_size", 4), ("gradient_accumulation_steps", 2)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--iters", type=int, default=10, help="timed iterations of each")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations of each first")
    p.add_argument("--peak_tflops", type=float, help="per-device peak for MFU (default: table, or measured on CPU)")
    p.set_defaults(func=bench_step)


def bench_step(args: argparse.Namespace) -> None:
    from ds_gpt import engine as ds_engine
    from ds_gpt.config import parse_args
    from ds_gpt.run_config import resolve
    from ds_gpt.model import GPT, GPTConfig
    from ds_gpt.signals import GracefulStop
    from ds_gpt.train import train_step

    ds_engine.init_distributed(timeout_s=120)  # one "single" rank: RANK/WORLD_SIZE/MASTER_* exported
    cuda = torch.cuda.is_available()
    dev = ds_engine.device()
    with tempfile.TemporaryDirectory(prefix="ds_gpt-bench-") as tmp:
        shape_flags = [f"--{k}={getattr(args, k)}" for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size",
                                                               "micro_batch_size", "gradient_accumulation_steps")]
        # The trainer's own parsing and resolution: the same JSON, overrides and batch arithmetic.
        cfg = parse_args([f"--deepspeed_config=ds_configs/zero{args.zero_stage}.json", f"--zero_stage={args.zero_stage}",
                          f"--dtype={args.dtype}", f"--out_dir={tmp}/out", "--compile=False", *shape_flags])
        run = resolve(cfg, 1, cuda=cuda)
        tf = write_synthetic_bin(Path(tmp) / "train.bin", 1 << 22, args.vocab_size)
        sampler = RandomWindowSampler(tf, "train", args.block_size, args.vocab_size, cfg.seed,
                                      run.batch.micro, run.batch.grad_accum, 1, 0)
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(**run.model))
        plain = copy.deepcopy(model).to(dev)  # the same initial weights for both
        n_params = model.num_params()
        eng = ds_engine.build_engine(model, run)

        # The plain loop: torch AdamW over the same param groups and JSON hyper-parameters,
        # nanoGPT's accumulation (loss / accum) and clipping.
        hp = run.ds_config["optimizer"]["params"]
        opt = torch.optim.AdamW(plain.optimizer_param_groups(run.weight_decay), lr=run.learning_rate,
                                betas=tuple(hp.get("betas", (0.9, 0.999))), eps=hp.get("eps", 1e-8), fused=cuda or None)
        clip = float(run.ds_config.get("gradient_clipping", 0.0))
        autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                    else contextlib.nullcontext())
        stop = GracefulStop()  # not installed: Ctrl-C stops the benchmark as usual
        sync = torch.cuda.synchronize if cuda else (lambda: None)  # time the GPU's work, not its queueing

        def ds_iter(it: int) -> float:  # train.main's loop body, less logging and checkpoints
            ds_engine.set_lr(eng, run.lr_at(it))
            stats = train_step(eng, sampler, it, stop)
            eng.step()
            return stats["loss"]

        def plain_iter(it: int) -> float:
            for group in opt.param_groups:
                group["lr"] = run.lr_at(it)
            total = 0.0
            for micro in range(run.batch.grad_accum):
                x, y = (t.to(dev) for t in sampler.micro_batch(it, micro))
                with autocast:
                    loss = plain(x, y)[1]
                total += loss.item()
                (loss / run.batch.grad_accum).backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(plain.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return total / run.batch.grad_accum

        steps = {"DeepSpeed (ds_gpt)": ds_iter, "plain PyTorch": plain_iter}
        times: dict[str, list[float]] = {name: [] for name in steps}
        losses: dict[str, list[float]] = {name: [] for name in steps}
        for it in range(args.warmup + args.iters):
            # Both see iteration `it`'s batch and lr; the order alternates so drift in load cancels.
            for name in (list(steps) if it % 2 == 0 else list(steps)[::-1]):
                sync()
                t0 = time.perf_counter()
                losses[name].append(steps[name](it))
                sync()
                if it >= args.warmup:
                    times[name].append(time.perf_counter() - t0)

    peak, source = mfu.peak_flops_per_device(ds_engine.device_name(), run.dtype, args.peak_tflops)
    fpt = mfu.flops_per_token(n_params, args.n_layer, args.n_embd, args.block_size)
    print(f"\nstep benchmark: ZeRO-{run.zero_stage} {run.dtype}, 1 rank on {ds_engine.device_name()}; "
          f"{args.n_layer} layers, d={args.n_embd}, T={args.block_size}, vocab {args.vocab_size}, "
          f"{n_params / 1e6:.2f}M params; batch {run.batch.micro} x {run.batch.grad_accum} accum "
          f"= {run.tokens_per_iter:,} tokens/iter; {args.iters} timed iterations of each after {args.warmup} warm-up")
    print(f"machine: {machine()}; {load()}; peak {peak / 1e12:.1f} TFLOPS ({source})")
    # Medians, and overhead paired by iteration: two steps run back to back see the same load,
    # which other jobs on a shared machine vary several-fold from one second to the next.
    for name, ts in times.items():
        rate = run.tokens_per_iter / statistics.median(ts)
        print(f"  {name:20s} {rate:10,.0f} tokens/s  {statistics.median(ts) * 1000:8.1f} ms/iter median "
              f"({min(ts) * 1000:.1f} best)  MFU {mfu.mfu(rate, fpt, 1, peak):6.2%}  final loss {losses[name][-1]:.4f}")
    ds_t, plain_t = times.values()
    paired = statistics.median(a / b for a, b in zip(ds_t, plain_t)) - 1
    drift = max(abs(a - b) for a, b in zip(*losses.values()))
    print(f"  DeepSpeed overhead {paired:+.1%} of the plain loop's time, median of per-iteration ratios "
          f"(best vs best {min(ds_t) / min(plain_t) - 1:+.1%}; target <= 5%); "
          f"largest loss difference between the two {drift:.2e}")


# -----------------------------------------------------------------------------
# memory: host RSS of a long training run, and of the loader with and without a fresh memmap

def add_memory(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="RSS growth of the trainer over a long run on a big .bin, and the loader's")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data_dir", help="DIR with train.bin and val.bin instead of a synthetic pair")
    src.add_argument("--synthetic_gb", type=float, default=1.0, help="size of the synthetic train.bin in GiB")
    p.add_argument("--iters", type=int, default=3000, help="training iterations, and loader-only batches")
    p.add_argument("--warmup", type=int, default=100, help="iterations before the RSS baseline is taken")
    add_window_args(p)
    p.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), default=1)
    p.add_argument("--vocab_size", type=int, default=64, help="the tiny model's vocabulary; synthetic ids stay below it")
    p.set_defaults(func=bench_memory)


def trainer_rss(data_dir: Path, out_dir: Path, args: argparse.Namespace, poll_s: float = 0.25) -> dict[str, float]:
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
    metrics_path, last_iter, samples = out_dir / "metrics.jsonl", -1, []
    with open(out_dir.parent / "train.log", "w") as log:
        # One thread: on a loaded 2-core machine a tiny model's T=1024 step runs several times faster
        # with one than with two, and the thread count does not change what this measures.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent,
                                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        try:
            while proc.poll() is None:
                with contextlib.suppress(OSError, ValueError):  # not there yet, or a line half written
                    tail = [json.loads(line) for line in metrics_path.read_text().splitlines()[-3:]]
                    last_iter = max([last_iter] + [r["iter"] for r in tail if "loss" in r and "event" not in r])
                with contextlib.suppress(Exception):  # the process may exit between poll() and here
                    samples.append((last_iter, rss_mb(proc.pid)))
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
        alone = {"loader, fresh memmap per batch (ours)": loader_rss(
                     sampler_for(tf, args.batch, args.block, args.vocab_size), args.iters - args.warmup, args.warmup),
                 "loader, one long-lived memmap": loader_rss(
                     sampler_for(tf, args.batch, args.block, args.vocab_size, LongLivedMemmapSampler), args.iters, 0)}
    print(f"\nmemory benchmark: {args.iters} iterations of {args.batch} x {args.block} windows over {what}; "
          f"RSS baseline after {args.warmup} iterations")
    print(f"machine: {machine()}; {load()}")
    print(f"  trainer (python -m ds_gpt.train, ZeRO-{args.zero_stage}, tiny model, {minutes:.1f} min): "
          f"RSS {trainer['base']:,.0f} -> {trainer['end_of_loop']:,.0f} MiB at the last iterations "
          f"= {trainer['end_of_loop'] - trainer['base']:+,.0f} MiB (max {trainer['max'] - trainer['base']:+,.0f}, "
          f"incl. final eval and checkpoint; target within +50)")
    for (name, (base, end)), batches in zip(alone.items(), (args.iters - args.warmup, args.iters)):
        print(f"  {name:38s} RSS {base:,.0f} -> {end:,.0f} MiB = {end - base:+,.0f} MiB over {batches} batches")


# -----------------------------------------------------------------------------

BENCHES = [add_prepare, add_loader, add_step, add_memory]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds_gpt.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    for add in BENCHES:
        add(sub)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.bench")
