"""step: our trainer's DeepSpeed step vs a plain PyTorch loop on the same model and data."""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from ds_gpt import mfu
from ds_gpt.bench.common import (
    TrainerStep,
    add_json_arg,
    load,
    machine,
    median_with_spread,
    write_json,
    write_synthetic_bin,
)
from ds_gpt.bench.step_profile import marked_forward, marked_method, profile_steps
from ds_gpt.config import positive_int
from ds_gpt.data import BatchPrefetcher, RandomWindowSampler

# A CPU-sized model by default; GPT-2's vocabulary (50304) would make its head dominate a CPU step.
CPU_SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256, "vocab_size": 8192,
             "micro_batch_size": 4, "gradient_accumulation_steps": 2}


def add_step(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("step", help="tokens/s and MFU of our DeepSpeed step vs a plain PyTorch AdamW loop")
    p.add_argument("--zero_stage", type=int, choices=(0, 1, 2), default=1, help="ds_configs/zero<N>.json")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: DeepSpeed's bf16 engine vs torch.autocast in the plain loop (nanoGPT's way)")
    p.add_argument("--recipe", action="store_true",
                   help="the 124M recipe (the trainer's default model, T=1024, vocab 50304, and the JSON's "
                        "12 x 1024 micro-batches with the accumulation its 480-sequence batch implies) "
                        "instead of the CPU-sized model; the flags below still override")
    for flag, default in CPU_SHAPE.items():
        p.add_argument(f"--{flag}", type=positive_int, help=f"default {default}, or the recipe's with --recipe")
    p.add_argument("--compile", action="store_true", help="torch.compile both: engine.compile() and torch.compile()")
    p.add_argument("--plain_fused", action="store_true",
                   help="the plain loop steps torch's fused AdamW on CPU too, as ds_gpt does (nanoGPT asks for it "
                        "on CUDA only): the same optimizer kernel on both sides")
    p.add_argument("--iters", type=positive_int, default=20,
                   help="timed iterations of each, taking turns: the pairs of back-to-back steps compared")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations of each first (compilation included)")
    p.add_argument("--profile_iters", type=int, default=3,
                   help="iterations of each run under torch.profiler afterwards, for the split of a step (0: none)")
    p.add_argument("--peak_tflops", type=float, help="per-device peak for MFU (default: table, or measured on CPU)")
    add_json_arg(p)
    p.set_defaults(func=bench_step)


