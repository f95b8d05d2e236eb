"""Activation checkpointing: its modes, and the FLOPs that recomputing activations adds.

    --activation_checkpointing none   keep every block's activations for the backward pass
    --activation_checkpointing full   keep only each block's input; recompute the block in backward

Full checkpointing trades one extra forward pass for memory: a block's internals (attention
inputs, the 4d-wide MLP activations, layer norms) are freed after its forward and rebuilt when
its backward needs them, so activation memory falls from ~L blocks' worth to L block inputs
plus one block's internals. The model's FLOPs do not change, so MFU does not either; the
hardware does the forward twice, which HFU (hardware FLOPs utilization) counts. The model
applies the mode (ds_gpt.model.GPT); this module is arithmetic and imports no torch.
"""
from __future__ import annotations

from ds_gpt.mfu import flops_per_token, fwd_flops_per_token

# "selective" (recompute attention only, as Megatron-LM does) would be the next mode here.
MODES = ("none", "full")

# Extra forward passes per training step that each mode makes the hardware run.
RECOMPUTED_FORWARDS = {"none": 0, "full": 1}


def hardware_flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int,
                             activation_checkpointing: str, *, vocab_size: int | None = None) -> float:
    """FLOPs the hardware runs per trained token, recomputation included (HFU's numerator).

    Model FLOPs (6N + 12·L·T·d, ds_gpt.mfu.flops_per_token) plus one forward of the blocks per
    recomputed pass. Without `vocab_size` that forward is the whole model's, 2N + 4·L·T·d, so
    full checkpointing gives 8N + 16·L·T·d. The output head sits outside the checkpointed
    blocks and is never recomputed: give `vocab_size` and its matmul (2·V·d per token, ~8% of
    8N for GPT-2 124M) is left out of the extra forward, the exact count (Megatron-LM's too).
    HFU = hardware_flops_per_token / flops_per_token x MFU.
    """
    if activation_checkpointing not in RECOMPUTED_FORWARDS:
        raise ValueError(f"activation_checkpointing must be one of {', '.join(MODES)}, "
                         f"got {activation_checkpointing!r}")
    recomputed_params = n_params - (vocab_size or 0) * n_embd
    extra = RECOMPUTED_FORWARDS[activation_checkpointing] * fwd_flops_per_token(
        recomputed_params, n_layer, n_embd, block_size)
    return flops_per_token(n_params, n_layer, n_embd, block_size) + extra
