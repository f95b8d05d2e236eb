"""The resolved run: the DeepSpeed JSON with the CLI's overrides applied, and the batch arithmetic.

Resolved once at start-up (`resolve`); every other module asks the RunConfig it returns, so
the batch sizes, the precision and AdamW's settings are derived in exactly one place.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_gpt import muon
from ds_gpt.config import MODEL_KEYS, TrainConfig, is_count, model_args
from ds_gpt.errors import UserError
from ds_gpt.flops_profile import profiler_ds_overrides
from ds_gpt.paths import repo_path

# DeepSpeed silently ignores unknown top-level keys (a typo such as "zero_optimisation" runs
# ZeRO-0 without a word), and it has no public list of the keys it reads, so we keep one.
KNOWN_DS_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps steps_per_print
wall_clock_breakdown memory_breakdown dump_state optimizer scheduler fp16 bf16 amp torch_autocast
gradient_clipping prescale_gradients gradient_predivide_factor sparse_gradients zero_optimization
zero_allow_untested_optimizer zero_force_ds_cpu_optimizer activation_checkpointing flops_profiler
tensorboard wandb csv_monitor comet comms_logger communication_data_type data_types checkpoint
elasticity aio autotuning compression_training data_efficiency curriculum_learning pipeline
compile timers disable_allgather dataloader_drop_last weight_quantization hybrid_engine nebula
eigenvalue progressive_layer_drop sparse_attention gradient_accumulation_dtype seed
""".split())
# DeepSpeed ignores typos inside this block too (checked on 0.19.8); the other sub-blocks reject them.
KNOWN_FLOPS_PROFILER_KEYS = frozenset(
    "enabled recompute_fwd_factor profile_step module_depth top_modules detailed output_file".split())


# The loader draws a global batch's window offsets at once (8 bytes each, every step), and
# DeepSpeed counts micro-steps in Python. 2**24 sequences, 17 G tokens per step at T=1024, is
# far beyond any recipe (GPT-3 used 3.2 M tokens) and still only 128 MB of offsets; a typo such
# as --gradient_accumulation_steps 1000000000 would instead ask for 8 GB and be OOM-killed.
MAX_GLOBAL_BATCH = 2**24


@dataclass(frozen=True)
class BatchSizes:
    micro: int  # sequences per rank per micro-step
    grad_accum: int  # micro-steps per optimizer step
    world_size: int

    @property
    def global_batch(self) -> int:  # sequences per optimizer step, all ranks
        return self.micro * self.grad_accum * self.world_size

    @property
    def per_rank(self) -> int:  # sequences per optimizer step, one rank
        return self.micro * self.grad_accum


def flags_for_global_batch(global_batch: int, now: BatchSizes) -> str | None:
    """Trainer flags that give `global_batch` on this run's world size, keeping its micro batch
    where it divides (the largest smaller one otherwise). All three are named, so they win over
    whatever the JSON or a TOML file says; None where the world size cannot reach the batch."""
    if global_batch % now.world_size:
        return None
    per_rank = global_batch // now.world_size
    micro = max(m for m in range(1, min(now.micro, per_rank) + 1) if per_rank % m == 0)
    accum = per_rank // micro
    return f"--micro_batch_size {micro} --gradient_accumulation_steps {accum} --global_batch_size {global_batch}"


