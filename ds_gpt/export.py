"""Export a run's weights for nanoGPT, Hugging Face transformers, or plain torch.

    python -m ds_gpt.export --out_dir out/gpt2 --format hf --dest hf/gpt2-ours
    python -m ds_gpt.export --out_dir out/gpt2 --tag global_step5000 --format nanogpt --dest ng/
    python -m ds_gpt.export --out_dir out/gpt2 --format fp32 --dest fp32/

The newest complete checkpoint (or --tag), of any ZeRO stage, is consolidated to fp32 by
ds_gpt.checkpoint. What DEST receives:
  nanogpt  ckpt.pt: model, model_args, iter_num, best_val_loss, config, and a fresh AdamW state
           in nanoGPT's layout (the trained moments stay in the DeepSpeed checkpoint), so
           nanoGPT's sample.py loads it and its train.py can resume from it.
  hf       config.json + model.safetensors for GPT2LMHeadModel.from_pretrained(DEST), offline;
           the padded vocab is trimmed to --hf_vocab_size (50257 for our 50304). A model with
           GPT-2's vocabulary also gets GPT-2's tokenizer (vocab.json, merges.txt and their
           configs, built offline by ds_gpt.hf_tokenizer), so AutoTokenizer, pipeline() and
           lm-evaluation-harness load DEST as they load openai-community/gpt2.
  fp32     model.pt: our GPT's plain state_dict (torch.load + GPT.load_state_dict);
           model_args.json: GPTConfig's fields, so GPT(GPTConfig(**json.load(f))) builds the
           model; train_state.json: the iteration and best val loss it was saved at.
DEST is written as a temporary sibling and renamed into place: an interrupted export leaves
no half-written DEST. A non-empty DEST is replaced only with --force. DEST may not be the run
directory, lie inside it (a tag) or hold it, with or without --force.

From a script of your own, `load_export(DEST)` returns a ready GPT from an fp32 or nanogpt export.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ds_gpt import file_modes, safe_load, tokenizer
from ds_gpt.atomic import write_failed
from ds_gpt.checkpoint import load_fp32_state_dict  # the one place that consolidates ZeRO shards
from ds_gpt.config import positive_int
from ds_gpt.errors import ArgumentParser, RawDescriptionHelpFormatter, UserError, run_cli, write_hint, write_reason
from ds_gpt.hf_tokenizer import write_gpt2_tokenizer
from ds_gpt.interop import (
    GPT2_VOCAB_SIZE,
    check_state_dict,
    hf_config,
    load_nanogpt,
    nanogpt_checkpoint,
    to_hf_state_dict,
)
from ds_gpt.model import GPT, GPTConfig
from ds_gpt.optimizer_state import nanogpt_optimizer_state_from

FORMATS = ("nanogpt", "hf", "fp32")
PADDED_GPT2_VOCAB = 50304


def default_hf_vocab_size(vocab_size: int) -> int:
    """GPT-2's 50257 for our padded 50304; any other vocabulary is taken as it is."""
    return GPT2_VOCAB_SIZE if vocab_size == PADDED_GPT2_VOCAB else vocab_size


def _plain(obj):
    """JSON-safe primitives only, so nanoGPT's torch.load(weights_only=True) accepts the file."""
    return json.loads(json.dumps(obj, default=str))


def write_nanogpt(dest: Path, state_dict: dict[str, torch.Tensor], client_state: dict) -> None:
    model_args = client_state["model_args"]
    config = _plain(client_state.get("config") or {})
    # The run's own AdamW settings (our config.json layout), else nanoGPT's defaults.
    params = (config.get("ds_config") or {}).get("optimizer", {}).get("params", {})
    betas = params.get("betas", (0.9, 0.95))
    with torch.device("meta"):  # only the parameter layout is needed for the optimizer groups
        model = GPT(GPTConfig(**model_args))
    optimizer = nanogpt_optimizer_state_from(
        model, learning_rate=float(params.get("lr", 6e-4)), weight_decay=float(params.get("weight_decay", 0.1)),
        betas=(float(betas[0]), float(betas[1])))
    ckpt = nanogpt_checkpoint(state_dict, model_args, iter_num=client_state.get("iter_num", 0),
                              best_val_loss=client_state.get("best_val_loss"), config=config,
                              optimizer=optimizer)
    torch.save(ckpt, dest / "ckpt.pt")


def write_hf(dest: Path, state_dict: dict[str, torch.Tensor], client_state: dict,
             hf_vocab_size: int | None = None) -> None:
    from safetensors.torch import save_file

    model_args = client_state["model_args"]
    vocab = default_hf_vocab_size(model_args["vocab_size"]) if hf_vocab_size is None else hf_vocab_size
    tensors = to_hf_state_dict(state_dict, model_args, vocab)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(hf_config(model_args, vocab), indent=2) + "\n")
    if carries_gpt2_tokenizer(vocab):
        write_gpt2_tokenizer(dest, model_max_length=model_args["block_size"])


def carries_gpt2_tokenizer(hf_vocab_size: int) -> bool:
    """Whether an hf export of this many embedding rows gets GPT-2's tokenizer: any model that
    can read every GPT-2 id. A smaller vocabulary was trained on other ids (a test corpus, a
    tokenizer of the user's own) that GPT-2's tokenizer would only misread."""
    return hf_vocab_size >= tokenizer.VOCAB_SIZE


def write_fp32(dest: Path, state_dict: dict[str, torch.Tensor], client_state: dict) -> None:
    torch.save({k: v.detach().to("cpu", torch.float32) for k, v in state_dict.items()}, dest / "model.pt")
    (dest / "model_args.json").write_text(json.dumps(_plain(client_state["model_args"]), indent=2) + "\n")
    trained = {k: client_state.get(k) for k in ("iter_num", "best_val_loss")}
    (dest / "train_state.json").write_text(json.dumps(_plain(trained), indent=2) + "\n")


