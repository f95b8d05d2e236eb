"""Every training option, parsed once: defaults < --config FILE (TOML) < command line.

The defaults are the seed's GPT-2 124M recipe (nanoGPT's train.py). Engine settings (ZeRO
stage, precision, batch sizes, AdamW, clipping) live in the DeepSpeed JSON, which is the single
source of truth for them; the few CLI overrides are applied to it here, in `resolve`, and
nowhere else. Batch arithmetic happens in `resolve_batch` and everything else asks `RunConfig`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds_gpt.errors import UserError
from ds_gpt.mfu import profiler_ds_overrides
from ds_gpt.paths import repo_path


def opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = opt("out", "run directory: config.json, metrics.jsonl, tb/, checkpoints")
    data_dir: str = opt("data/openwebtext", "directory with train.bin and val.bin (python -m ds_gpt.prepare)")
    deepspeed_config: str = opt("ds_configs/zero1.json", "DeepSpeed JSON: ZeRO stage, precision, batch, AdamW, clipping")
    init_from: str = opt("scratch", "scratch | resume | auto (resume if OUT has a checkpoint) | weights:OUT[/TAG] | nanogpt:PATH/ckpt.pt | gpt2[-medium|-large|-xl] | HF dir")
    resume_optimizer: bool = opt(False, "with --init_from nanogpt:...: also load its optimizer state and iteration count")
    # model (nanoGPT's train.py values; bias=False as there)
    n_layer: int = opt(12, "transformer blocks")
    n_head: int = opt(12, "attention heads")
    n_embd: int = opt(768, "embedding width")
    block_size: int = opt(1024, "context length in tokens")
    vocab_size: int = opt(50304, "vocabulary size: GPT-2's 50257 padded to a multiple of 64")
    dropout: float = opt(0.0, "dropout probability; 0 for pretraining")
    bias: bool = opt(False, "biases in Linear and LayerNorm layers")
    # AdamW and clipping: None keeps the DeepSpeed JSON's value
    learning_rate: float | None = opt(None, "peak learning rate (JSON optimizer.params.lr, 6e-4 in the shipped configs)")
    weight_decay: float | None = opt(None, "AdamW weight decay on 2-D tensors (JSON optimizer.params.weight_decay)")
    grad_clip: float | None = opt(None, "gradient norm clip, 0 disables (JSON gradient_clipping)")
    # learning-rate schedule: nanoGPT's linear warmup then cosine decay to min_lr
    decay_lr: bool = opt(True, "decay the learning rate; False keeps it at the peak")
    warmup_iters: int = opt(2000, "linear warmup iterations")
    lr_decay_iters: int = opt(600000, "iteration where the cosine reaches min_lr (~max_iters per Chinchilla)")
    min_lr: float = opt(6e-5, "final learning rate (~peak / 10)")
    # DeepSpeed overrides: None keeps the JSON's value
    zero_stage: int | None = opt(None, "ZeRO stage 0-3 (JSON zero_optimization.stage)")
    dtype: str | None = opt(None, "float32 | bfloat16 | float16 (JSON bf16/fp16 blocks)")
    micro_batch_size: int | None = opt(None, "sequences per GPU per micro-step (JSON train_micro_batch_size_per_gpu)")
    gradient_accumulation_steps: int | None = opt(None, "micro-steps per iteration; the global batch follows")
    global_batch_size: int | None = opt(None, "sequences per iteration over all ranks; accumulation follows")
    # loop, evaluation, logging
    max_iters: int = opt(600000, "total optimizer steps")
    eval_interval: int = opt(2000, "evaluate train/val loss every N iterations")
    eval_iters: int = opt(200, "batches per split per evaluation (per rank, averaged over ranks)")
    eval_only: bool = opt(False, "evaluate once and exit")
    log_interval: int = opt(1, "log to console, metrics.jsonl and tensorboard every N iterations")
    seed: int = opt(1337, "seed of the data sampler and of model initialisation")
    # checkpoints
    checkpoint_interval: int = opt(2000, "save a checkpoint every N iterations (and at the end)")
    keep_last: int = opt(2, "rolling checkpoints kept besides milestones")
    milestones: str = opt("10000,20000", "comma-separated iterations whose checkpoints are kept forever")
    milestone_every: int = opt(50000, "also keep every N-th iteration's checkpoint forever (0: none)")
    # reliability
    on_nan: str = opt("stop", "non-finite loss: stop (exit 3, last good checkpoint intact) | skip (drop the step)")
    pg_timeout: int = opt(600, "seconds a collective may wait for a dead or stuck rank before all ranks exit")
    # speed and measurement
    compile: bool = opt(True, "torch.compile the model (needs a GPU to pay off)")
    profile_step: int | None = opt(None, "run DeepSpeed's flops profiler on this iteration")
    peak_tflops: float | None = opt(None, "per-device peak TFLOPS for MFU (default: detected device's table value)")

    # which options the user set (CLI or --config): a checkpoint's model args fill in the rest
    explicit: frozenset = field(default=frozenset(), repr=False, compare=False, metadata={"cli": False})

    def milestone_set(self) -> set[int]:
        return {int(m) for m in self.milestones.split(",") if m.strip()}


ZERO_STAGES = (0, 1, 2, 3)
DTYPES = ("float32", "bfloat16", "float16")

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
# DeepSpeed ignores typos inside this block too (FIELD-NOTES); the other sub-blocks reject them.
KNOWN_FLOPS_PROFILER_KEYS = frozenset(
    "enabled recompute_fwd_factor profile_step module_depth top_modules detailed output_file".split())


# --- parsing -------------------------------------------------------------------------------

def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(tp: Any) -> type:
    """int | None -> int."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def parse_bool(text: str) -> bool:
    """nanoGPT's configurator accepts Python literals: True/False (and we accept true/1/yes)."""
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"expected True or False, got {text!r}")


