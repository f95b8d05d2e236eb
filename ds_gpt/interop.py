"""Weights in and out: nanoGPT's ckpt.pt, Hugging Face GPT-2 directories, OpenAI's GPT-2.

Our GPT uses nanoGPT's parameter names exactly, so nanoGPT is a rename-free mapping:
  - torch.compile'd nanoGPT models save keys with an `_orig_mod.` prefix: stripped on import;
  - nanoGPT's non-flash attention registers a causal-mask buffer `transformer.h.N.attn.bias`:
    dropped on import (we always use SDPA's causal kernel) and never written on export, because
    nanoGPT on torch >= 2.0 takes the flash path and has no such buffer to load strictly.
Hugging Face's GPT2LMHeadModel has the same names under the same `transformer.` prefix, but:
  - c_attn, c_proj and c_fc are `Conv1D` layers whose weights are stored [in, out], the
    transpose of nn.Linear's [out, in];
  - the vocabulary is GPT-2's 50257, while we pad to 50304 (a multiple of 64) for fast matmuls.
    Import pads with the mean embedding row (as transformers' resize_token_embeddings does), so
    the never-seen padding ids start with an average logit instead of 0, which would outrank
    every real token of GPT-2, whose logits are mostly negative. Export trims the padding;
  - `attn.bias` / `attn.masked_bias` there are mask buffers, not weights: ignored;
  - OpenAI's checkpoints use the tanh GELU ("gelu_new"); we run the exact GELU, as nanoGPT's
    from_pretrained does (the difference is below 1e-3 per activation). Export writes
    activation_function "gelu", so transformers runs our weights exactly as we do.

transformers is an optional extra (`make setup EXTRAS=hf`), imported only to read HF weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ds_gpt import safe_load
from ds_gpt.errors import UserError
from ds_gpt.model import GPT, GPTConfig
from ds_gpt.presets import GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE

NANOGPT_PREFIX = "nanogpt:"
OPENAI_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_INSTALL_HINT = "make setup EXTRAS=hf  (installs requirements-hf.txt: transformers)"


@dataclass
class StartWeights:
    """Weights to start a run from, in our GPT's terms, and where they came from."""

    model_args: dict  # GPTConfig fields; the run adopts them (run_config.adopt_model_args)
    state_dict: dict[str, torch.Tensor]  # our GPT's keys, fp32
    source: str
    iter_num: int = 0
    optimizer_state: dict | None = None  # nanoGPT's torch AdamW state_dict, for --resume_optimizer
    best_val_loss: float | None = None


# ---------------------------------------------------------------------------------------------
# checks shared by every source


MODEL_ARGS_HINT = ("model_args must give the GPT's shape (n_layer, n_head, n_embd, block_size, vocab_size, bias) "
                   "of its weights, as the training script wrote it: use a whole, unedited checkpoint")


def _config_from(model_args: dict, source: str) -> GPTConfig:
    if not isinstance(model_args, dict):
        raise UserError(f"{source}: model_args is {type(model_args).__name__}, not a dict", hint=MODEL_ARGS_HINT)
    names = {f.name for f in fields(GPTConfig)}
    missing = sorted(n for n in names - set(model_args) if n != "dropout")
    if missing:
        raise UserError(f"{source}: model_args lacks {', '.join(missing)}", hint=MODEL_ARGS_HINT)
    bad = [n for n in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
           if not isinstance(model_args[n], int) or isinstance(model_args[n], bool) or model_args[n] < 1]
    if bad:
        raise UserError(f"{source}: model_args has no positive integer {', '.join(bad)}", hint=MODEL_ARGS_HINT)
    return GPTConfig(**{k: v for k, v in model_args.items() if k in names})


