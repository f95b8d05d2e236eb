"""Sample from a trained model, as nanoGPT's sample.py: no launcher, CPU or GPU, any ZeRO stage.

    python -m ds_gpt.sample --out_dir out/gpt2-124m --start "Joe Biden and Donald Trump" \
        --num_samples 1 --max_new_tokens 50 --temperature 0.01
    python -m ds_gpt.sample --out_dir out/demo --start FILE:prompt.txt --tag global_step300
"""
from __future__ import annotations

import argparse
import math

import torch

from ds_gpt import atomic, checkpoint, tokenizer
from ds_gpt.errors import ArgumentParser, UserError, run_cli
from ds_gpt.model import GPT, GPTConfig


def load_model(out_dir: str, tag: str | None, device: str) -> tuple[GPT, str]:
    """The model of a checkpoint (the newest complete one unless `tag`), in eval mode."""
    state_dict, client = checkpoint.load_fp32_state_dict(out_dir, tag)
    if "model_args" not in client:
        raise UserError(f"{out_dir}: the checkpoint carries no model_args; was it written by ds_gpt.train?")
    model = GPT(GPTConfig(**client["model_args"]))
    model.load_state_dict(state_dict)
    return model.to(device).eval(), f"iteration {client.get('iter_num', '?')}"


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        name = start.removeprefix("FILE:")
        if not name:
            raise UserError("--start FILE: names no file", hint="e.g. --start FILE:prompt.txt")
        try:
            return atomic.read_text(name, "--start")
        except FileNotFoundError:
            raise UserError(f"--start {start}: file {name} not found") from None
    return start


def check_options(args: argparse.Namespace) -> None:
    """Every problem with the sampling options, reported together before the model is loaded."""
    problems = [f"--{name} must be >= 1 (got {getattr(args, name)})"
                for name in ("num_samples", "max_new_tokens") if getattr(args, name) < 1]
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        problems.append(f"--temperature must be a finite number >= 0, 0 meaning greedy (got {args.temperature})")
    if args.top_k is not None and args.top_k < 0:
        problems.append(f"--top_k must be >= 1, or 0 for no limit (got {args.top_k})")
    if not 0 <= args.seed < 2**32:
        problems.append(f"--seed must be in [0, 2**32) (got {args.seed})")
    if problems:
        raise UserError("; ".join(problems))
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a torch device", hint="e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available here", hint="--device cpu")


def sampling(temperature: float, top_k: int | None) -> dict:
    """GPT.generate's temperature and top_k for ours: temperature 0 is greedy (keep only the most
    likely token), and top_k 0 means no limit."""
    if temperature == 0:
        return {"temperature": 1.0, "top_k": 1}
    return {"temperature": temperature, "top_k": top_k or None}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="ds_gpt.sample", description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", required=True, help="run directory with checkpoints")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step10000 (default: newest complete)")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file "
                                                 "(default: a newline, as nanoGPT's sample.py)")
    p.add_argument("--num_samples", type=int, default=1, help="samples to draw, one after another")
    p.add_argument("--max_new_tokens", type=int, default=50, help="tokens generated per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="<1 sharper, >1 more random; 0 greedy")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens only; 0: no limit "
                                                           "(default: no limit)")
    p.add_argument("--seed", type=int, default=1337, help="torch's seed: the same seed, the same samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs: cpu, cuda, cuda:1 ... (default: cuda where there is a GPU, else cpu)")
    args = p.parse_args(argv)
    check_options(args)
    prompt = read_prompt(args.start)  # before the (slow) model load

    torch.manual_seed(args.seed)
    model, which = load_model(args.out_dir, args.tag, args.device)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError("--start is empty after tokenization")
    vocab = model.config.vocab_size
    if max(ids) >= vocab:
        raise UserError(f"the prompt has token id {max(ids)} but the model's vocab_size is {vocab}: "
                        "it was not trained on GPT-2 tokens")
    x = torch.tensor(ids, dtype=torch.long, device=args.device)[None, :]
    print(f"# {args.out_dir} at {which}", flush=True)
    for _ in range(args.num_samples):
        y = model.generate(x, args.max_new_tokens, **sampling(args.temperature, args.top_k),
                           vocab_limit=min(vocab, tokenizer.VOCAB_SIZE))
        print(tokenizer.decode(y[0].tolist()))
        print("---------------", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.sample")
