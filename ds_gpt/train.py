"""Train GPT-2 with DeepSpeed: nanoGPT's recipe, configured by a DeepSpeed JSON.

The GPT-2 124M run of the seed (8 x A100, 2 nodes), with the deepspeed launcher:
    deepspeed --hostfile hostfiles/narval ds_gpt/train.py --deepspeed_config ds_configs/zero1.json
Under SLURM (generates the hostfile, forwards pre-emption, requeues; DS_GPT_LAUNCH=srun for srun):
    sbatch slurm/ds_train.sh
One node, N ranks (GPUs, or CPU processes over gloo):
    deepspeed --num_gpus 2 ds_gpt/train.py --deepspeed_config ds_configs/zero1.json --data_dir data/shakespeare
Other launchers:
    srun python ds_gpt/train.py ...        mpirun -np 2 python ds_gpt/train.py ...
    torchrun --nproc_per_node 2 ds_gpt/train.py ...
One process, small model on CPU:
    python -m ds_gpt.train --config config/demo_cpu.toml
Every option: python -m ds_gpt.train --help. Exit codes: 0 done, 2 bad input, 3 non-finite
loss (--on_nan stop), 4 a peer rank failed, 75 checkpointed on a signal (requeue).
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # started as a file by a launcher: import the package, not siblings
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
import torch.distributed as dist

from ds_gpt import checkpoint, engine as ds_engine, mfu, run_dir
from ds_gpt.config import parse_args
from ds_gpt.data import RandomWindowSampler, check_data_dir
from ds_gpt.errors import EXIT_NONFINITE, EXIT_OK, EXIT_PEER_FAILED, EXIT_REQUEUE, UserError, run_cli
from ds_gpt.init_weights import initial_weights
from ds_gpt.metrics import MetricsLogger
from ds_gpt.model import GPT, GPTConfig
from ds_gpt.run_config import RunConfig, adopt_model_args, resolve
from ds_gpt.signals import GracefulStop


@torch.no_grad()
def evaluate(eng, samplers: dict[str, RandomWindowSampler], eval_iters: int) -> dict[str, float]:
    """Mean loss per split over `eval_iters` batches on every rank, averaged over ranks."""
    eng.eval()
    out = {}
    for split, sampler in samplers.items():
        total = 0.0
        for k in range(eval_iters):
            x, y = (t.to(ds_engine.device()) for t in sampler.eval_batch(k))
            total += eng(x, y)[1].item()
        summed, ranks = ds_engine.all_reduce_sum([total / eval_iters, 1.0])
        out[split] = summed / ranks
    eng.train()
    return out


def train_step(eng, sampler: RandomWindowSampler, step: int, stop: GracefulStop,
               profile: mfu.FlopsProfileCapture | None = None) -> dict:
    """One optimizer step over this rank's micro-batches; returns rank-agreed statistics.

    A micro-batch whose loss is not finite is not back-propagated (its NaN would spread into
    every gradient under every ZeRO stage); a clean batch's loss times zero stands in, so the
    engine's hooks and gradient accumulation run as usual with an exact zero contribution.
    """
    loss_sum, finite, bad = 0.0, 0, 0
    for micro in range(sampler.grad_accum):
        x, y = (t.to(ds_engine.device()) for t in sampler.micro_batch(step, micro))
        with profile.count(step, x) if profile else contextlib.nullcontext():
            loss = eng(x, y)[1]
        value = loss.item()
        if value == value and abs(value) != float("inf"):
            loss_sum, finite = loss_sum + value, finite + 1
        else:
            bad += 1
            x, y = (t.to(ds_engine.device()) for t in sampler.eval_batch(0))
            loss = eng(x, y)[1] * 0.0
        eng.backward(loss)
        if micro < sampler.grad_accum - 1:
            eng.step()  # DeepSpeed counts micro-steps here; the optimizer steps at the boundary
    total, n_finite, n_bad, n_stop = ds_engine.all_reduce_sum([loss_sum, finite, bad, float(stop.requested)])
    return {"loss": total / n_finite if n_finite else float("nan"), "nonfinite": int(n_bad), "stop": n_stop > 0}


def main(argv: list[str] | None = None) -> int:
    # --- configuration: CLI > --config file > defaults, resolved once against the DeepSpeed JSON
    cfg = parse_args(argv)
    env = ds_engine.init_distributed(cfg.pg_timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    master = rank == 0
    overrides: list[str] = []
    run: RunConfig = resolve(cfg, world_size, cuda=torch.cuda.is_available(), overrides_log=overrides)
    out_dir = Path(cfg.out_dir)
    run_dir.prepare(out_dir, master)

    # --- where the weights come from: a checkpoint to resume, other weights, or GPT-2 init
    resume_from = run_dir.resume_point(cfg.init_from, out_dir)
    init = initial_weights(cfg) if resume_from is None else None
    if resume_from is not None:
        checkpoint.check_resumable(resume_from, world_size, run.zero_stage)
        adopt_model_args(run, resume_from.marker["model_args"], f"checkpoint {out_dir / resume_from.tag}")
    elif init is not None:
        adopt_model_args(run, init.model_args, init.source)
    shape = GPTConfig(**run.model)

    # --- data: nanoGPT's random windows, keyed by (seed, step) so every world size sees the same batch
    files = check_data_dir(cfg.data_dir, shape.block_size, shape.vocab_size)
    samplers = {split: RandomWindowSampler(files[split], split, shape.block_size, shape.vocab_size, cfg.seed,
                                           run.batch.micro, run.batch.grad_accum, world_size, rank)
                for split in ("train", "val")}

    # --- model and engine: the same init on every rank, then DeepSpeed wraps it
    torch.manual_seed(cfg.seed)
    model = GPT(shape)
    if init is not None:
        model.load_state_dict(init.state_dict)
    n_params = model.num_params()  # before ZeRO-3 partitions the parameters and numel() reads 0
    eng = ds_engine.build_engine(model, run)
    if cfg.compile:
        eng.compile()
    iter_num, best_val_loss = 0, float("inf")
    if resume_from is not None:
        client = checkpoint.load(eng, out_dir, resume_from, rank=rank)
        iter_num, best_val_loss = client["iter_num"], client["best_val_loss"]
        samplers["train"].load_state_dict(client["sampler"])
    elif init is not None and init.apply_optimizer is not None:
        iter_num = init.apply_optimizer(eng)

    # --- bookkeeping: config.json, metrics, MFU, signals
    device_name, hosts = ds_engine.device_name(), ds_engine.hostnames(env)
    peak, peak_source = mfu.peak_flops_per_device(device_name, run.dtype, cfg.peak_tflops)
    flops_per_token = mfu.flops_per_token(n_params, shape.n_layer, shape.n_embd, shape.block_size)
    if master:
        run_dir.write_config(out_dir, run, env, hosts, device_name, n_params, peak, peak_source, overrides)
        print(f"{env.launcher}: {world_size} rank(s) on {', '.join(hosts)}; {device_name}; {n_params / 1e6:.2f}M params; "
              f"ZeRO-{run.zero_stage} {run.dtype}; batch {run.batch.micro} x {run.batch.grad_accum} accum x {world_size} "
              f"= {run.batch.global_batch} seqs = {run.tokens_per_iter:,} tokens/iter", flush=True)
        for line in overrides:
            print(f"override {line}", flush=True)
    metrics = MetricsLogger(out_dir, master, eng.monitor)
    profile = mfu.FlopsProfileCapture(eng, profile_step=run.profile_step, output_file=out_dir / mfu.PROFILE_FILE,
                                      n_params=n_params, n_layer=shape.n_layer, n_embd=shape.n_embd, peak_flops=peak)
    stop = GracefulStop().install()
    metrics.log({"event": "start", "iter": iter_num, "world_size": world_size, "launcher": env.launcher,
                 "resumed_from": resume_from.tag if resume_from else None, "init_from": cfg.init_from})

    def save() -> None:
        checkpoint.save(eng, out_dir, iter_num, run_dir.client_state(run, iter_num, best_val_loss, samplers["train"]),
                        run_dir.marker(run, world_size, out_dir), rank=rank, all_reduce_sum=ds_engine.all_reduce_sum,
                        barrier=ds_engine.barrier, keep_last=cfg.keep_last, milestones=cfg.milestone_set(),
                        milestone_every=cfg.milestone_every)

    # --- the loop: eval -> lr -> step -> log -> checkpoint -> signals
    tokens_seen = iter_num * run.tokens_per_iter
    last_saved = iter_num if resume_from is not None else None
    dt_prev = None
    all_bad_in_a_row = 0  # steps in a row where every micro-batch on every rank was non-finite
    while True:
        if iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters or cfg.eval_only:
            losses = evaluate(eng, samplers, cfg.eval_iters)
            best_val_loss = min(best_val_loss, losses["val"])
            metrics.log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                         "tokens": tokens_seen},
                        f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if cfg.eval_only:
                break
        if iter_num >= cfg.max_iters:
            break

        lr = run.lr_at(iter_num)
        t0 = time.perf_counter()
        ds_engine.set_lr(eng, lr)
        stats = train_step(eng, samplers["train"], iter_num, stop, profile)
        all_bad_in_a_row = all_bad_in_a_row + 1 if stats["nonfinite"] == run.batch.grad_accum * world_size else 0
        if stats["nonfinite"]:
            # skip drops a bad batch; a whole global batch bad twice running means the weights went bad
            action = "stop" if cfg.on_nan == "stop" or all_bad_in_a_row > 1 else "skip"
            metrics.log({"event": "nonfinite_loss", "iter": iter_num, "lr": lr, "micro_batches": stats["nonfinite"],
                         "action": action}, f"iter {iter_num}: non-finite loss in {stats['nonfinite']} "
                         f"micro-batch(es) at lr {lr:.3e}: {action}")
            if action == "stop":
                metrics.close()
                raise SystemExit(EXIT_NONFINITE)
            ds_engine.set_lr(eng, 0.0)  # skip: AdamW with lr 0 leaves every parameter exactly as it was
        eng.step()
        iter_num += 1
        tokens_seen += run.tokens_per_iter
        dt = time.perf_counter() - t0
        event = profile.collect(iter_num - 1, step_time_s=dt_prev or dt)
        if event is not None:
            metrics.log(event, f"flops profile: profiler {event['profiler_fwd_flops']:.3e} vs analytic "
                               f"{event['analytic_fwd_flops']:.3e} fwd FLOPs, MFU {event['mfu_profiler']:.2%} "
                               f"vs {event['mfu_analytic']:.2%}")
        dt_prev = dt

        if (iter_num - 1) % cfg.log_interval == 0:
            tokens_per_s = run.tokens_per_iter / dt
            utilisation = mfu.mfu(tokens_per_s, flops_per_token, world_size, peak)
            metrics.log({"iter": iter_num - 1, "loss": stats["loss"], "lr": lr, "tokens": tokens_seen,
                         "dt_ms": dt * 1000, "tokens_per_s": tokens_per_s, "mfu": utilisation,
                         "peak_mem_mb": ds_engine.peak_memory_mb()},
                        f"iter {iter_num - 1}: loss {stats['loss']:.4f}, time {dt * 1000:.2f}ms, mfu {utilisation * 100:.2f}%")
        if iter_num % cfg.checkpoint_interval == 0 or stats["stop"]:
            save()
            last_saved = iter_num
        if stats["stop"]:
            stop.stand_down()
            if master:
                print(f"stopped by {stop.signal_name or 'a signal on another rank'} after iteration {iter_num - 1}; "
                      f"checkpoint {checkpoint.tag_for(iter_num)} saved; exit {EXIT_REQUEUE} (requeue)", flush=True)
            metrics.close()
            return EXIT_REQUEUE

    if last_saved != iter_num and not cfg.eval_only:
        save()
    metrics.close()
    profile.close()
    return EXIT_OK


def guarded_main(argv: list[str] | None = None) -> int:
    """main(), with a dead or stuck peer rank reported as one line and EXIT_PEER_FAILED, not a hang or a traceback."""
    try:
        code = main(argv)
    except RuntimeError as err:
        if not ds_engine.is_peer_failure(err):
            raise
        rank = dist.get_rank() if dist.is_initialized() else "?"
        print(f"ds_gpt.train: error: rank {rank}: a peer rank failed or a collective timed out "
              f"(--pg_timeout): {str(err).splitlines()[0][:300]}", file=sys.stderr, flush=True)
        return EXIT_PEER_FAILED  # the group is broken: no orderly shutdown to attempt
    except (UserError, SystemExit):
        ds_engine.shutdown()
        raise
    ds_engine.shutdown()
    return code


if __name__ == "__main__":
    run_cli(guarded_main, prog="ds_gpt.train", skip_teardown=True)
