"""DeepSpeed's Muon as a ds_gpt run uses it: the JSON's per-side settings, what is refused, Newton-Schulz's cost.

`"optimizer": {"type": "Muon"}` builds DeepSpeed's MuonWithAuxAdam: Newton-Schulz-orthogonalized
momentum for the hidden matrices (the "Muon side"), AdamW for everything else (the "AdamW side":
the tied token embedding / output head, the position embedding, every gain and bias). Which
parameter goes where is the model's knowledge (GPT.muon_matrices); the tagging DeepSpeed needs
is done by ds_gpt.engine. This module reads the JSON and knows nothing of torch.

Per-side keys, resolved most-specific-first as DeepSpeed resolves the learning rates:
`muon_lr` / `adam_lr` over `lr` (DeepSpeed's own keys), and `muon_weight_decay` /
`adam_weight_decay` over `weight_decay` (ours: DeepSpeed has one weight decay for both sides, so
ds_gpt passes each side's as a parameter-group setting). `momentum` is Muon's, `betas`/`eps` AdamW's.
"""
from __future__ import annotations

from ds_gpt.errors import UserError

# Everything DeepSpeed's Muon (0.19) reads from optimizer.params, plus our per-side weight decays.
# It drops any other key without a word, so a typo ("momentom") would silently keep the default.
KNOWN_PARAMS = frozenset("""
lr muon_lr adam_lr momentum betas eps weight_decay muon_weight_decay adam_weight_decay ns_method
torch_adam adam_w_mode fp32_optimizer_states per_head_muon
""".split())
NS_METHODS = ("gram", "standard")
NS_STEPS = 5  # DeepSpeed's muon_update default


def sides(params: dict) -> dict[str, dict[str, float]]:
    """Each side's peak lr and weight decay from the JSON's optimizer.params: {"muon": {...}, "adam": {...}}."""
    def pick(side: str, key: str, default: float | None) -> float:
        value = params.get(f"{side}_{key}", params.get(key, default))
        if value is None:
            raise UserError(f"optimizer.params: Muon needs {side}_{key} or {key}",
                            hint="see ds_configs/zero1_muon.json")
        return float(value)

    return {side: {"lr": pick(side, "lr", None), "weight_decay": pick(side, "weight_decay", 0.0)}
            for side in ("muon", "adam")}


def overrides(params: dict, learning_rate: float | None, weight_decay: float | None) -> dict[str, float]:
    """The optimizer.params keys --learning_rate and --weight_decay change, with their new values.

    --learning_rate sets the Muon side's peak, and the AdamW side keeps the JSON's ratio to it, so
    one flag moves (and sweeps) the whole recipe. --weight_decay sets both sides' decay.
    """
    out: dict[str, float] = {}
    if learning_rate is not None:
        out["muon_lr" if "muon_lr" in params else "lr"] = learning_rate
        if "muon_lr" in params or "adam_lr" in params:  # the sides have separate keys: keep their ratio
            old = sides(params)
            ratio = old["adam"]["lr"] / old["muon"]["lr"] if old["muon"]["lr"] > 0 else None
            out["adam_lr"] = learning_rate * ratio if ratio is not None else old["adam"]["lr"]
    if weight_decay is not None:
        for key in ("weight_decay", "muon_weight_decay", "adam_weight_decay"):
            if key == "weight_decay" or key in params:
                out[key] = weight_decay
    return out


def check_supported(ds: dict, path: str) -> None:
    """Refuse, in one line, a Muon configuration under which DeepSpeed would not run Muon as meant."""
    params = ds["optimizer"].get("params", {})
    unknown = sorted(set(params) - KNOWN_PARAMS)
    if unknown:
        raise UserError(f"DeepSpeed config {path}: unknown Muon optimizer.params key(s) {', '.join(unknown)} "
                        "(DeepSpeed's Muon would ignore them silently)",
                        hint=f"known: {', '.join(sorted(KNOWN_PARAMS))}")
    sides(params)  # both sides have a learning rate
    if params.get("ns_method", "gram") not in NS_METHODS:
        raise UserError(f"DeepSpeed config {path}: ns_method must be one of {', '.join(NS_METHODS)}")
    zero = ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    offload = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower()
    if offload in ("cpu", "nvme"):
        raise UserError(f"DeepSpeed config {path}: Muon with offload_optimizer is not supported by ds_gpt "
                        "(not verified: its momentum would live on the host beside CPU Adam's moments)",
                        hint="use ds_configs/zero{1,2,3}_muon.json, or AdamW for offload")
    if stage == 3 and zero.get("reduce_scatter", True):
        raise UserError(f"DeepSpeed config {path}: DeepSpeed's Muon at ZeRO stage 3 needs reduce_scatter off "
                        "(each rank orthogonalizes whole gradients)",
                        hint='set "reduce_scatter": false in zero_optimization, as ds_configs/zero3_muon.json does')
    if stage >= 1 and float(ds.get("gradient_clipping", 0.0)) > 0:
        # ZeRO-1..3 write the orthogonalized update into the gradient partition before taking the
        # norm: the clip then measures Muon's update (about sqrt(width) per matrix), not the gradient,
        # and shrinks every step by the norm of all matrices together (~100x at 124M).
        raise UserError(f"DeepSpeed config {path}: gradient_clipping {ds['gradient_clipping']} with Muon at ZeRO "
                        f"stage {stage}: DeepSpeed would clip Muon's orthogonalized update, not the gradient",
                        hint="set gradient_clipping to 0 (--grad_clip 0), as the shipped Muon configs do")


def ns_flops_per_step(matrix_shapes: list[tuple[int, int]], steps: int = NS_STEPS) -> int:
    """FLOPs of one optimizer step's Newton-Schulz iterations (the standard quintic), all matrices once.

    Per iteration on an m x n matrix (m <= n): X X^T (2 m^2 n), A A (2 m^3), B X (2 m^2 n). DeepSpeed's
    default "gram" variant does fewer; this is the upper bound docs/mfu.md quotes. Not part of MFU,
    which counts the model's FLOPs only (as nanoGPT and PaLM define it).
    """
    total = 0
    for rows, cols in matrix_shapes:
        m, n = min(rows, cols), max(rows, cols)
        total += steps * (4 * m * m * n + 2 * m ** 3)
    return total