def check_state_dict(model_args: dict, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Every key and shape of GPT(model_args), nothing more, or a UserError listing what differs."""
    with torch.device("meta"):  # shapes only: no memory, no init time even for gpt2-xl
        want = {k: tuple(v.shape) for k, v in GPT(_config_from(model_args, source)).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = [f"{k} has shape {have[k]}, model_args imply {want[k]}"
                for k in want if k in have and have[k] != want[k]]
    problems += [f"missing {k}" for k in want if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
        raise UserError(f"{source}: weights do not fit model_args {model_args}: {shown}", hint=MODEL_ARGS_HINT)


def _fp32(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------
# nanoGPT


def from_nanogpt_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nanoGPT's model state_dict -> ours: strip `_orig_mod.`, drop the causal-mask buffers."""
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("_orig_mod.")
        if not k.endswith(".attn.bias"):
            out[k] = v
    return out


def load_nanogpt(path: str | os.PathLike) -> StartWeights:
    """Read nanoGPT's ckpt.pt (model, optimizer, model_args, iter_num, best_val_loss, config)."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise UserError(f"no nanoGPT checkpoint at {path}", hint="--init_from nanogpt:OUT_DIR/ckpt.pt")
    ckpt = safe_load.load(path)  # a checkpoint is data, never code to run
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not a nanoGPT checkpoint: it needs the keys 'model' and 'model_args'",
                        hint="give the ckpt.pt that nanoGPT's train.py wrote: --init_from nanogpt:OUT_DIR/ckpt.pt")
    source = f"{NANOGPT_PREFIX}{path}"
    model_args = _config_from(ckpt["model_args"], source).to_dict()
    state_dict = _fp32(from_nanogpt_state_dict(ckpt["model"]))
    check_state_dict(model_args, state_dict, source)
    best = ckpt.get("best_val_loss")
    return StartWeights(
        model_args=model_args,
        state_dict=state_dict,
        iter_num=int(ckpt.get("iter_num", 0)),
        optimizer_state=ckpt.get("optimizer"),
        best_val_loss=None if best is None else float(best),
        source=source,
    )


def nanogpt_checkpoint(state_dict: dict[str, torch.Tensor], model_args: dict, *, iter_num: int = 0,
                       best_val_loss: float | None = None, config: dict | None = None,
                       optimizer: dict | None = None) -> dict:
    """The dict nanoGPT's train.py saves, from our weights. nanoGPT's sample.py/model.py load it
    strictly: same keys, lm_head.weight tied to transformer.wte.weight, no mask buffers."""
    check_state_dict(model_args, state_dict, "export")
    model = {k: v.detach().to("cpu", torch.float32) for k, v in state_dict.items()}
    model["lm_head.weight"] = model["transformer.wte.weight"]  # one tensor, saved once, as nanoGPT's
    ckpt = {
        "model": model,
        "model_args": dict(model_args),
        "iter_num": int(iter_num),
        "best_val_loss": float("inf") if best_val_loss is None else float(best_val_loss),
        "config": dict(config or {}),
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer
    return ckpt


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT2LMHeadModel


def from_hf_state_dict(hf: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel state_dict -> ours: transpose Conv1D weights, pad the vocabulary."""
    out = {}
    for k, v in hf.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # mask buffers
        k = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k  # bare GPT2Model
        out[k] = v.t().contiguous() if k.endswith(CONV1D_WEIGHTS) else v
    wte = out["transformer.wte.weight"]
    if vocab_size < wte.size(0):
        raise UserError(f"vocab_size {vocab_size} is smaller than the source's {wte.size(0)}")
    if vocab_size > wte.size(0):
        pad = wte.mean(dim=0, keepdim=True).expand(vocab_size - wte.size(0), -1)
        wte = torch.cat([wte, pad])
    out["transformer.wte.weight"] = wte
    out["lm_head.weight"] = wte  # tied, whatever the source saved
    return _fp32(out)


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], model_args: dict,
                     hf_vocab_size: int) -> dict[str, torch.Tensor]:
    """Ours -> HF GPT2LMHeadModel tensors (contiguous, unshared, as safetensors needs).

    lm_head.weight is left out: HF ties it to transformer.wte.weight, as save_pretrained does.
    A bias=False model gets zero biases, which compute the same thing (HF GPT-2 always has them).
    """
    if not 1 <= hf_vocab_size <= model_args["vocab_size"]:
        raise UserError(f"--hf_vocab_size {hf_vocab_size} is not between 1 and the model's vocab_size "
                        f"{model_args['vocab_size']}", hint=f"leave it out to keep {GPT2_VOCAB_SIZE} rows of a padded "
                        "GPT-2 vocabulary (all rows of any other)")
    out = {}
    for k, v in state_dict.items():
        if k == "lm_head.weight":
            continue
        v = v.detach().to("cpu", torch.float32)
        if k == "transformer.wte.weight":
            v = v[:hf_vocab_size]
        out[k] = (v.t() if k.endswith(CONV1D_WEIGHTS) else v).contiguous().clone()
    if not model_args["bias"]:
        with torch.device("meta"):
            ref = GPT(_config_from({**model_args, "bias": True}, "export")).state_dict()
        for k, v in ref.items():
            if k.endswith(".bias") and k not in out:
                out[k] = torch.zeros(v.shape)
    return out


