"""What a fresh run's weights start from, per --init_from (resume is the checkpoint module's job).

scratch            GPT-2 init (model.py)
weights:DIR[/TAG]  consolidated fp32 weights of a ds_gpt checkpoint, fresh optimizer
                   (the way to change world size or ZeRO stage mid-run)
nanogpt:PATH       a nanoGPT ckpt.pt; with --resume_optimizer also its AdamW state and iteration
gpt2*, HF dir      OpenAI GPT-2 / a Hugging Face GPT2LMHeadModel (ds_gpt.interop)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ds_gpt import checkpoint
from ds_gpt.config import TrainConfig
from ds_gpt.errors import UserError


@dataclass
class StartWeights:
    model_args: dict  # the source's shape; the run adopts it (run_config.adopt_model_args)
    state_dict: dict[str, torch.Tensor]
    source: str
    apply_optimizer: Callable | None = None  # engine -> iter_num, for --resume_optimizer


def _from_run_dir(spec: str) -> StartWeights:
    path = Path(spec)
    out_dir, tag = (path.parent, path.name) if checkpoint.iter_of(path.name) is not None else (path, None)
    state_dict, client = checkpoint.load_fp32_state_dict(out_dir, tag)
    return StartWeights(client["model_args"], state_dict, f"weights:{spec}")


def initial_weights(cfg: TrainConfig) -> StartWeights | None:
    spec = cfg.init_from
    if spec in ("scratch", "resume", "auto"):  # resume/auto reach here only when there is nothing to resume
        return None
    if spec.startswith("weights:"):
        return _from_run_dir(spec.removeprefix("weights:"))
    from ds_gpt import interop  # transformers stays optional: imported only for these sources

    loaded = interop.load_init_weights(spec, vocab_size=cfg.vocab_size)
    if not cfg.resume_optimizer:
        return StartWeights(loaded.model_args, loaded.state_dict, loaded.source or spec)
    if loaded.optimizer_state is None:
        raise UserError(f"--resume_optimizer: {spec} holds no optimizer state")

    def apply_optimizer(eng) -> int:
        interop.apply_nanogpt_optimizer_state(eng.optimizer, eng.module, loaded.optimizer_state)
        return loaded.iter_num
    return StartWeights(loaded.model_args, loaded.state_dict, loaded.source or spec, apply_optimizer)
