"""recipe: tokens to a target loss, the reference recipe (AdamW, cosine) against the Muon recipe (Muon, WSD).

Both train the same tiny GPT-2 on the same data, batch, steps and seed, in this one process, with
the trainer's own step (ds_gpt.train.train_step), engine (ds_gpt.engine) and schedule
(RunConfig.lr_at). Each recipe runs at every multiple of its base learning rate in --lr_scales
(the sweep, printed); the best final val loss of each is compared. The target is the reference's
best final val loss; the Muon run's val curve (evaluated every --eval_every steps, linear between
evaluations) says how many tokens it needed to reach it. token_ratio = reference tokens / Muon
tokens: > 1 means Muon is more token-efficient.

The corpus's ids are renumbered to the ones it uses (train.bin and val.bin together) so the head is
as wide as the corpus's vocabulary, not GPT-2's 50,304 (the same text, the same model otherwise;
a full-width head would hold most of a tiny model's parameters and compute).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from ds_gpt.bench.common import TrainerStep, add_json_arg, load, machine, write_json
from ds_gpt.config import positive_int
from ds_gpt.errors import UserError
from ds_gpt.paths import repo_path

SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}  # ~12 min for the sweep on 2 idle cores
# Each recipe's base learning rate; the sweep multiplies it. The Muon recipe's AdamW side (embeddings,
# gains) runs at the reference's lr of the same sweep point, so only the hidden matrices change optimizer.
RECIPES = {"reference": {"json": "ds_configs/zero1.json", "lr": 2e-3, "schedule": "cosine"},
           "muon": {"json": "ds_configs/zero1_muon.json", "lr": 0.02, "schedule": "wsd"}}


def add_recipe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipe", help="tokens to the reference recipe's final val loss: AdamW+cosine vs Muon+WSD")
    p.add_argument("--data_dir", required=True, help="train.bin and val.bin (python -m ds_gpt.prepare)")
    p.add_argument("--steps", type=positive_int, default=300, help="optimizer steps of every run")
    p.add_argument("--batch_size", type=positive_int, default=16, help="sequences per step")
    p.add_argument("--lr_scales", default="0.5,1,2", help="multiples of each recipe's base lr swept (at least 3)")
    p.add_argument("--eval_every", type=positive_int, default=25, help="steps between val evaluations")
    p.add_argument("--eval_iters", type=positive_int, default=8, help="val batches per evaluation")
    for flag, default in SHAPE.items():
        p.add_argument(f"--{flag}", type=positive_int, default=default)
    add_json_arg(p)
    p.set_defaults(func=bench_recipe)


def compact_vocabulary(data_dir: Path, out: Path) -> int:
    """Write train.bin/val.bin of `data_dir` to `out` with ids renumbered 0..V-1 (V: ids in use); returns V."""
    bins = {}
    for split in ("train", "val"):
        try:
            bins[split] = np.fromfile(data_dir / f"{split}.bin", dtype=np.uint16)
        except FileNotFoundError:
            raise UserError(f"{data_dir / f'{split}.bin'} not found",
                            hint="python -m ds_gpt.prepare --dataset shakespeare writes data/shakespeare") from None
    used = np.unique(np.concatenate(list(bins.values())))
    out.mkdir(parents=True, exist_ok=True)
    for split, ids in bins.items():
        np.searchsorted(used, ids).astype(np.uint16).tofile(out / f"{split}.bin")
    return int(len(used))


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which a val curve [(tokens, loss), ...] first reaches `target`, linear between points."""
    for (t0, l0), (t1, l1) in itertools.pairwise(curve):
        if l1 <= target:
            return t1 if l0 == l1 else t0 + (t1 - t0) * max(0.0, min(1.0, (l0 - target) / (l0 - l1)))
    return None


