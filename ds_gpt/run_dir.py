"""The run directory OUT/: its set-up, config.json, and what a checkpoint records about the run."""
from __future__ import annotations

import json
import os
import platform
import sys
import uuid
from pathlib import Path
from typing import Callable

from ds_gpt import __version__, atomic, checkpoint, elastic
from ds_gpt.checkpoint import CheckpointInfo, TrainState
from ds_gpt.errors import UserError, write_hint
from ds_gpt.launch_env import LaunchEnv
from ds_gpt.run_config import RunConfig


def prepare(out_dir: Path) -> None:
    """Create OUT and prove it writable on every rank (a read-only or foreign dir fails here, not at the first save).

    Every rank creates it (exist_ok): the ranks have no process group yet to wait for rank 0 with.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_probe_{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"out_dir {out_dir} is not writable ({err.strerror})",
                        hint="pass a writable --out_dir") from None


def resume_point(init_from: str, out_dir: Path, warn: Callable[[str], None]) -> CheckpointInfo | None:
    """The checkpoint to continue from, per --init_from (resume: required; auto: if any).

    Starting afresh in a directory that holds checkpoints is refused: the old run's higher
    iteration numbers would count as newest, and retention would prune the new run's saves.
    """
    info = checkpoint.find_latest(out_dir, warn)
    if init_from not in ("resume", "auto"):
        if info is not None:
            raise UserError(f"{out_dir} already holds checkpoints (newest {info.tag}) and --init_from {init_from} "
                            "would start a new run over them", hint="continue it with --init_from resume (or auto), "
                            "or pass a new --out_dir")
        return None
    if info is None and init_from == "resume":
        raise UserError(f"--init_from resume: no complete checkpoint in {out_dir}",
                        hint="use --init_from scratch to start, or --init_from auto to resume when possible")
    return info


def versions() -> dict:
    import deepspeed
    import torch

    return {"ds_gpt": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "python": sys.version.split()[0], "cuda": torch.version.cuda, "platform": platform.platform()}


def summary(run: RunConfig, env: LaunchEnv, hosts: list[str], device: str, n_params: int) -> str:
    """The run in one console line: who, where, what, and the batch arithmetic."""
    b = run.batch
    return (f"{env.launcher}: {env.world_size} rank(s) on {', '.join(hosts)}; {device}; {n_params / 1e6:.2f}M params; "
            f"ZeRO-{run.zero_stage} {run.dtype}; batch {b.micro} x {b.grad_accum} accum x {env.world_size} "
            f"= {b.global_batch} seqs = {run.tokens_per_iter:,} tokens/iter")


def write_config(out_dir: Path, run: RunConfig, env: LaunchEnv, hosts: list[str], device: str, n_params: int,
                 peak_flops: float, peak_source: str, overrides: list[str]) -> None:
    """OUT/config.json: the effective configuration of this (re)start, for people and for report.py."""
    doc = {**run.to_dict(), "world_size": env.world_size, "launcher": env.launcher, "hosts": hosts,
           "launch_env": env.to_dict(), "device": device, "n_params": n_params,
           "peak_flops_per_device": peak_flops, "peak_source": peak_source, "overrides": overrides,
           "argv": sys.argv, "versions": versions()}
    try:
        atomic.write_text(out_dir / "config.json", json.dumps(doc, indent=2, default=str))
    except OSError as err:
        raise UserError(f"cannot write {out_dir / 'config.json'}: {err.strerror}",
                        hint=write_hint(err, "free space under --out_dir (or move it), then start again")) from None


def client_state(run: RunConfig, state: TrainState, sampler) -> dict:
    """What DeepSpeed stores beside the weights (rank 0's copy; RNG is saved per rank)."""
    return {**state.state_dict(), "model_args": run.model, "config": run.to_dict(), "sampler": sampler.state_dict()}


def marker(run: RunConfig, world_size: int, out_dir: Path) -> dict:
    """Written once every rank has saved; what resume checks before building anything."""
    return {"model_args": run.model, "world_size": world_size, "zero_stage": run.zero_stage,
            "dtype": run.dtype, "tokenizer": elastic.tokenizer_of(run.train.data_dir), "out_dir": str(out_dir),
            "pid": os.getpid()}