def hf_config(model_args: dict, hf_vocab_size: int) -> dict:
    """config.json for GPT2LMHeadModel, for the fields that decide what the model computes."""
    eos = GPT2_VOCAB_SIZE - 1 if hf_vocab_size > GPT2_VOCAB_SIZE - 1 else None  # <|endoftext|>
    p = float(model_args.get("dropout", 0.0))
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": hf_vocab_size,
        "n_positions": model_args["block_size"],
        "n_embd": model_args["n_embd"],
        "n_layer": model_args["n_layer"],
        "n_head": model_args["n_head"],
        "n_inner": None,  # 4 * n_embd, as our MLP
        "activation_function": "gelu",  # exact erf GELU, our nn.GELU()
        "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "dtype": "float32",
    }


def _model_args_from_hf(cfg, vocab_size: int, source: str) -> dict:
    """GPTConfig fields from a transformers GPT2Config, refusing variants our GPT cannot run."""
    problems = []
    if cfg.model_type != "gpt2":
        problems.append(f"model_type {cfg.model_type!r} (need 'gpt2')")
    if cfg.n_inner not in (None, 4 * cfg.n_embd):
        problems.append(f"n_inner {cfg.n_inner} (need 4 * n_embd)")
    if cfg.activation_function not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {cfg.activation_function!r}")
    if abs(cfg.layer_norm_epsilon - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon {cfg.layer_norm_epsilon} (need 1e-5)")
    if not cfg.scale_attn_weights or cfg.scale_attn_by_inverse_layer_idx:
        problems.append("non-standard attention scaling")
    if not getattr(cfg, "tie_word_embeddings", True):
        problems.append("untied lm_head")
    if problems:
        raise UserError(f"{source}: not a GPT-2 our model can run: " + "; ".join(problems))
    return GPTConfig(block_size=cfg.n_positions, vocab_size=vocab_size, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=True).to_dict()


def load_hf(name_or_dir: str, *, vocab_size: int = PADDED_VOCAB_SIZE) -> StartWeights:
    """OpenAI's GPT-2 by name (HF cache first, then the hub) or any local HF GPT-2 directory."""
    try:
        import transformers
    except ImportError as err:
        raise UserError(f"--init_from {name_or_dir} needs the optional transformers package",
                        hint=HF_INSTALL_HINT) from err
    from huggingface_hub import is_offline_mode

    transformers.logging.set_verbosity_error()
    local = Path(name_or_dir).is_dir()
    source = str(Path(name_or_dir).resolve()) if local else name_or_dir
    attempts = [True] if local or is_offline_mode() else [True, False]
    err: Exception | None = None
    for local_only in attempts:  # the cache first: no network round trip when it is there
        try:  # a pytorch_model.bin is a pickle: read as data only, whatever transformers' defaults
            with safe_load.weights_only_loads(f"a weights file of {source}"):
                hf = transformers.GPT2LMHeadModel.from_pretrained(name_or_dir, dtype=torch.float32,
                                                                  local_files_only=local_only)
            break
        except (OSError, ValueError) as e:  # not cached / no network / not a model dir
            err = e
    else:
        where = "a directory with config.json and model.safetensors" if local else "the Hugging Face cache or hub"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__  # one line of many
        hint = None if local else (f"offline, fetch it elsewhere with `hf download openai-community/{name_or_dir} "
                                   "--local-dir DIR`, then --init_from DIR")
        raise UserError(f"cannot load GPT-2 weights {name_or_dir!r} from {where}: {reason}", hint=hint)
    if vocab_size < hf.config.vocab_size:
        raise UserError(f"{source}: its vocab_size {hf.config.vocab_size} exceeds the requested {vocab_size}")
    model_args = _model_args_from_hf(hf.config, vocab_size, source)
    state_dict = from_hf_state_dict(hf.state_dict(), vocab_size)
    check_state_dict(model_args, state_dict, source)
    return StartWeights(model_args=model_args, state_dict=state_dict, source=source)


def load_init_weights(spec: str, *, vocab_size: int = PADDED_VOCAB_SIZE) -> StartWeights:
    """Weights for `--init_from SPEC`: "nanogpt:PATH/ckpt.pt", "gpt2[-medium|-large|-xl]", or
    a local HF GPT-2 directory. `vocab_size` is the padded size HF/OpenAI weights are extended
    to; a nanoGPT checkpoint keeps its own (its optimizer state is shaped by it)."""
    if spec.startswith(NANOGPT_PREFIX):
        return load_nanogpt(spec[len(NANOGPT_PREFIX):])
    if spec in OPENAI_MODELS or Path(spec).is_dir():
        return load_hf(spec, vocab_size=vocab_size)
    raise UserError(f"--init_from {spec!r}: not a known source",
                    hint=f"use nanogpt:PATH/ckpt.pt, one of {', '.join(OPENAI_MODELS)}, or a HF model directory")
