"""Sample from a trained model, as nanoGPT's sample.py: no launcher, CPU or GPU, any ZeRO stage.

    python -m ds_gpt.sample --out_dir out/gpt2-124m --start "Joe Biden and Donald Trump" \
        --num_samples 1 --max_new_tokens 50 --temperature 0.01
    python -m ds_gpt.sample --out_dir out/demo --start FILE:prompt.txt --tag global_step300
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ds_gpt import checkpoint, tokenizer
from ds_gpt.errors import UserError, run_cli
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
        path = Path(start.removeprefix("FILE:"))
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"--start {start}: file {path} not found") from None
    return start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds_gpt.sample", description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", required=True, help="run directory with checkpoints")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step10000 (default: newest complete)")
    p.add_argument("--start", default="\n", help='prompt text, or FILE:path to read it from a file')
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.8, help="<1 sharper, >1 more random; 0.01 ~ greedy")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.temperature <= 0:
        raise UserError("--num_samples and --max_new_tokens must be positive and --temperature > 0")

    torch.manual_seed(args.seed)
    model, which = load_model(args.out_dir, args.tag, args.device)
    ids = tokenizer.encode(read_prompt(args.start))
    if not ids:
        raise UserError("--start is empty after tokenization")
    vocab = model.config.vocab_size
    if max(ids) >= vocab:
        raise UserError(f"the prompt has token id {max(ids)} but the model's vocab_size is {vocab}: "
                        "it was not trained on GPT-2 tokens")
    x = torch.tensor(ids, dtype=torch.long, device=args.device)[None, :]
    print(f"# {args.out_dir} at {which}", flush=True)
    for _ in range(args.num_samples):
        y = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           vocab_limit=min(vocab, tokenizer.VOCAB_SIZE))
        print(tokenizer.decode(y[0].tolist()))
        print("---------------", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.sample")
