"""What a fresh run's weights start from, per --init_from (resume is the checkpoint module's job).

scratch            GPT-2 init (model.py)
weights:DIR[/TAG]  consolidated fp32 weights of a ds_gpt checkpoint, fresh optimizer: a new run
                   from old weights (a resume on another layout keeps the optimizer: --init_from resume)
nanogpt:PATH       a nanoGPT ckpt.pt; with --resume_optimizer also its AdamW state and iteration
gpt2*, HF dir      OpenAI GPT-2 / a Hugging Face GPT2LMHeadModel (ds_gpt.interop)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ds_gpt import checkpoint, interop
from ds_gpt.config import TrainConfig
from ds_gpt.errors import UserError
from ds_gpt.interop import StartWeights


def _from_run_dir(spec: str) -> StartWeights:
    path = Path(spec)
    out_dir, tag = (path.parent, path.name) if checkpoint.iter_of(path.name) is not None else (path, None)
    state_dict, client = checkpoint.load_fp32_state_dict(out_dir, tag)
    return StartWeights(client["model_args"], state_dict, f"weights:{spec}")


def initial_weights(cfg: TrainConfig) -> StartWeights | None:
    """The weights --init_from names, or None for GPT-2's own init. The optimizer state and the
    iteration count come along only with --resume_optimizer."""
    spec = cfg.init_from
    if spec in ("scratch", "resume", "auto"):  # resume/auto reach here only when there is nothing to resume
        return None
    if spec.startswith("weights:"):
        return _from_run_dir(spec.removeprefix("weights:"))
    loaded = interop.load_init_weights(spec, vocab_size=cfg.vocab_size)
    if not cfg.resume_optimizer:
        return dataclasses.replace(loaded, iter_num=0, optimizer_state=None, best_val_loss=None)
    if loaded.optimizer_state is None:
        raise UserError(f"--resume_optimizer: {spec} holds no optimizer state")
    return loaded
