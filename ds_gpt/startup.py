"""Building a run: everything a rank can check on its own, before it joins the process group.

Options, launcher environment, the resolved DeepSpeed JSON, the checkpoint to resume (verified)
or the weights to start from, and the data files. Every rank does the same checks on the same
inputs and reaches the same verdict, so a bad input is one error line per rank within a second
or two, not a rendezvous on every node first. Nothing here imports DeepSpeed or creates a
process group; the run directory is created only once every input has passed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_gpt import launch_env, run_dir, tracking
from ds_gpt.checkpoint import CheckpointInfo, check_resumable, print_warning
from ds_gpt.config import TrainConfig, parse_args
from ds_gpt.data import TokenFile, check_data_dir
from ds_gpt.hellaswag_eval import HellaSwagEval
from ds_gpt.init_weights import initial_weights
from ds_gpt.interop import StartWeights
from ds_gpt.launch_env import LaunchEnv
from ds_gpt.model import GPTConfig
from ds_gpt.run_config import RunConfig, adopt_model_args, resolve
from ds_gpt.run_lock import RunLock, this_launch


@dataclass
class Startup:
    """A run whose inputs have all been checked; ds_gpt.train runs it."""

    cfg: TrainConfig
    env: LaunchEnv
    run: RunConfig
    out_dir: Path
    resume_from: CheckpointInfo | None  # the newest checkpoint that verifies, for resume/auto
    init: StartWeights | None  # other weights to start from (--init_from weights:/nanogpt:/gpt2/HF)
    data: dict[str, TokenFile]  # "train", "val"
    overrides: list[str]  # what the CLI changed in the DeepSpeed JSON, for the log and config.json
    hellaswag: HellaSwagEval | None  # --hellaswag_interval: the set, checked; None when off
    lock: RunLock | None  # rank 0's hold on out_dir, released when the run ends
    created_out_dir: bool = False  # this start made out_dir: a start that wrote nothing there removes it

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.created_out_dir:
            with contextlib.suppress(OSError):  # not empty (the run wrote something), or another rank's
                self.out_dir.rmdir()

    @property
    def shape(self) -> GPTConfig:
        return GPTConfig(**self.run.model)


def build_run(argv: list[str] | None = None) -> Startup:
    """Parse, detect the launcher, resolve, find the resume point or weights, check the data."""
    cfg = parse_args(argv)
    env = launch_env.detect()
    overrides: list[str] = []
    run = resolve(cfg, env.world_size, cuda=torch.cuda.is_available(), overrides_log=overrides)
    out_dir = Path(cfg.out_dir)
    warn = print_warning if env.rank == 0 else (lambda message: None)  # one warning line per run, not per rank

    resume_from = run_dir.resume_point(cfg.init_from, out_dir, warn)
    init = None
    if resume_from is not None:
        check_resumable(resume_from, run)
        adopt_model_args(run, resume_from.marker["model_args"], f"checkpoint {out_dir / resume_from.tag}")
    else:
        init = initial_weights(cfg)
        if init is not None:
            adopt_model_args(run, init.model_args, init.source)
    if cfg.wandb_log:
        tracking.check_available()
    shape = GPTConfig(**run.model)
    data = check_data_dir(cfg.data_dir, shape.block_size, shape.vocab_size)
    hellaswag = HellaSwagEval.for_run(cfg, shape, run.batch.micro, env.rank, env.world_size)
    created = not out_dir.exists()
    run_dir.prepare(out_dir)
    lock = RunLock(out_dir, this_launch(env)).acquire(warn) if env.rank == 0 else None
    return Startup(cfg, env, run, out_dir, resume_from, init, data, overrides, hellaswag, lock, created)