def bench_recipe(args: argparse.Namespace) -> None:
    scales = [float(s) for s in args.lr_scales.split(",") if s.strip()]
    if len(scales) < 3:
        raise UserError(f"--lr_scales needs at least 3 learning rates (got {args.lr_scales!r})")
    from ds_gpt import engine as ds_engine

    ds_engine.init_distributed(timeout_s=600)  # one "single" rank
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ds_gpt-recipe-") as tmp:
        data = Path(tmp) / "data"
        vocab = compact_vocabulary(repo_path(args.data_dir), data)
        runs = {name: [train_one(args, name, recipe, scale, data, vocab, Path(tmp) / f"{name}-{scale}")
                       for scale in scales] for name, recipe in RECIPES.items()}
    best = {name: min(sweep, key=lambda r: r["final_val_loss"]) for name, sweep in runs.items()}
    tokens_per_step = args.batch_size * args.block_size
    reference_tokens = args.steps * tokens_per_step
    target = best["reference"]["final_val_loss"]
    reached = tokens_to_reach(best["muon"]["val_curve"], target)
    ratio = reference_tokens / reached if reached else None

    setting = (f"{args.n_layer} layers, d={args.n_embd}, T={args.block_size}, vocab {vocab} (the corpus's ids), "
               f"batch {args.batch_size} ({tokens_per_step:,} tokens/step), {args.steps} steps, fp32, ZeRO-1, 1 rank")
    print(f"\nrecipe benchmark on {args.data_dir}: {setting}")
    print(f"machine: {machine()}; {load()}; {time.perf_counter() - started:.0f} s in all")
    for name, sweep in runs.items():
        for r in sweep:
            mark = "  <- best" if r is best[name] else ""
            print(f"  {name:9s} lr {r['lr']:<8.3g} final val loss {r['final_val_loss']:.4f}  "
                  f"({r['seconds']:.0f} s){mark}")
    print(f"  reference final val loss {target:.4f}; Muon {best['muon']['final_val_loss']:.4f}")
    print("  Muon reaches the reference's final val loss after "
          + (f"{reached:,.0f} tokens of {reference_tokens:,}: token_ratio {ratio:.2f}" if reached
             else f"no point of its run ({reference_tokens:,} tokens): token_ratio below 1"))
    write_json(args.json, "recipe", {
        "setting": setting, "data_dir": str(args.data_dir), "tokens_per_step": tokens_per_step,
        "steps": args.steps, "sweep": runs, "reference_final_val_loss": target,
        "muon_final_val_loss": best["muon"]["final_val_loss"], "tokens_to_reference_loss": reached,
        "reference_tokens": reference_tokens, "token_ratio": ratio})
    ds_engine.shutdown()


def train_one(args: argparse.Namespace, name: str, recipe: dict, scale: float, data: Path, vocab: int,
              out: Path) -> dict:
    """One run of `recipe` at `scale` x its base lr: the trainer's step and schedule; its val curve."""
    import torch

    from ds_gpt import engine as ds_engine
    from ds_gpt.config import parse_args
    from ds_gpt.data import BatchPrefetcher, RandomWindowSampler, check_data_dir
    from ds_gpt.model import GPT, GPTConfig
    from ds_gpt.run_config import resolve
    from ds_gpt.train import evaluate

    lr = recipe["lr"] * scale
    ds_json = repo_path(recipe["json"])
    if name == "muon":  # its AdamW side at the reference's lr of this sweep point
        ds = json.loads(ds_json.read_text())
        ds["optimizer"]["params"]["adam_lr"] = RECIPES["reference"]["lr"] * scale
        ds_json = out.with_suffix(".json")
        ds_json.parent.mkdir(parents=True, exist_ok=True)
        ds_json.write_text(json.dumps(ds))
    shape = [f"--{k}={getattr(args, k)}" for k in SHAPE]
    cfg = parse_args([f"--deepspeed_config={ds_json}", "--dtype=float32", "--compile=False", f"--out_dir={out}",
                      f"--vocab_size={vocab}", *shape, f"--global_batch_size={args.batch_size}",
                      f"--micro_batch_size={args.batch_size}", f"--learning_rate={lr}", f"--min_lr={lr / 10}",
                      f"--lr_schedule={recipe['schedule']}", f"--warmup_iters={max(1, args.steps // 20)}",
                      f"--lr_decay_iters={args.steps}", f"--max_iters={args.steps}"])
    run = resolve(cfg, 1, cuda=torch.cuda.is_available())
    files = check_data_dir(data, cfg.block_size, vocab)
    samplers = {split: RandomWindowSampler(files[split], split, cfg.block_size, vocab, cfg.seed, run.batch.micro,
                                           run.batch.grad_accum, 1, 0) for split in ("train", "val")}
    torch.manual_seed(cfg.seed)
    step = TrainerStep(GPT(GPTConfig(**run.model)), run)
    t0 = time.perf_counter()
    curve = []
    with BatchPrefetcher(samplers["train"], ds_engine.device()) as batches:
        for it in range(args.steps + 1):
            if it % args.eval_every == 0 or it == args.steps:
                val = evaluate(step.engine, {"val": samplers["val"]}, args.eval_iters)["val"]
                curve.append((it * run.tokens_per_iter, val if math.isfinite(val) else float("inf")))
            if it == args.steps:
                break
            if step(batches, it).action == "stop":
                curve.append((it * run.tokens_per_iter, float("inf")))  # diverged: this lr loses the sweep
                break
    print(f"  {name} lr {lr:.3g}: final val loss {curve[-1][1]:.4f}", flush=True)
    return {"lr": lr, "final_val_loss": curve[-1][1], "val_curve": curve, "seconds": time.perf_counter() - t0}
