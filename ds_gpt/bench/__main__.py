"""The `python -m ds_gpt.bench` command line: one subcommand per benchmark."""
from __future__ import annotations

from ds_gpt import bench
from ds_gpt.bench.checkpoint import add_checkpoint
from ds_gpt.bench.gpu import add_gpu
from ds_gpt.bench.loader import add_loader
from ds_gpt.bench.memory import add_memory
from ds_gpt.bench.prepare import add_prepare
from ds_gpt.bench.recipe import add_recipe
from ds_gpt.bench.step import add_step
from ds_gpt.errors import ArgumentParser, run_cli

BENCHES = [add_prepare, add_loader, add_step, add_memory, add_checkpoint, add_recipe, add_gpu]


def main(argv: list[str] | None = None) -> int:
    # ds_gpt's parser: each subcommand's --help shows its defaults, and a usage error is one line.
    parser = ArgumentParser(prog="ds_gpt.bench", description=bench.__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    for add in BENCHES:
        add(sub)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.bench")
