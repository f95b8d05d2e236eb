"""Every training option, parsed once: defaults < --config FILE (TOML) < command line.

The defaults are the reference run's GPT-2 124M recipe (nanoGPT's train.py); `--model` picks one of
GPT-2's other sizes (ds_gpt.presets), and --n_layer/--n_head/--n_embd still override it.
Engine settings (ZeRO stage, precision, batch sizes, AdamW, clipping) live in the DeepSpeed
JSON, which is the single source of truth for them; ds_gpt/run_config.py applies the few CLI
overrides to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

from ds_gpt import presets, recompute
from ds_gpt.errors import UserError
from ds_gpt.paths import repo_path

GPT2 = presets.MODELS["124M"]  # the reference run's model, the default shape
LR_SCHEDULES = ("cosine", "wsd")


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = opt("out", "run directory: config.json, metrics.jsonl, tb/, checkpoints")
    data_dir: str = opt("data/openwebtext", "directory with train.bin and val.bin (python -m ds_gpt.prepare)")
    deepspeed_config: str = opt("ds_configs/zero1.json",
                                "DeepSpeed JSON: ZeRO stage, precision, batch, AdamW, clipping")
    init_from: str = opt("scratch", "scratch | resume | auto (resume if OUT has a checkpoint) | weights:OUT[/TAG] "
                                    "| nanogpt:PATH/ckpt.pt | gpt2[-medium|-large|-xl] | HF dir")
    resume_optimizer: bool = opt(False,
                                 "with --init_from nanogpt:...: also load its optimizer state and iteration count")
    # model (nanoGPT's train.py values; bias=False as there)
    model: str | None = opt(None, f"GPT-2 size: {' | '.join(presets.MODELS)} (or {', '.join(presets.ALIASES)}); "
                                  "sets n_layer, n_head, n_embd unless those are given")
    n_layer: int = opt(GPT2.n_layer, "transformer blocks")
    n_head: int = opt(GPT2.n_head, "attention heads")
    n_embd: int = opt(GPT2.n_embd, "embedding width")
    block_size: int = opt(1024, "context length in tokens")
    vocab_size: int = opt(presets.PADDED_VOCAB_SIZE, "vocabulary size: GPT-2's 50257 padded to a multiple of 64")
    dropout: float = opt(0.0, "dropout probability; 0 for pretraining")
    bias: bool = opt(False, "biases in Linear and LayerNorm layers")
    activation_checkpointing: str = opt("none", "none | full: recompute each block in backward, ~1/3 more compute "
                                                "for far less activation memory", choices=recompute.MODES)
    # optimizer and clipping: None keeps the DeepSpeed JSON's value
    learning_rate: float | None = opt(None, "peak learning rate (JSON optimizer.params.lr, 6e-4 in the shipped "
                                            "AdamW configs); with Muon the Muon side's, the AdamW side keeping its "
                                            "ratio to it (docs/training.md)")
    weight_decay: float | None = opt(None, "weight decay on 2-D tensors (JSON optimizer.params.weight_decay); "
                                           "with Muon, both sides'")
    grad_clip: float | None = opt(None, "gradient norm clip, 0 disables (JSON gradient_clipping)")
    # learning-rate schedule: linear warmup, then nanoGPT's cosine (or warmup-stable-decay) down to min_lr
    decay_lr: bool = opt(True, "decay the learning rate; False keeps it at the peak")
    lr_schedule: str = opt("cosine", "cosine (nanoGPT's) | wsd: constant after warmup, then a linear cool-down "
                                     "to min_lr over the last --cooldown_frac of lr_decay_iters", choices=LR_SCHEDULES)
    cooldown_frac: float = opt(0.2, "wsd: fraction of lr_decay_iters spent cooling down linearly, in (0, 1]")
    warmup_iters: int = opt(2000, "linear warmup iterations")
    lr_decay_iters: int = opt(600000, "iteration where the schedule reaches min_lr (~max_iters per Chinchilla)")
    min_lr: float = opt(6e-5, "final learning rate (~peak / 10); with Muon, in units of the Muon side's lr")
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
    hellaswag_interval: int | None = opt(None, "score HellaSwag every N iterations (and at the end); default: with "
                                               "every eval when --hellaswag_dir holds a set, else off; 0: off")
    hellaswag_dir: str | None = opt(None, "the HellaSwag set (python -m ds_gpt.prepare --dataset hellaswag); "
                                          "default: data_dir's sibling hellaswag/")
    log_interval: int = opt(1, "log to console, metrics.jsonl and tensorboard every N iterations")
    seed: int = opt(1337, "seed of the data sampler and of model initialisation")
    wandb_log: bool = opt(False, "also log to Weights & Biases (offline unless WANDB_MODE=online; "
                                 "make setup EXTRAS=wandb)")
    wandb_project: str = opt("ds_gpt", "W&B project")
    wandb_run_name: str | None = opt(None, "W&B run name (default: the out_dir's name)")
    # checkpoints
    checkpoint_interval: int = opt(2000, "save a checkpoint every N iterations (and at the end)")
    keep_last: int = opt(2, "rolling checkpoints kept besides milestones")
    milestones: str = opt("10000,20000", "comma-separated iterations whose checkpoints are kept forever")
    milestone_every: int = opt(50000, "also keep every N-th iteration's checkpoint forever (0: none)")
    allow_batch_change: bool = opt(False, "resume with another global batch than the checkpoint's (logged)")
    # reliability
    on_nan: str = opt("stop", "non-finite loss: stop (exit 3, last good checkpoint intact) | skip (drop the step)")
    pg_timeout: int = opt(600, "seconds a collective may wait for a dead or stuck rank before all ranks exit")
    # speed and measurement
    compile: bool = opt(True, "torch.compile the model (needs a GPU to pay off)")
    profile_step: int | None = opt(None, "run DeepSpeed's flops profiler on this iteration")
    peak_tflops: float | None = opt(None, "per-device peak TFLOPS for MFU (default: detected device's table value)")

    # which options the user set (CLI or --config): a checkpoint's model args fill in the rest
    explicit: frozenset = field(default=frozenset(), repr=False, compare=False, metadata={"cli": False})

    def eval_due(self, iter_num: int, interval: int | None = None) -> bool:
        """Evaluate before this iteration: every `interval` (default --eval_interval), at the end, or
        once with --eval_only."""
        every = self.eval_interval if interval is None else interval
        return iter_num % every == 0 or iter_num >= self.max_iters or self.eval_only

    def milestone_set(self) -> set[int]:
        return {int(m) for m in self.milestones.split(",") if m.strip()}


ZERO_STAGES = (0, 1, 2, 3)
# A week: longer than any collective should wait for a dead rank. torch keeps the timeout in
# nanoseconds (a value past ~292 years wraps to a negative one) and timedelta past ~2.7M years fails.
MAX_PG_TIMEOUT = 7 * 24 * 3600
DTYPES = ("float32", "bfloat16", "float16")

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


def is_count(value: object, least: int = 1) -> bool:
    """A JSON or TOML integer >= least (a bool is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def positive_int(text: str) -> int:
    """argparse type for counts: checked while parsing, so a bad one fails before any slow step."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text!r})")
    return value


def _coerce(name: str, value: Any, tp: Any, origin: str, *, typed: bool = False) -> Any:
    """Check/convert one value from a config file or the CLI to the field's type (and its choices).

    CLI values are text and are parsed. A config file's values are `typed` (TOML has integers,
    floats, booleans and strings) and must already be of the option's type: a quoted "3" for an
    int, or a list, table or date for any option, is refused rather than guessed at.
    """
    value = (_check_toml_type if typed else _coerce_type)(name, value, tp, origin)
    choices = _fields()[name].metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{origin} must be one of {', '.join(choices)} (got {value!r})")
    return value


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


# What a TOML value may be for each option type. An integer is a fine float (learning_rate = 1)
# and a fine text option (milestones = 10000); bool is never a number, though Python says it is.
_TOML_TYPES: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str, int)}
_TOML_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_toml_type(name: str, value: Any, tp: Any, origin: str) -> Any:
    base = _base_type(tp)
    if isinstance(value, _TOML_TYPES[base]) and not (base is not bool and isinstance(value, bool)):
        return base(value)
    kind = {str: "a quoted string", bool: "a boolean", list: "a list", dict: "a table"}.get(type(value))
    kind = kind or ("a date or time" if hasattr(value, "isoformat") else type(value).__name__)
    example = {bool: "true", int: "3", float: "3e-4", str: '"text"'}[base]
    raise UserError(f"{origin} must be {_TOML_NAMES[base]}, not {kind} ({value!r})",
                    hint=f"write it as {name} = {example} (TOML values keep their type)")


def _coerce_type(name: str, value: Any, tp: Any, origin: str) -> Any:
    base = _base_type(tp)
    if value is None and type(None) in typing.get_args(tp):
        return None
    try:
        if base is bool:
            return parse_bool(value)
        if base is int:
            return int(value, 10)
        if base is float:
            return float(value)
        return str(value)
    except ValueError:
        pass
    raise UserError(f"{origin} expects {base.__name__}, got {value!r}",
                    hint="python -m ds_gpt.train --help lists every option and its type")


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
            values[key] = _coerce(key, value, types[key], f"config file {path}: {key}", typed=True)
    ns.pop("local_rank", None)
    for key, value in ns.items():
        values[key] = _coerce(key, value, types[key], f"--{key}")
    _apply_model_preset(values)
    cfg = TrainConfig(**values, explicit=frozenset(values))
    validate(cfg)
    return cfg


def _apply_model_preset(values: dict[str, Any]) -> None:
    """--model NAME fills in the shape flags the user left out. They count as set by the user,
    so a checkpoint of another shape is refused on resume, not silently adopted."""
    if values.get("model") is None:
        return
    values["model"] = presets.canonical(values["model"])
    for key, value in presets.MODELS[values["model"]]._asdict().items():
        values.setdefault(key, value)


def validate(cfg: TrainConfig) -> None:
    """Collect every problem with the options and report them together, once."""
    problems = []
    # nan and inf parse as floats (from the CLI and from TOML) but poison whatever they touch.
    floats = [f.name for f in dataclasses.fields(TrainConfig) if _base_type(_field_types()[f.name]) is float]
    nonfinite = {name for name in floats if getattr(cfg, name) is not None and not math.isfinite(getattr(cfg, name))}
    problems += [f"{name} must be a finite number (got {getattr(cfg, name)})" for name in floats if name in nonfinite]

    def known(name: str) -> bool:  # set, and finite: range checks make sense
        return getattr(cfg, name) is not None and name not in nonfinite

    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "max_iters", "eval_iters",
                 "log_interval", "eval_interval", "checkpoint_interval", "pg_timeout"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name} must be positive (got {getattr(cfg, name)})")
    if cfg.pg_timeout > MAX_PG_TIMEOUT:
        problems.append(f"pg_timeout must be at most {MAX_PG_TIMEOUT} s, a week (got {cfg.pg_timeout})")
    if cfg.n_head > 0 and cfg.n_embd % cfg.n_head:
        problems.append(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
    if known("dropout") and not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"dropout must be in [0, 1) (got {cfg.dropout})")
    for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
        if known(name) and getattr(cfg, name) < 0:
            problems.append(f"{name} must be >= 0 (got {getattr(cfg, name)})")
    # The cosine decays from learning_rate down to min_lr. Unchecked: learning_rate None (the
    # JSON's value, read later), and 0, which keeps the weights as loaded through the warmup.
    if cfg.decay_lr and known("learning_rate") and known("min_lr") and 0 < cfg.learning_rate < cfg.min_lr:
        problems.append(f"min_lr ({cfg.min_lr}) must not exceed learning_rate ({cfg.learning_rate}): "
                        "lower --min_lr with it (nanoGPT uses learning_rate / 10)")
    if known("peak_tflops") and cfg.peak_tflops <= 0:
        problems.append(f"peak_tflops must be positive (got {cfg.peak_tflops})")
    if not 0 <= cfg.seed < 2**32:  # numpy's and DeepSpeed's seeds are 32-bit unsigned
        problems.append(f"seed must be in [0, 2**32) (got {cfg.seed})")
    if cfg.zero_stage is not None and cfg.zero_stage not in ZERO_STAGES:
        problems.append(f"zero_stage must be one of 0, 1, 2, 3 (got {cfg.zero_stage})")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)} (got {cfg.dtype})")
    if cfg.on_nan not in ("stop", "skip"):
        problems.append(f"on_nan must be stop or skip (got {cfg.on_nan})")
    if cfg.warmup_iters < 0 or cfg.lr_decay_iters < cfg.warmup_iters:
        problems.append(f"need 0 <= warmup_iters ({cfg.warmup_iters}) <= lr_decay_iters ({cfg.lr_decay_iters})")
    if known("cooldown_frac") and not 0.0 < cfg.cooldown_frac <= 1.0:
        problems.append(f"cooldown_frac must be in (0, 1] (got {cfg.cooldown_frac})")
    if cfg.hellaswag_interval is not None and cfg.hellaswag_interval < 0:
        problems.append(f"hellaswag_interval must be >= 0, 0 for off (got {cfg.hellaswag_interval})")
    if cfg.keep_last < 1:
        problems.append(f"keep_last must be at least 1 (got {cfg.keep_last})")
    if cfg.milestone_every < 0:
        problems.append(f"milestone_every must be >= 0, 0 for none (got {cfg.milestone_every})")
    try:
        cfg.milestone_set()
    except ValueError:
        problems.append(f"milestones must be comma-separated integers (got {cfg.milestones!r})")
    for name in ("micro_batch_size", "gradient_accumulation_steps", "global_batch_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            problems.append(f"{name} must be positive (got {getattr(cfg, name)})")
    if problems:
        raise UserError("; ".join(problems), hint="python -m ds_gpt.train --help lists every option and its default")


MODEL_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


def model_args(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in MODEL_KEYS}
