"""GPT-2's four sizes, the one table of their shapes.

    python -m ds_gpt.train --model 350M ...        # or --model gpt2-medium
    python -m ds_gpt.plan --model 1558M ...

The shapes are those of OpenAI's released checkpoints, as nanoGPT's `from_pretrained` has
them; the names after the arrows are the Hugging Face model ids of the same checkpoints.
The trainer (ds_gpt.config) and the planner (ds_gpt.plan) both read this table, and it imports
neither torch nor deepspeed so that the planner stays pure arithmetic.
"""
from __future__ import annotations

from typing import NamedTuple

from ds_gpt.errors import UserError

GPT2_VOCAB_SIZE = 50257  # GPT-2's BPE ids; <|endoftext|> is the last, 50256
PADDED_VOCAB_SIZE = 50304  # the same padded up to a multiple of 64, for faster matmuls (nanoGPT's choice)


class Shape(NamedTuple):
    n_layer: int
    n_head: int
    n_embd: int


MODELS: dict[str, Shape] = {
    "124M": Shape(n_layer=12, n_head=12, n_embd=768),
    "350M": Shape(n_layer=24, n_head=16, n_embd=1024),
    "774M": Shape(n_layer=36, n_head=20, n_embd=1280),
    "1558M": Shape(n_layer=48, n_head=25, n_embd=1600),
}
ALIASES = {"gpt2": "124M", "gpt2-medium": "350M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
CHOICES = (*MODELS, *ALIASES)  # every name --model accepts


def canonical(name: str) -> str:
    """'gpt2-medium' -> '350M'; '350M' -> '350M'. Matching ignores case ('350m', 'GPT2-XL')."""
    by_lower = {**{n.lower(): n for n in MODELS}, **ALIASES}
    key = str(name).strip().lower()
    if key not in by_lower:
        raise UserError(f"--model {name!r} is not a GPT-2 size: choose one of {', '.join(MODELS)} "
                        f"(or {', '.join(ALIASES)})")
    return by_lower[key]


def shape(name: str) -> Shape:
    """The (n_layer, n_head, n_embd) of a preset name or alias."""
    return MODELS[canonical(name)]