def resolve_batch(world_size: int, *, json_micro: int | None = None, json_accum: int | None = None,
                  json_global: int | None = None, micro: int | None = None, accum: int | None = None,
                  global_batch: int | None = None, json_name: str = "the DeepSpeed config") -> BatchSizes:
    """Micro batch, accumulation and global batch from the JSON and the CLI, in one place.

    CLI values win. Two known quantities fix the third; JSON values fill in what the CLI left
    open, preferring the micro batch (it is what fits in memory), then the global batch (it is
    the recipe: nanoGPT divides its accumulation by the world size), then the accumulation.
    """
    cli = {k: v for k, v in (("micro", micro), ("accum", accum), ("global", global_batch)) if v is not None}
    from_json = {"micro": json_micro, "global": json_global, "accum": json_accum}  # in order of preference
    if cli:
        known, json_used = dict(cli), []
        for key, value in from_json.items():
            if len(known) < 2 and key not in known and value is not None:
                known[key] = value
                json_used.append(key)
    else:  # the JSON alone: whatever it gives is checked against itself
        known = {k: v for k, v in from_json.items() if v is not None}
        json_used = list(known)
    names = {"micro": ("train_micro_batch_size_per_gpu", "micro_batch_size"),
             "accum": ("gradient_accumulation_steps", "gradient_accumulation_steps"),
             "global": ("train_batch_size", "global_batch_size")}

    def label(k: str) -> str:
        return f"{json_name} {names[k][0]}={known[k]}" if k in json_used else f"--{names[k][1]}={known[k]}"

    if "micro" not in known:
        known["micro"] = max(1, (known.get("global", world_size) // world_size) // known.get("accum", 1))
    if "accum" not in known and "global" not in known:
        known["accum"] = 1
    if "accum" not in known:
        per_step = known["micro"] * world_size
        if known["global"] % per_step:
            raise UserError(
                f"batch sizes disagree: {label('global')} is not divisible by {label('micro')} "
                f"x world_size={world_size}",
                hint="pick a global batch that is a multiple of micro x world size, "
                     "or set --gradient_accumulation_steps")
        known["accum"] = known["global"] // per_step
    batch = BatchSizes(micro=known["micro"], grad_accum=known["accum"], world_size=world_size)
    if "global" in known and known["global"] != batch.global_batch:
        raise UserError(
            f"batch sizes disagree: {label('global')} but {label('micro')} x {label('accum')} "
            f"x world_size={world_size} = {batch.global_batch}",
            hint="give two of micro batch, accumulation and global batch, and let the third follow")
    if batch.grad_accum < 1:
        raise UserError(f"batch sizes disagree: {label('global')} is smaller than micro x world_size",
                        hint="raise the global batch to at least micro x world size")
    if batch.global_batch > MAX_GLOBAL_BATCH:
        given = ", ".join(label(k) for k in (*cli, *json_used))
        raise UserError(f"a global batch of {batch.global_batch:,} sequences ({given}, world_size={world_size}) "
                        f"is beyond the {MAX_GLOBAL_BATCH:,} the loader can draw per step",
                        hint="check --gradient_accumulation_steps and --micro_batch_size for a typo "
                             "(the reference recipe: 480 sequences)")
    return batch


# Top-level keys whose value is a number, a flag or a name; every other known key is a block
# (a JSON object). DeepSpeed would fail on a block that is null or a list deep in its start-up,
# after every node has joined the process group.
SCALAR_DS_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps steps_per_print
wall_clock_breakdown memory_breakdown dump_state gradient_clipping prescale_gradients
gradient_predivide_factor sparse_gradients zero_allow_untested_optimizer zero_force_ds_cpu_optimizer
communication_data_type disable_allgather dataloader_drop_last gradient_accumulation_dtype seed
""".split())
DS_EXAMPLE_HINT = "ds_configs/zero1.json is a working example"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ds_shape_problems(ds: dict) -> list[str]:
    """What is of the wrong shape among the settings ds_gpt and DeepSpeed read, each named by its path."""
    problems = [f"{key} must be a JSON object (got {json.dumps(value)}); remove the key to take DeepSpeed's defaults"
                for key, value in ds.items() if key not in SCALAR_DS_KEYS and not isinstance(value, dict)]

    def block(*path: str) -> dict:
        node = ds
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    def check(path: str, ok: Any, want: str) -> None:
        *parents, key = path.split(".")
        node = block(*parents)
        if key in node and not ok(node[key]):
            problems.append(f"{path} must be {want} (got {json.dumps(node[key])})")

    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        check(key, is_count, "a positive integer")
    check("gradient_clipping", lambda v: _is_number(v) and v >= 0, "a number >= 0 (0: no clipping)")
    check("zero_optimization.stage", lambda v: v in (0, 1, 2, 3) and not isinstance(v, bool), "one of 0, 1, 2, 3")
    for name in ("offload_optimizer", "offload_param"):
        check(f"zero_optimization.{name}", lambda v: isinstance(v, dict), 'an object such as {"device": "cpu"}')
    for name in ("bf16", "fp16", "tensorboard", "flops_profiler"):
        check(f"{name}.enabled", lambda v: isinstance(v, bool), "true or false")
    check("flops_profiler.profile_step", is_count, "a positive integer")
    check("optimizer.type", lambda v: isinstance(v, str), 'a name such as "AdamW"')
    check("optimizer.params", lambda v: isinstance(v, dict), "an object")
    for name in ("lr", "weight_decay", "eps"):
        check(f"optimizer.params.{name}", lambda v: _is_number(v) and v >= 0, "a number >= 0")
    check("optimizer.params.betas", lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)),
          "two numbers, such as [0.9, 0.95]")
    return problems


def load_ds_config(path: str) -> dict:
    p = repo_path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UserError(f"DeepSpeed config {path} not found", hint="see ds_configs/ for the shipped ones") from None
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {err.msg} "
                        f"at line {err.lineno} column {err.colno}", hint=DS_EXAMPLE_HINT) from None
    if not isinstance(ds, dict):
        raise UserError(f"DeepSpeed config {path} must hold a JSON object", hint=DS_EXAMPLE_HINT)
    unknown = sorted(set(ds) - KNOWN_DS_KEYS)
    if unknown:
        raise UserError(f"DeepSpeed config {path}: unknown key(s) {', '.join(unknown)} "
                        "(DeepSpeed would ignore them silently)", hint="check the spelling; " + DS_EXAMPLE_HINT)
    problems = ds_shape_problems(ds)
    if problems:
        raise UserError(f"DeepSpeed config {path}: {'; '.join(problems)}", hint=DS_EXAMPLE_HINT)
    unknown = sorted(set(ds.get("flops_profiler", {})) - KNOWN_FLOPS_PROFILER_KEYS)
    if unknown:
        raise UserError(f"DeepSpeed config {path}: unknown flops_profiler key(s) {', '.join(unknown)}",
                        hint="check the spelling; " + DS_EXAMPLE_HINT)
    if "scheduler" in ds:
        raise UserError(f"DeepSpeed config {path}: remove the scheduler block; the learning rate follows "
                        "--learning_rate/--min_lr/--warmup_iters/--lr_decay_iters (nanoGPT's schedule)",
                        hint="delete the \"scheduler\" key")
    if ds.get("optimizer", {}).get("type", "AdamW").lower() not in ("adamw", "adam", "muon"):
        raise UserError(f"DeepSpeed config {path}: optimizer.type must be AdamW (nanoGPT's recipe) or Muon "
                        "(ds_configs/zero1_muon.json)", hint='set "type": "AdamW"')
    return ds


def ds_optimizer(ds: dict) -> str:
    """"muon" for DeepSpeed's Muon (with its auxiliary AdamW), else "adamw"."""
    return "muon" if ds.get("optimizer", {}).get("type", "AdamW").lower() == "muon" else "adamw"


def ds_zero_stage(ds: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no zero_optimization block)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def ds_offloads_optimizer(ds: dict) -> bool:
    """Does the config keep the optimizer state on the host (ZeRO-Offload, to CPU or NVMe)?"""
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    device = offload.get("device", "none")
    return str(device).lower() in ("cpu", "nvme")


def ds_dtype(ds: dict) -> str:
    """The training precision a resolved DeepSpeed config asks for."""
    if ds.get("bf16", {}).get("enabled"):
        return "bfloat16"
    if ds.get("fp16", {}).get("enabled"):
        return "float16"
    return "float32"


@dataclass
class RunConfig:
    """Everything one run needs, resolved once at start-up; other modules ask this object."""

    train: TrainConfig
    model: dict  # GPTConfig fields
    ds_config: dict
    batch: BatchSizes
    profile_step: int | None = None  # the iteration the flops profiler counts, if any

    @property
    def dtype(self) -> str:
        return ds_dtype(self.ds_config)

    @property
    def zero_stage(self) -> int:
        return ds_zero_stage(self.ds_config)

    @property
    def optimizer(self) -> str:
        return ds_optimizer(self.ds_config)

    @property
    def learning_rate(self) -> float:
        """The peak lr the schedule is written in: AdamW's, or with Muon the Muon side's."""
        if self.optimizer == "muon":
            return self.optimizer_sides["muon"]["lr"]
        return float(self.ds_config["optimizer"]["params"]["lr"])

    @property
    def weight_decay(self) -> float:
        return float(self.ds_config["optimizer"]["params"].get("weight_decay", 0.0))

    @property
    def optimizer_sides(self) -> dict[str, dict[str, float]] | None:
        """With Muon, each side's peak lr and weight decay ({"muon": ..., "adam": ...}); None for AdamW."""
        return muon.sides(self.ds_config["optimizer"]["params"]) if self.optimizer == "muon" else None

    @property
    def tokens_per_iter(self) -> int:
        return self.batch.global_batch * self.model["block_size"]

    def lr_at(self, it: int) -> float:
        """The learning rate of iteration `it`: linear warmup, then nanoGPT's cosine decay to min_lr
        (or, with --lr_schedule wsd, the peak until a linear cool-down to min_lr), then min_lr."""
        t, peak = self.train, self.learning_rate
        if not t.decay_lr:
            return peak
        if it < t.warmup_iters:
            return peak * (it + 1) / (t.warmup_iters + 1)
        if it > t.lr_decay_iters:
            return t.min_lr
        if t.lr_schedule == "wsd":
            cooldown_start = max(t.warmup_iters, t.lr_decay_iters - round(t.cooldown_frac * t.lr_decay_iters))
            if it < cooldown_start:
                return peak
            ratio = (it - cooldown_start) / max(1, t.lr_decay_iters - cooldown_start)
            return peak + ratio * (t.min_lr - peak)
        ratio = (it - t.warmup_iters) / max(1, t.lr_decay_iters - t.warmup_iters)
        return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - t.min_lr)

    def side_lrs(self, lr: float) -> dict[str, float]:
        """The lr of each optimizer side when the schedule stands at `lr`: with Muon the AdamW side
        follows the same schedule at its own peak; AdamW has one side."""
        sides = self.optimizer_sides
        if sides is None:
            return {"adam": lr}
        peak = sides["muon"]["lr"]
        return {"muon": lr, "adam": lr * sides["adam"]["lr"] / peak if peak > 0 else sides["adam"]["lr"]}

    def to_dict(self) -> dict:
        train = {k: v for k, v in dataclasses.asdict(self.train).items() if k != "explicit"}
        return {"model": self.model, "train": train, "ds_config": self.ds_config,
                "batch": {**dataclasses.asdict(self.batch), "global_batch": self.batch.global_batch,
                          "tokens_per_iter": self.tokens_per_iter}, "dtype": self.dtype, "zero_stage": self.zero_stage,
                "profile_step": self.profile_step}


def adopt_model_args(run: RunConfig, saved: dict, source: str) -> None:
    """Take a checkpoint's model shape, as nanoGPT does on resume; explicit flags must agree with it.

    Dropout is a training choice, not a shape, so the run's own value is kept.
    """
    shape = {k: v for k, v in saved.items() if k in MODEL_KEYS and k != "dropout"}
    diffs = [f"{k}={shape[k]!r} there vs --{k}={run.model[k]!r}" for k in shape
             if k in run.train.explicit and shape[k] != run.model[k]]
    if diffs:
        raise UserError(f"{source} was made for another model: {', '.join(diffs)}",
                        hint="drop those flags to take the checkpoint's values, or start a new --out_dir")
    run.model = {**run.model, **shape}


def resolve(cfg: TrainConfig, world_size: int, *, cuda: bool, overrides_log: list[str] | None = None) -> RunConfig:
    """Apply the CLI's engine overrides to the DeepSpeed JSON and settle the batch arithmetic."""
    ds = load_ds_config(cfg.deepspeed_config)
    log = overrides_log if overrides_log is not None else []

    def override(path: tuple[str, ...], value: Any, flag: str) -> None:
        node = ds
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if node.get(path[-1]) != value:
            log.append(f"{flag}: {'.'.join(path)} {node.get(path[-1])!r} -> {value!r}")
        node[path[-1]] = value

    batch = resolve_batch(world_size, json_micro=ds.get("train_micro_batch_size_per_gpu"),
                          json_accum=ds.get("gradient_accumulation_steps"), json_global=ds.get("train_batch_size"),
                          micro=cfg.micro_batch_size, accum=cfg.gradient_accumulation_steps,
                          global_batch=cfg.global_batch_size, json_name=cfg.deepspeed_config)
    # Writing all three makes DeepSpeed's own (bare AssertionError) batch check a formality.
    ds["train_micro_batch_size_per_gpu"] = batch.micro
    ds["gradient_accumulation_steps"] = batch.grad_accum
    ds["train_batch_size"] = batch.global_batch

    if cfg.zero_stage is not None:
        override(("zero_optimization", "stage"), cfg.zero_stage, "--zero_stage")
    if cfg.dtype is not None:
        override(("bf16", "enabled"), cfg.dtype == "bfloat16", "--dtype")
        override(("fp16", "enabled"), cfg.dtype == "float16", "--dtype")
    params = ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    if ds_optimizer(ds) == "muon":
        for key, value in muon.overrides(params, cfg.learning_rate, cfg.weight_decay).items():
            override(("optimizer", "params", key), value, "--learning_rate" if key.endswith("lr") else "--weight_decay")
    else:
        if cfg.learning_rate is not None:
            override(("optimizer", "params", "lr"), cfg.learning_rate, "--learning_rate")
        if cfg.weight_decay is not None:
            override(("optimizer", "params", "weight_decay"), cfg.weight_decay, "--weight_decay")
    if cfg.grad_clip is not None:
        override(("gradient_clipping",), cfg.grad_clip, "--grad_clip")
    if "lr" not in params and not (ds_optimizer(ds) == "muon" and "muon_lr" in params):
        raise UserError(f"DeepSpeed config {cfg.deepspeed_config}: optimizer.params.lr is missing",
                        hint="set it in the JSON or pass --learning_rate")
    if ds_optimizer(ds) == "muon":
        muon.check_supported(ds, cfg.deepspeed_config)
    if ds_offloads_optimizer(ds):
        # ZeRO-Offload steps on the host with DeepSpeed's CPU Adam (a JIT-built AVX op, GPU or not);
        # torch's AdamW there would be DeepSpeed's slow fallback.
        override(("optimizer", "params", "torch_adam"), False, "offload_optimizer")
    elif not cuda:
        # DeepSpeed's FusedAdam on CPU is a C++ op built at first use. torch's AdamW ships a fused
        # CPU kernel as fast: 4.5x its default per-tensor loop, nanoGPT's on CPU (docs/benchmarks.md).
        # Muon's auxiliary AdamW takes no such option; a JSON's own fused or foreach is kept.
        override(("optimizer", "params", "torch_adam"), True, "cpu")
        if ds_optimizer(ds) == "adamw" and "fused" not in params and not params.get("foreach"):
            override(("optimizer", "params", "fused"), True, "cpu")
    if ds.get("tensorboard", {}).get("enabled"):
        # DeepSpeed's monitor writes under output_path/job_name: pin it inside the run directory.
        override(("tensorboard", "output_path"), str(Path(cfg.out_dir) / "tb"), "--out_dir")
        override(("tensorboard", "job_name"), "train", "--out_dir")
    if ds.get("fp16", {}).get("enabled") and not cuda:  # --dtype float16 has set it above
        raise UserError("float16 training needs a GPU; use --dtype float32 (or bfloat16) on CPU")
    # --profile_step, or else the JSON's own flops_profiler block, asks for one profiled iteration.
    # The training loop runs the profiler (flops_profile.FlopsProfileCapture); the engine's block goes off.
    json_profiler = ds.get("flops_profiler", {})
    profile_step = cfg.profile_step
    if profile_step is None and json_profiler.get("enabled"):
        profile_step = int(json_profiler.get("profile_step", 1))  # DeepSpeed's default
    for block, values in profiler_ds_overrides(profile_step, ds_zero_stage(ds)).items():
        for key, value in values.items():
            override((block, key), value, "flops profiler (run by the training loop)")
    # DeepSpeed's throughput timer (on unless the JSON says otherwise) synchronizes the device at every
    # forward and every step() to time a line it logs at INFO, which ds_gpt silences: on a GPU two
    # host syncs per micro-batch for nothing. The loop times its own steps.
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    return RunConfig(train=cfg, model=model_args(cfg), ds_config=ds, batch=batch, profile_step=profile_step)
