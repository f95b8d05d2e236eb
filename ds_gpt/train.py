"""Train GPT-2 with DeepSpeed: nanoGPT's recipe, configured by a DeepSpeed JSON.

The reference run's GPT-2 124M (8 x A100, 2 nodes), with the deepspeed launcher:
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # started as a file by a launcher: import the package, not siblings
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
import torch.distributed as dist

from ds_gpt import collectives, elastic, mfu, run_dir
from ds_gpt import engine as ds_engine
from ds_gpt.accounting import state_bytes_per_rank
from ds_gpt.checkpoint import Checkpointer, TrainState, load
from ds_gpt.data import BatchPrefetcher, RandomWindowSampler
from ds_gpt.errors import EXIT_NONFINITE, EXIT_OK, EXIT_PEER_FAILED, EXIT_REQUEUE, UserError, run_cli
from ds_gpt.flops_profile import PROFILE_FILE, FlopsProfileCapture
from ds_gpt.metrics import MetricsLogger
from ds_gpt.model import GPT
from ds_gpt.nonfinite import NonFiniteGuard
from ds_gpt.optimizer_state import apply_nanogpt_optimizer_state
from ds_gpt.recompute import hardware_flops_per_token
from ds_gpt.signals import GracefulStop
from ds_gpt.startup import Startup, build_run
from ds_gpt.tracking import WandbRun


@torch.no_grad()
def evaluate(eng, samplers: dict[str, RandomWindowSampler], eval_iters: int) -> dict[str, float]:
    """Mean loss per split over `eval_iters` batches on every rank, averaged over ranks."""
    eng.eval()
    out = {}
    for split, sampler in samplers.items():
        total = torch.zeros((), dtype=torch.float64, device=ds_engine.device())
        for k in range(eval_iters):
            x, y = (t.to(ds_engine.device()) for t in sampler.eval_batch(k))
            total += eng(x, y)[1]
        summed, ranks = collectives.all_reduce_sum(torch.stack([total / eval_iters, torch.ones_like(total)]))
        out[split] = summed / ranks
    eng.train()
    return out


@dataclass
class StepResult:
    loss: float  # mean over the global batch's finite micro-batches
    nonfinite: int  # micro-batches, all ranks, whose loss was NaN/inf
    action: str  # "ok", or the guard's "skip" / "stop"
    stop_requested: bool  # a signal reached some rank: checkpoint and exit


def train_step(eng, batches: BatchPrefetcher, step: int, guard: NonFiniteGuard, stop: GracefulStop,
               profile: FlopsProfileCapture, before_update: Callable[[int], None] | None = None) -> StepResult:
    """One optimizer step over this rank's micro-batches, with one device-to-host sync.

    The losses and the non-finite count stay on the device until the step's one all-reduce, which
    also shares the stop flag, so every rank decides the same. The guard keeps a non-finite
    micro-batch's gradient out of the step (see ds_gpt.nonfinite). `before_update(step)` runs
    once the gradients are complete, right before the optimizer steps.
    """
    grad_accum = batches.sampler.grad_accum
    losses = []
    for micro, (x, y) in enumerate(batches.batches(step)):  # read ahead while the model computes
        with profile.count(step, x):
            loss = eng(x, y)[1]
        guard.mark(loss)
        losses.append(loss.detach())
        eng.backward(loss)
        if micro < grad_accum - 1:
            eng.step()  # DeepSpeed counts micro-steps here; the optimizer steps at the boundary
    # Checked once per step, not per micro-batch: on a GPU each check is a kernel launch.
    losses_fp64 = torch.stack(losses).double()
    finite = torch.isfinite(losses_fp64)
    # A fill, not torch.tensor(): copying a host value to a GPU would wait for the backward to finish.
    stop_flag = torch.full((), float(stop.requested), dtype=torch.float64, device=losses_fp64.device)
    total, n_bad, n_stop = collectives.all_reduce_sum(
        torch.stack([torch.where(finite, losses_fp64, 0.0).sum(), (~finite).sum(dtype=torch.float64), stop_flag]))
    n_finite = guard.micro_batches_per_step - n_bad
    action = guard.decide(int(n_bad))
    if action == "skip":
        ds_engine.set_lr(eng, 0.0)  # AdamW (and Muon) with lr 0 leave every parameter exactly as it was
    if action != "stop":
        if before_update is not None:
            before_update(step)
        eng.step()
    return StepResult(total / n_finite if n_finite else float("nan"), int(n_bad), action, n_stop > 0)


def main(argv: list[str] | None = None) -> int:
    # --- signals first: a stop at any moment of start-up ends in exit 75 with the lock released (ds_gpt.signals)
    stop = GracefulStop().install()
    # --- the run: options, launcher, DeepSpeed JSON, resume point, data; checked before any rendezvous
    start = build_run(argv)
    try:
        return train(start, stop)
    except Exception as err:
        if stop.interrupted_start_up(err, prog="ds_gpt.train"):
            return EXIT_REQUEUE
        raise
    finally:
        start.release()


def train(start: Startup, stop: GracefulStop) -> int:
    cfg, run, out_dir, shape = start.cfg, start.run, start.out_dir, start.shape

    # --- process group, then data: nanoGPT's random windows keyed by (seed, step): every world size, one batch
    env = ds_engine.init_distributed(cfg.pg_timeout, start.env)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    master = rank == 0
    samplers = {split: RandomWindowSampler(start.data[split], split, shape.block_size, shape.vocab_size, cfg.seed,
                                           run.batch.micro, run.batch.grad_accum, world_size, rank)
                for split in ("train", "val")}

    # --- model and engine: the same init on every rank, then DeepSpeed wraps it
    torch.manual_seed(cfg.seed)
    model = GPT(shape, activation_checkpointing=cfg.activation_checkpointing)
    if start.init is not None:
        model.load_state_dict(start.init.state_dict)
    n_params = model.num_params()  # before ZeRO-3 partitions the parameters and numel() reads 0
    eng = ds_engine.build_engine(model, run)
    if cfg.compile:
        eng.compile()
    state = TrainState()
    if start.resume_from is not None:
        client = load(eng, out_dir, start.resume_from, rank=rank)
        state.load_state_dict(client, run.tokens_per_iter)
        samplers["train"].load_state_dict(client["sampler"])
    elif start.init is not None and start.init.optimizer_state is not None:  # --resume_optimizer
        apply_nanogpt_optimizer_state(eng.optimizer, eng.module, start.init.optimizer_state)
        state.iter_num = start.init.iter_num
        state.tokens_seen = state.iter_num * run.tokens_per_iter
    if stop.before_first_step(collectives.all_reduce_sum, announce=master):  # a signal during start-up
        return EXIT_REQUEUE

    # --- bookkeeping: config.json, metrics, MFU, checkpoints
    device_name, hosts = ds_engine.device_name(), ds_engine.hostnames(env)
    peak, peak_source = mfu.peak_flops_per_device(device_name, run.dtype, cfg.peak_tflops)
    flops_per_token = mfu.flops_per_token(n_params, shape.n_layer, shape.n_embd, shape.block_size)
    hardware_flops = hardware_flops_per_token(n_params, shape.n_layer, shape.n_embd, shape.block_size,
                                              cfg.activation_checkpointing, vocab_size=shape.vocab_size)
    if master:
        run_dir.write_config(out_dir, run, env, hosts, device_name, n_params, peak, peak_source, start.overrides)
        print(run_dir.summary(run, env, hosts, device_name, n_params), flush=True)
        for line in start.overrides:
            print(f"override {line}", flush=True)
    tracker = (WandbRun(out_dir, cfg.wandb_project, cfg.wandb_run_name, run.to_dict())
               if master and cfg.wandb_log else None)
    metrics = MetricsLogger(out_dir, master, eng.monitor, tokens_per_iter=run.tokens_per_iter,
                            mfu_of=lambda tokens_per_s: mfu.mfu(tokens_per_s, flops_per_token, world_size, peak),
                            hfu_per_mfu=hardware_flops / flops_per_token, wandb=tracker)
    profile = FlopsProfileCapture(eng, profile_step=run.profile_step, output_file=out_dir / PROFILE_FILE,
                                  n_params=n_params, n_layer=shape.n_layer, n_embd=shape.n_embd, peak_flops=peak)
    checkpointer = Checkpointer(
        eng, out_dir, rank=rank, world_size=world_size, collectives=collectives.of_process_group(),
        interval=cfg.checkpoint_interval, keep_last=cfg.keep_last, milestones=cfg.milestone_set(),
        milestone_every=cfg.milestone_every, marker=run_dir.marker(run, world_size, out_dir),
        client_state=lambda: run_dir.client_state(run, state, samplers["train"]),
        saved_at=state.iter_num if start.resume_from is not None else None)
    memory_at = state.iter_num + 1  # AdamW's state exists from a run's second step on

    def log_memory(step: int) -> None:
        if step == memory_at:  # every rank measures its own; rank 0 logs them all
            metrics.memory(step, collectives.all_gather_object(state_bytes_per_rank(eng)))

    guard = NonFiniteGuard(cfg.on_nan, micro_batches_per_step=run.batch.grad_accum * world_size, model=eng.module)
    metrics.start(iter=state.iter_num, world_size=world_size, launcher=env.launcher, init_from=cfg.init_from,
                  resumed_from=start.resume_from.tag if start.resume_from else None)
    if start.resume_from is not None:  # what this resume changed: the layout, the global batch
        for event in elastic.resume_events(start.resume_from.tag, start.resume_from.marker, client,
                                           elastic.Layout.of_engine(eng), run.batch.global_batch, state.iter_num):
            metrics.log(event)

    # --- the loop: eval -> checkpoint -> lr -> step -> log -> stop
    batches = BatchPrefetcher(samplers["train"], ds_engine.device())
    with contextlib.closing(metrics), contextlib.closing(profile), batches:
        while True:
            if cfg.eval_due(state.iter_num):
                losses = evaluate(eng, samplers, cfg.eval_iters)
                state.best_val_loss = min(state.best_val_loss, losses["val"])
                metrics.eval(state.iter_num, losses, state.tokens_seen)
            if start.hellaswag is not None and start.hellaswag.due(state.iter_num):
                metrics.hellaswag(state.iter_num, state.tokens_seen, start.hellaswag.score(eng))
            if cfg.eval_only:
                return EXIT_OK
            checkpointer.maybe_save(state.iter_num)  # after the eval: the checkpoint's best_val_loss counts it
            if state.iter_num >= cfg.max_iters:
                break

            lr = run.lr_at(state.iter_num)
            t0 = time.perf_counter()
            ds_engine.set_lr(eng, run.side_lrs(lr))
            result = train_step(eng, batches, state.iter_num, guard, stop, profile, log_memory)
            if result.action != "ok":
                metrics.nonfinite(state.iter_num, lr=lr, micro_batches=result.nonfinite, action=result.action)
            if result.action == "stop":
                return EXIT_NONFINITE
            dt = time.perf_counter() - t0
            state.tokens_seen += run.tokens_per_iter
            if (event := profile.step_done(state.iter_num, dt)) is not None:
                metrics.profile(event)
            if state.iter_num % cfg.log_interval == 0:
                metrics.train(state.iter_num, loss=result.loss, lr=lr, tokens=state.tokens_seen, dt_s=dt,
                              peak_mem_mb=ds_engine.peak_memory_mb())
            state.iter_num += 1

            if result.stop_requested:
                checkpointer.save(state.iter_num)  # at once, no eval first: the resumed run evaluates it
                stop.stand_down()
                metrics.stopped(state.iter_num, signal=stop.signal_name, exit_code=EXIT_REQUEUE)
                return EXIT_REQUEUE
        checkpointer.save_final(state.iter_num)
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