def host_syncs_in(step: Callable[[int], object], it: int) -> int:
    """The synchronizing CUDA calls (a device-to-host read, a blocking copy) that `step(it)` makes."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(it)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def bench_step(args: argparse.Namespace) -> None:
    from ds_gpt import engine as ds_engine
    from ds_gpt.config import parse_args
    from ds_gpt.model import GPT, GPTConfig
    from ds_gpt.run_config import resolve

    ds_engine.init_distributed(timeout_s=120)  # one "single" rank: RANK/WORLD_SIZE/MASTER_* exported
    cuda = torch.cuda.is_available()
    dev = ds_engine.device()
    with tempfile.TemporaryDirectory(prefix="ds_gpt-bench-") as tmp:
        defaults = {} if args.recipe else CPU_SHAPE  # --recipe: the trainer's own defaults and the JSON's batch
        given = {k: getattr(args, k) for k in CPU_SHAPE if getattr(args, k) is not None}
        shape_flags = [f"--{k}={v}" for k, v in {**defaults, **given}.items()]
        # The trainer's own parsing and resolution: the same JSON, overrides and batch arithmetic.
        cfg = parse_args([f"--deepspeed_config=ds_configs/zero{args.zero_stage}.json",
                          f"--zero_stage={args.zero_stage}", f"--dtype={args.dtype}", f"--out_dir={tmp}/out",
                          "--compile=False", *shape_flags])
        run = resolve(cfg, 1, cuda=cuda)
        model_cfg = GPTConfig(**run.model)
        tf = write_synthetic_bin(Path(tmp) / "train.bin", 1 << 22, model_cfg.vocab_size)
        sampler = RandomWindowSampler(tf, "train", model_cfg.block_size, model_cfg.vocab_size, cfg.seed,
                                      run.batch.micro, run.batch.grad_accum, 1, 0)
        torch.manual_seed(cfg.seed)
        model = GPT(model_cfg)
        plain = copy.deepcopy(model).to(dev)  # the same initial weights for both
        n_params = model.num_params()
        trainer_step = TrainerStep(model, run)
        eng = trainer_step.engine

        # The plain loop is nanoGPT's train.py step: torch AdamW (fused on GPUs; with --plain_fused on
        # CPU too) over the same param groups and JSON hyper-parameters, autocast for bf16,
        # loss / accum, clipping, torch.compile.
        hp = run.ds_config["optimizer"]["params"]
        opt = torch.optim.AdamW(plain.optimizer_param_groups(run.weight_decay), lr=run.learning_rate,
                                betas=tuple(hp.get("betas", (0.9, 0.999))), eps=hp.get("eps", 1e-8),
                                fused=cuda or args.plain_fused or None)
        if args.compile:
            eng.compile()
            plain_forward = torch.compile(plain)
        else:
            plain_forward = plain
        clip = float(run.ds_config.get("gradient_clipping", 0.0))
        autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                    else contextlib.nullcontext())
        sync = torch.cuda.synchronize if cuda else (lambda: None)  # time the GPU's work, not its queueing
        batches = BatchPrefetcher(sampler, dev)  # the trainer's read-ahead; the plain loop reads inline

        def ds_iter(it: int) -> float:
            return trainer_step(batches, it).loss

        class PlainLoop:
            """nanoGPT's train.py step; `update` is its clipping, optimizer step and zero_grad."""

            def update(self) -> None:
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(plain.parameters(), clip)
                opt.step()
                opt.zero_grad(set_to_none=True)

            def __call__(self, it: int) -> float:
                for group in opt.param_groups:
                    group["lr"] = run.lr_at(it)
                total = torch.zeros((), device=dev)
                for micro in range(run.batch.grad_accum):
                    # nanoGPT's get_batch: on CUDA from pinned memory, without waiting for the copy
                    x, y = (t.pin_memory().to(dev, non_blocking=True) if cuda else t
                            for t in sampler.micro_batch(it, micro))
                    with autocast:
                        loss = plain_forward(x, y)[1]
                    total += loss.detach()  # on the device: like nanoGPT, no host sync per micro-batch
                    (loss / run.batch.grad_accum).backward()
                self.update()
                return total.item() / run.batch.grad_accum

        plain_iter = PlainLoop()

        steps = {"DeepSpeed (ds_gpt)": ds_iter, "plain PyTorch": plain_iter}
        times: dict[str, list[float]] = {name: [] for name in steps}
        losses: dict[str, list[float]] = {name: [] for name in steps}
        peak_mem: dict[str, float] = {name: 0.0 for name in steps}
        for it in range(args.warmup + args.iters):
            # Both see iteration `it`'s batch and lr; the order alternates so drift in load cancels.
            for name in (list(steps) if it % 2 == 0 else list(steps)[::-1]):
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                losses[name].append(steps[name](it))
                sync()
                if it >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
                if cuda:
                    peak_mem[name] = max(peak_mem[name], torch.cuda.max_memory_allocated() / 2**30)

        # The same steps again under the profiler: how much of each is the model's own work.
        breakdown: dict[str, dict] = {}
        if args.profile_iters > 0 and not args.compile:
            profiled = range(args.warmup + args.iters, args.warmup + args.iters + args.profile_iters)
            with (marked_forward(eng.module), marked_forward(plain), marked_method(eng, "_take_model_step"),
                  marked_method(plain_iter, "update")):
                breakdown = profile_steps(steps, profiled, cuda=cuda)
        # On a GPU, how often each loop's step makes the host wait for the device: the trainer
        # promises one, its read of the step's losses. CPU work is synchronous: nothing to count.
        host_syncs = {name: host_syncs_in(step, args.warmup + args.iters + args.profile_iters)
                      for name, step in steps.items()} if cuda else None

    peak, source = mfu.peak_flops_per_device(ds_engine.device_name(), run.dtype, args.peak_tflops)
    fpt = mfu.flops_per_token(n_params, model_cfg.n_layer, model_cfg.n_embd, model_cfg.block_size)
    setting = (f"ZeRO-{run.zero_stage} {run.dtype}{', torch.compile' if args.compile else ''}, 1 rank on "
               f"{ds_engine.device_name()}; {model_cfg.n_layer} layers, d={model_cfg.n_embd}, "
               f"T={model_cfg.block_size}, vocab {model_cfg.vocab_size}, {n_params / 1e6:.2f}M params; "
               f"batch {run.batch.micro} x {run.batch.grad_accum} accum = {run.tokens_per_iter:,} tokens/iter"
               + ("; plain loop with fused AdamW" if args.plain_fused else ""))
    print(f"\nstep benchmark: {setting}; {args.iters} timed iterations of each after {args.warmup} warm-up")
    print(f"machine: {machine()}; {load()}; peak {peak / 1e12:.3g} TFLOPS ({source})")
    # Medians, and overhead paired by iteration: two steps run back to back see the same load,
    # which other jobs on a shared machine vary several-fold from one second to the next.
    figures: dict[str, dict] = {}
    for name, ts in times.items():
        rate = run.tokens_per_iter / statistics.median(ts)
        figures[name] = {"tokens_per_s": rate, "ms_per_iter": statistics.median(ts) * 1000, "ms_best": min(ts) * 1000,
                         "mfu": mfu.mfu(rate, fpt, 1, peak), "final_loss": losses[name][-1]}
        memory = f"  peak GPU memory {peak_mem[name]:.1f} GiB" if cuda else ""
        if cuda:
            figures[name]["peak_gpu_mem_gib"] = peak_mem[name]
        print(f"  {name:20s} {rate:10,.0f} tokens/s  {figures[name]['ms_per_iter']:8.1f} ms/iter median "
              f"({figures[name]['ms_best']:.1f} best)  MFU {figures[name]['mfu']:6.2%}  "
              f"final loss {losses[name][-1]:.4f}{memory}")
    if cuda:
        print("  (peak memory: allocated during that side's steps, with both models resident)")
    ds_t, plain_t = times.values()
    paired = statistics.median(a / b for a, b in zip(ds_t, plain_t, strict=True)) - 1
    # ds_gpt's speed as a multiple of the plain loop's, one ratio per pair of back-to-back steps.
    speed = median_with_spread([b / a for a, b in zip(ds_t, plain_t, strict=True)])
    lo, hi = speed["ci95"]
    verdict = ("ds_gpt faster" if lo > 1 else "ds_gpt slower" if hi < 1 else "no difference this run can resolve")
    drift = max(abs(a - b) for a, b in zip(*losses.values(), strict=True))
    print(f"  ds_gpt speed / plain loop's: median {speed['median']:.3f}x over {len(ds_t)} pairs of back-to-back "
          f"steps, IQR {speed['iqr'][0]:.3f}-{speed['iqr'][1]:.3f}, 95% CI {lo:.3f}-{hi:.3f}: {verdict} "
          f"(target >= 1.0x); largest loss difference between the two {drift:.2e}")
    for name, split in breakdown.items():
        print(f"  {name:20s} profiled {split['step_ms']:8.1f} ms/step: forward {split['forward_ms']:.1f}, "
              f"backward {split['backward_ms']:.1f}, optimizer {split['optimizer_ms']:.1f}, outside the model "
              f"{split['overhead_ms']:.2f} ms = {split['overhead_fraction']:.2%} of the step"
              + (f"; GPU idle {split['gpu_idle_fraction']:.2%}" if "gpu_idle_fraction" in split else ""))
    if breakdown:
        ds_split, plain_split = breakdown.values()
        excess = (ds_split["overhead_ms"] - plain_split["overhead_ms"]) / ds_split["step_ms"]
        print(f"  ds_gpt's overhead beyond the plain loop's: {excess:+.2%} of its step (target <= 2%)")
    elif args.compile:
        print("  (no split of the step under --compile: the profiler's markers would be compiled into the model)")
    if host_syncs is not None:
        print("  host waits for the GPU in one step (torch's sync debug mode): "
              + ", ".join(f"{name} {n}" for name, n in host_syncs.items()) + " (the trainer's promise: 1)")
    write_json(args.json, "step", {
        "setting": setting, "device": ds_engine.device_name(), "peak_flops": peak, "peak_source": source,
        "tokens_per_iter": run.tokens_per_iter, "results": figures, "overhead_paired": paired,
        "speed_ratio_paired": speed, "verdict": verdict, "breakdown": breakdown,
        "overhead_excess_fraction": excess if breakdown else None, "max_loss_difference": drift,
        "host_syncs_per_step": host_syncs})
    ds_engine.shutdown()  # as the trainer does: the process group goes before the interpreter
