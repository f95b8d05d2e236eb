"""checkpoint: what saving and verifying a checkpoint cost, for a GPT-2 size, on this machine.

One rank builds the model's DeepSpeed engine (ZeRO-1 by default), saves it through the trainer's
Checkpointer (shards, per-file sha256 in the completion marker, pointer) and then verifies it as
a resume does (sizes, then every checksum). Reported: bytes, the save's time and the part of it
spent on checksums, and the verification's time.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ds_gpt.bench.common import add_json_arg, write_json
from ds_gpt.config import positive_int

SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


def add_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="time to save and to verify a checkpoint of a GPT-2 size")
    p.add_argument("--model", default="124M", help="124M | 350M | 774M | 1558M (GPT-2's shapes)")
    p.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), default=1, help="ZeRO stage of the engine saved")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="precision of the engine")
    for flag in SHAPE_FLAGS:
        p.add_argument(f"--{flag}", type=positive_int, help="override the preset's shape (small test models)")
    p.add_argument("--dir", type=Path, help="where to write the checkpoint (default: a temporary directory)")
    add_json_arg(p)
    p.set_defaults(func=bench_checkpoint)


def model_label(model: str, overrides: list[str]) -> str:
    """"GPT-2 124M", or what the shape flags made of it: no GPT-2 size's name on a test-sized model."""
    if not overrides:
        return f"GPT-2 {model}"
    return f"GPT-2 {model}'s shape with {' '.join(flag.lstrip('-') for flag in overrides)}"


def bench_checkpoint(args: argparse.Namespace) -> None:
    from ds_gpt import collectives
    from ds_gpt import engine as ds_engine
    from ds_gpt.checkpoint import Checkpointer, CheckpointInfo, damage, read_marker, tag_files
    from ds_gpt.config import parse_args
    from ds_gpt.fileset import file_digest
    from ds_gpt.model import GPT, GPTConfig
    from ds_gpt.run_config import resolve

    ds_engine.init_distributed(timeout_s=600)
    with tempfile.TemporaryDirectory(prefix="ds_gpt-bench-", dir=args.dir) as tmp:
        out = Path(tmp)
        shape = [f"--{flag}={getattr(args, flag)}" for flag in SHAPE_FLAGS if getattr(args, flag) is not None]
        cfg = parse_args([f"--model={args.model}", f"--zero_stage={args.zero_stage}", f"--dtype={args.dtype}",
                          f"--out_dir={out}", "--micro_batch_size=1", "--gradient_accumulation_steps=1", *shape])
        run = resolve(cfg, 1, cuda=False)
        model = GPT(GPTConfig(**run.model))
        n_params = model.num_params(non_embedding=False)
        eng = ds_engine.build_engine(model, run)
        ckpt = Checkpointer(eng, out, rank=0, world_size=1, collectives=collectives.of_process_group(), interval=1,
                            keep_last=10, milestones=set(), milestone_every=0, client_state=lambda: {},
                            marker={"model_args": run.model, "world_size": 1, "zero_stage": run.zero_stage,
                                    "dtype": run.dtype})
        ckpt.save(1)  # warms the file system and DeepSpeed's save path up
        t0 = time.perf_counter()
        tag = ckpt.save(2)
        timings = {"save_s": time.perf_counter() - t0}
        t0 = time.perf_counter()
        for name in tag_files(out / tag):  # what the save spent recording sizes and checksums
            file_digest(out / tag / name)
        timings["checksums_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        problem = damage(out, CheckpointInfo(tag, 2, read_marker(out, tag)))
        timings["verify_s"] = time.perf_counter() - t0
        size = sum((out / tag / name).stat().st_size for name in tag_files(out / tag))
    assert problem is None, problem
    print(f"checkpoint benchmark: {model_label(args.model, shape)} ({n_params / 1e6:.1f}M params), "
          f"ZeRO-{args.zero_stage} {args.dtype}, 1 rank: {size / 2**30:.2f} GiB per checkpoint")
    print(f"  save {timings['save_s']:.2f} s, of which checksums {timings['checksums_s']:.2f} s; "
          f"verify on resume {timings['verify_s']:.2f} s")
    write_json(args.json, "checkpoint", {"setting": {"model": model_label(args.model, shape), "model_args": run.model,
                                                     "zero_stage": args.zero_stage, "dtype": args.dtype,
                                                     "world_size": 1},
                                         "n_params": n_params, "bytes": size, **timings})
    ds_engine.shutdown()
