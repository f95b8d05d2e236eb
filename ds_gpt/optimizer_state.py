"""nanoGPT's AdamW state in and out of DeepSpeed's optimizers, by parameter name.

Kept apart from the weight conversions in ds_gpt.interop because it reaches into DeepSpeed's
optimizer internals (flat fp32 partitions, the fragment API), which change between releases.

nanoGPT's configure_optimizers builds two groups from model.named_parameters() (tied lm_head
counted once, as transformer.wte.weight): decay = every tensor with dim >= 2, then no_decay =
the rest, each in named_parameters order. torch numbers the parameters 0..N-1 across the groups
in that order, so index i of the saved state is the i-th name of nanogpt_param_names(model).
Our GPT registers its modules in nanoGPT's order, so the names are the same.
"""
from __future__ import annotations

import torch

from ds_gpt.errors import UserError


def nanogpt_param_names(model: torch.nn.Module) -> list[str]:
    """Parameter names in the order of nanoGPT's optimizer state indices."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]


def _nanogpt_moments(model: torch.nn.Module, state: dict) -> tuple[dict[str, dict], float]:
    """{name: {exp_avg, exp_avg_sq}} and the shared step count, checked against the model."""
    names = nanogpt_param_names(model)
    groups = state.get("param_groups", [])
    indices = [i for g in groups for i in g["params"]]
    n_decay = sum(1 for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2)
    if len(indices) != len(names) or len(groups) != 2 or len(groups[0]["params"]) != n_decay:
        sizes = [len(g["params"]) for g in groups]
        raise UserError(f"nanoGPT optimizer state has groups of {sizes} parameters; this model needs "
                        f"[{n_decay}, {len(names) - n_decay}] (decay, no_decay)")
    params = dict(model.named_parameters())
    moments, steps = {}, set()
    for name, idx in zip(names, indices, strict=True):
        s = state["state"].get(idx) or state["state"].get(str(idx))
        if s is None:
            continue  # never stepped: fresh moments
        if s["exp_avg"].shape != params[name].shape:
            raise UserError(f"nanoGPT optimizer state for {name} has shape {tuple(s['exp_avg'].shape)}, "
                            f"the parameter {tuple(params[name].shape)}")
        moments[name] = {"exp_avg": s["exp_avg"].float(), "exp_avg_sq": s["exp_avg_sq"].float()}
        steps.add(float(s["step"]))
    if len(steps) > 1:
        raise UserError(f"nanoGPT optimizer state has differing step counts {sorted(steps)}")
    if moments and len(moments) != len(names):
        raise UserError("nanoGPT optimizer state covers only some parameters")
    return moments, steps.pop() if steps else 0.0


def apply_nanogpt_optimizer_state(optimizer, model: torch.nn.Module, nanogpt_optimizer_state: dict) -> None:
    """Load nanoGPT's AdamW moments and step count into `optimizer`, by parameter name.

    `optimizer` is a torch optimizer over `model`'s own parameters, or DeepSpeed's
    engine.optimizer after deepspeed.initialize: at ZeRO-0 that is the torch optimizer itself
    (fp32) or an fp16/bf16 wrapper with per-parameter fp32 masters; at ZeRO-1/2 (and with
    DeepSpeed's BF16_Optimizer) the fp32 master partitions are filled through DeepSpeed's
    fragment API, so each rank sets its own slice. ZeRO-3 is refused. Learning rate and betas
    stay the optimizer's own: the run's schedule owns them.
    """
    moments, step = _nanogpt_moments(model, nanogpt_optimizer_state)
    if not moments:
        return
    name_of = {id(p): n for n, p in model.named_parameters()}
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise UserError("--resume_optimizer is not supported with ZeRO stage 3",
                        hint="use a ZeRO stage 0-2 ds_config for the first run, or drop --resume_optimizer")
    flats = getattr(optimizer, "single_partition_of_fp32_groups", None) or \
        getattr(optimizer, "fp32_groups_flat_partition", None)
    if flats is not None:  # DeepSpeed: the base optimizer steps flat fp32 partitions
        from deepspeed.utils import safe_set_full_optimizer_state
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        base = optimizer.optimizer
        for i, flat in enumerate(flats):
            st = base.state[flat]  # empty until the first step: create it, then link the fragments
            st["step"] = torch.tensor(step, dtype=torch.float32, device=_step_device(flat, base.param_groups[i]))
            st.setdefault("exp_avg", torch.zeros_like(flat))
            st.setdefault("exp_avg_sq", torch.zeros_like(flat))
            lp_group = (optimizer.bit16_groups if hasattr(optimizer, "bit16_groups") else optimizer.bf16_groups)[i]
            lazy_init_hp_params_optimizer_state(lp_group, flat, base.state)
        for name, p in model.named_parameters():
            if name in moments:
                for key, value in moments[name].items():
                    safe_set_full_optimizer_state(p, value.to(p.device), key)
        return
    base = optimizer
    if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):
        # DeepSpeed's unfused fp16/bf16 optimizer (ZeRO-0): one fp32 master copy per parameter.
        base = optimizer.optimizer
        for lp_group, hp_group in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True):
            name_of.update({id(hp): name_of[id(lp)] for lp, hp in zip(lp_group, hp_group, strict=True)})
    for group in base.param_groups:
        for p in group["params"]:
            name = name_of.get(id(p))
            if name is None:
                raise UserError("the optimizer holds parameters that are not the model's "
                                "(build it over model.parameters(), or pass DeepSpeed's engine.optimizer)")
            base.state[p] = {
                "step": torch.tensor(step, dtype=torch.float32, device=_step_device(p, group)),
                "exp_avg": moments[name]["exp_avg"].to(p.device, p.dtype).clone(),
                "exp_avg_sq": moments[name]["exp_avg_sq"].to(p.device, p.dtype).clone(),
            }


def _step_device(p: torch.Tensor, group: dict) -> torch.device:
    # torch's Adam keeps `step` on the CPU unless the fused or capturable kernels read it on device.
    return p.device if group.get("fused") or group.get("capturable") else torch.device("cpu")


def nanogpt_optimizer_state_from(model: torch.nn.Module, *, learning_rate: float = 6e-4,
                                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95)) -> dict:
    """A fresh AdamW state_dict in nanoGPT's layout (two groups, no moments yet).

    Exports carry this rather than the trained moments (ZeRO keeps them partitioned and
    ds_gpt.checkpoint consolidates weights only): nanoGPT's `init_from='resume'` then loads the
    checkpoint and restarts Adam's moments from zero at the saved iter_num.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas).state_dict()