def _coerce(name: str, value: Any, tp: Any, origin: str) -> Any:
    """Check/convert one value from a config file or the CLI to the field's type."""
    base = _base_type(tp)
    if value is None and type(None) in typing.get_args(tp):
        return None
    try:
        if base is bool:
            return value if isinstance(value, bool) else parse_bool(value)
        if isinstance(value, bool):  # True is an int in Python; never accept it as a number
            raise ValueError
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value, 10)
        if base is float:
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
    except ValueError:
        pass
    raise UserError(f"{origin} expects {base.__name__}, got {value!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, through run_cli, not usage + exit
        raise UserError(message, hint="python -m ds_gpt.train --help lists every option")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ds_gpt.train", description="Train GPT-2 with DeepSpeed (nanoGPT's recipe).",
                     allow_abbrev=False, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="TOML file of option = value lines (see config/)")
    parser.add_argument("--local_rank", type=int, help="set by the deepspeed launcher; read from LOCAL_RANK")
    types = _field_types()
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli") is False:
            continue
        # Values stay strings here and are converted in one place (_coerce), for CLI and file alike.
        parser.add_argument(f"--{f.name}", metavar=_base_type(types[f.name]).__name__.upper(),
                            help=f"{f.metadata['help']} [{f.default}]")
    return parser


def load_config_file(path: str) -> dict[str, Any]:
    p = repo_path(path)
    try:
        with open(p, "rb") as fh:
            values = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None
    return values


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI > config file > defaults; unknown keys and wrong types are errors."""
    ns = vars(build_parser().parse_args(argv))
    types = _field_types()
    values: dict[str, Any] = {}
    if "config" in ns:
        path = ns.pop("config")
        for key, value in load_config_file(path).items():
            if key not in types:
                raise UserError(f"config file {path}: unknown option {key!r}",
                                hint="python -m ds_gpt.train --help lists every option")
            values[key] = _coerce(key, value, types[key], f"config file {path}: {key}")
    ns.pop("local_rank", None)
    for key, value in ns.items():
        values[key] = _coerce(key, value, types[key], f"--{key}")
    cfg = TrainConfig(**values, explicit=frozenset(values))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Collect every problem with the options and report them together, once."""
    problems = []
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "max_iters", "eval_iters",
                 "log_interval", "eval_interval", "checkpoint_interval", "pg_timeout"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name} must be positive (got {getattr(cfg, name)})")
    if cfg.n_embd % cfg.n_head:
        problems.append(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
    if not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"dropout must be in [0, 1) (got {cfg.dropout})")
    if cfg.zero_stage is not None and cfg.zero_stage not in ZERO_STAGES:
        problems.append(f"zero_stage must be one of 0, 1, 2, 3 (got {cfg.zero_stage})")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)} (got {cfg.dtype})")
    if cfg.on_nan not in ("stop", "skip"):
        problems.append(f"on_nan must be stop or skip (got {cfg.on_nan})")
    if cfg.warmup_iters < 0 or cfg.lr_decay_iters < cfg.warmup_iters:
        problems.append(f"need 0 <= warmup_iters ({cfg.warmup_iters}) <= lr_decay_iters ({cfg.lr_decay_iters})")
    if cfg.keep_last < 1:
        problems.append(f"keep_last must be at least 1 (got {cfg.keep_last})")
    try:
        cfg.milestone_set()
    except ValueError:
        problems.append(f"milestones must be comma-separated integers (got {cfg.milestones!r})")
    for name in ("micro_batch_size", "gradient_accumulation_steps", "global_batch_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            problems.append(f"{name} must be positive (got {getattr(cfg, name)})")
    if problems:
        raise UserError("; ".join(problems))


# --- the resolved run: DeepSpeed JSON + overrides + batch arithmetic -------------------------

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


def resolve_batch(world_size: int, *, json_micro: int | None = None, json_accum: int | None = None,
                  json_global: int | None = None, micro: int | None = None, accum: int | None = None,
                  global_batch: int | None = None, json_name: str = "the DeepSpeed config") -> BatchSizes:
    """Micro batch, accumulation and global batch from the JSON and the CLI, in one place.

    CLI values win. Two known quantities fix the third; JSON values fill in what the CLI left
    open, preferring the micro batch (it is what fits in memory), then the global batch (it is
    the recipe: nanoGPT divides its accumulation by the world size), then the accumulation.
    """
    cli = {"micro": micro, "accum": accum, "global": global_batch}
    known = {k: v for k, v in cli.items() if v is not None}
    from_json = {"micro": json_micro, "global": json_global, "accum": json_accum}
    json_used = []
    for key in ("micro", "global", "accum"):
        if len(known) < 2 and key not in known and from_json[key] is not None:
            known[key] = from_json[key]
            json_used.append(key)
    if not cli["micro"] and not cli["accum"] and not cli["global"] and all(v is not None for v in from_json.values()):
        known = dict(from_json)  # all three in the JSON: check them against each other
        json_used = ["micro", "global", "accum"]
    where = (lambda k: f"{json_name} " if k in json_used else "--")
    names = {"micro": ("train_micro_batch_size_per_gpu", "micro_batch_size"),
             "accum": ("gradient_accumulation_steps", "gradient_accumulation_steps"),
             "global": ("train_batch_size", "global_batch_size")}
    label = lambda k: f"{where(k)}{names[k][0] if k in json_used else names[k][1]}={known[k]}"

    if "micro" not in known:
        known["micro"] = max(1, (known.get("global", world_size) // world_size) // known.get("accum", 1))
    if "accum" not in known and "global" not in known:
        known["accum"] = 1
    if "accum" not in known:
        per_step = known["micro"] * world_size
        if known["global"] % per_step:
            raise UserError(
                f"batch sizes disagree: {label('global')} is not divisible by {label('micro')} x world_size={world_size}",
                hint="pick a global batch that is a multiple of micro x world size, or set --gradient_accumulation_steps")
        known["accum"] = known["global"] // per_step
    batch = BatchSizes(micro=known["micro"], grad_accum=known["accum"], world_size=world_size)
    if "global" in known and known["global"] != batch.global_batch:
        raise UserError(
            f"batch sizes disagree: {label('global')} but {label('micro')} x {label('accum')} "
            f"x world_size={world_size} = {batch.global_batch}",
            hint="give two of micro batch, accumulation and global batch, and let the third follow")
    if batch.grad_accum < 1:
        raise UserError(f"batch sizes disagree: {label('global')} is smaller than micro x world_size")
    return batch


def load_ds_config(path: str) -> dict:
    p = repo_path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UserError(f"DeepSpeed config {path} not found", hint="see ds_configs/ for the shipped ones") from None
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(ds, dict):
        raise UserError(f"DeepSpeed config {path} must hold a JSON object")
    unknown = sorted(set(ds) - KNOWN_DS_KEYS)
    if unknown:
        raise UserError(f"DeepSpeed config {path}: unknown key(s) {', '.join(unknown)} (DeepSpeed would ignore them silently)")
    unknown = sorted(set(ds.get("flops_profiler", {})) - KNOWN_FLOPS_PROFILER_KEYS)
    if unknown:
        raise UserError(f"DeepSpeed config {path}: unknown flops_profiler key(s) {', '.join(unknown)}")
    if "scheduler" in ds:
        raise UserError(f"DeepSpeed config {path}: remove the scheduler block; the learning rate follows "
                        "--learning_rate/--min_lr/--warmup_iters/--lr_decay_iters (nanoGPT's schedule)")
    if ds.get("optimizer", {}).get("type", "AdamW").lower() not in ("adamw", "adam"):
        raise UserError(f"DeepSpeed config {path}: optimizer.type must be AdamW (nanoGPT's recipe)")
    return ds


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

    @property
    def dtype(self) -> str:
        return ds_dtype(self.ds_config)

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    @property
    def learning_rate(self) -> float:
        return float(self.ds_config["optimizer"]["params"]["lr"])

    @property
    def weight_decay(self) -> float:
        return float(self.ds_config["optimizer"]["params"].get("weight_decay", 0.0))

    @property
    def tokens_per_iter(self) -> int:
        return self.batch.global_batch * self.model["block_size"]

    def lr_at(self, it: int) -> float:
        """nanoGPT's get_lr: linear warmup, cosine decay to min_lr, then min_lr."""
        t, peak = self.train, self.learning_rate
        if not t.decay_lr:
            return peak
        if it < t.warmup_iters:
            return peak * (it + 1) / (t.warmup_iters + 1)
        if it > t.lr_decay_iters:
            return t.min_lr
        ratio = (it - t.warmup_iters) / max(1, t.lr_decay_iters - t.warmup_iters)
        return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - t.min_lr)

    def to_dict(self) -> dict:
        train = {k: v for k, v in dataclasses.asdict(self.train).items() if k != "explicit"}
        return {"model": self.model, "train": train, "ds_config": self.ds_config,
                "batch": {**dataclasses.asdict(self.batch), "global_batch": self.batch.global_batch,
                          "tokens_per_iter": self.tokens_per_iter}, "dtype": self.dtype, "zero_stage": self.zero_stage}


MODEL_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


def model_args(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in MODEL_KEYS}


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
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    if cfg.learning_rate is not None:
        override(("optimizer", "params", "lr"), cfg.learning_rate, "--learning_rate")
    if cfg.weight_decay is not None:
        override(("optimizer", "params", "weight_decay"), cfg.weight_decay, "--weight_decay")
    if cfg.grad_clip is not None:
        override(("gradient_clipping",), cfg.grad_clip, "--grad_clip")
    if "lr" not in ds["optimizer"]["params"]:
        raise UserError(f"DeepSpeed config {cfg.deepspeed_config}: optimizer.params.lr is missing",
                        hint="set it in the JSON or pass --learning_rate")
    if not cuda:
        # DeepSpeed's fused Adam is a CUDA kernel; on CPU it would JIT-build a slow stand-in.
        override(("optimizer", "params", "torch_adam"), True, "cpu")
    if ds.get("tensorboard", {}).get("enabled"):
        # DeepSpeed's monitor writes under output_path/job_name: pin it inside the run directory.
        override(("tensorboard", "output_path"), str(Path(cfg.out_dir) / "tb"), "--out_dir")
        override(("tensorboard", "job_name"), "train", "--out_dir")
    if cfg.dtype == "float16" or ds.get("fp16", {}).get("enabled"):
        if not cuda:
            raise UserError("float16 training needs a GPU; use --dtype float32 (or bfloat16) on CPU")
    # Every resolved config carries the flops_profiler block; --profile_step turns it on.
    for block, values in profiler_ds_overrides(cfg.profile_step, cfg.out_dir, int(ds.get("zero_optimization", {}).get("stage", 0))).items():
        for key, value in values.items():
            override((block, key), value, "--profile_step")
    return RunConfig(train=cfg, model=model_args(cfg), ds_config=ds, batch=batch)