def load_export(dest: str | os.PathLike, *, device: str | torch.device = "cpu") -> GPT:
    """A ready GPT (fp32, eval mode) from an fp32 or nanogpt export directory:

        from ds_gpt.export import load_export
        model = load_export("export/demo-fp32")
        ids = model.generate(idx, max_new_tokens=50)

    Nothing is unpickled but tensors (weights_only). An hf export loads with transformers'
    GPT2LMHeadModel.from_pretrained(DEST) instead.
    """
    dest = Path(dest)
    if (dest / "ckpt.pt").is_file():
        weights = load_nanogpt(dest / "ckpt.pt")
        model_args, state_dict = weights.model_args, weights.state_dict
    elif (dest / "model.pt").is_file() and (dest / "model_args.json").is_file():
        try:
            model_args = json.loads((dest / "model_args.json").read_text())
        except ValueError as err:
            raise UserError(f"cannot read {dest / 'model_args.json'}: {err}") from None
        state_dict = safe_load.load(dest / "model.pt")
        model_args = model_args.get("model_args", model_args)  # exports written before the file was flat
        check_state_dict(model_args, state_dict, str(dest))
    else:
        raise UserError(f"{dest} holds no fp32 export (model.pt, model_args.json) and no nanogpt one (ckpt.pt)",
                        hint="python -m ds_gpt.export --out_dir OUT --format fp32 --dest DIR writes one")
    model = GPT(GPTConfig(**model_args))
    model.load_state_dict(state_dict)
    return model.to(device).eval()


def _check_dest(dest: Path, force: bool, out_dir: Path | None = None) -> None:
    if out_dir is not None:  # --force replaces DEST whole: never the run, a tag, or a directory holding them
        run, target = out_dir.resolve(), dest.resolve()
        if target == run or run in target.parents or target in run.parents:
            where = "is" if target == run else "is inside" if run in target.parents else "holds"
            raise UserError(f"--dest {dest} {where} the run directory {out_dir}: an export there could replace "
                            "its checkpoints", hint=f"pick a --dest outside {out_dir} that does not hold it either")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--dest {dest} exists and is not a directory", hint="pick a directory path for --dest")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise UserError(f"--dest {dest} is not empty", hint="pick a new --dest, or add --force to replace it")
    parent = dest.parent  # where the export is staged, then renamed into place
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):  # read-only mounts included
        raise UserError(f"cannot write --dest {dest}: {parent} is not a writable directory",
                        hint="pick a --dest on a writable filesystem")


def export(state_dict: dict[str, torch.Tensor], client_state: dict, fmt: str, dest: str | os.PathLike, *,
           hf_vocab_size: int | None = None, force: bool = False) -> Path:
    """Write `state_dict` (our GPT's keys) in `fmt` to the directory `dest`, atomically."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if "model_args" not in client_state:
        raise UserError("the checkpoint carries no model_args: it was not written by ds_gpt.train")
    check_state_dict(client_state["model_args"], state_dict, "checkpoint")
    dest = Path(dest)
    _check_dest(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        try:
            if fmt == "nanogpt":
                write_nanogpt(tmp, state_dict, client_state)
            elif fmt == "hf":
                write_hf(tmp, state_dict, client_state, hf_vocab_size)
            else:
                write_fp32(tmp, state_dict, client_state)
        except Exception as err:
            if not write_failed(err):  # torch.save reports a full disk as a RuntimeError
                raise
            raise UserError(f"writing --dest {dest} failed: {write_reason(err)}; nothing was replaced",
                            hint=write_hint(err, "free some space there (`df -h` shows how much is left), "
                                                 "or pick another --dest", where="--dest")) from None
        file_modes.as_created(tmp)  # mkdtemp's 0700 and safetensors' 0600 would hide it from a shared group
        old = None
        if dest.exists():  # replace: move the old aside first, so a crash leaves one of the two
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="ds_gpt.export", description=__doc__,
                       formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", required=True, help="the run directory holding the DeepSpeed checkpoints")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step5000 (default: the newest)")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write (see above)")
    p.add_argument("--dest", required=True, help="output directory")
    p.add_argument("--hf_vocab_size", type=positive_int, default=None,
                   help="hf: rows of the embedding to keep (default 50257 for vocab 50304, else all)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --dest")
    args = p.parse_args(argv)
    if not Path(args.out_dir).is_dir():
        what = "is not a directory" if Path(args.out_dir).exists() else "does not exist"
        raise UserError(f"--out_dir {args.out_dir} {what}",
                        hint="pass the run directory, the one holding global_step* checkpoints")
    _check_dest(Path(args.dest), args.force, Path(args.out_dir))  # fail before the (slow) consolidation
    state_dict, client_state = load_fp32_state_dict(args.out_dir, tag=args.tag)
    dest = export(state_dict, client_state, args.format, args.dest,
                  hf_vocab_size=args.hf_vocab_size, force=args.force)
    print(f"exported {args.format} (iter {client_state.get('iter_num', '?')}) to {dest}")
    vocab = args.hf_vocab_size or default_hf_vocab_size(client_state["model_args"]["vocab_size"])
    if args.format == "hf" and not carries_gpt2_tokenizer(vocab):
        print(f"note: no tokenizer written: {vocab} ids cannot hold GPT-2's {tokenizer.VOCAB_SIZE}; "
              f"add the tokenizer the model was trained with to {dest}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.export")
