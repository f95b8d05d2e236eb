"""One rank of the planner's check against DeepSpeed: build a real engine per case, train two
iterations, and record what it holds and sends (ds_gpt.accounting) as one JSON line per case.

    deepspeed --num_gpus 2 tests/plan_worker.py OUT_DIR fp32:0 bf16:3:rc ...
    python tests/plan_worker.py OUT_DIR fp32:1          # one rank, no launcher

A case is DTYPE:STAGE[:FLAGS], FLAGS from b (biases), r (stage3_max_reuse_distance 0: gathers
again in the backward), c (full activation checkpointing). Each engine is destroyed before the
next one is built, all in the same processes, so one launch covers every stage.
"""
from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = dict(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=64)
MICRO_BATCH, GRAD_ACCUM = 2, 2
ZERO = {"reduce_bucket_size": 50_000, "allgather_bucket_size": 50_000, "stage3_prefetch_bucket_size": 50_000,
        "stage3_param_persistence_threshold": 100}  # small enough that ZeRO-3 gathers most of this model


def parse_case(case: str) -> dict:
    dtype, stage, *flags = case.split(":")
    flags = flags[0] if flags else ""
    return {"case": case, "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype], "stage": int(stage),
            "bias": "b" in flags, "checkpointing": "full" if "c" in flags else "none",
            "zero": {**ZERO, "stage": int(stage), **({"stage3_max_reuse_distance": 0} if "r" in flags else {})}}


def live_tensor_bytes() -> int:
    """Every tensor storage alive in this process, each once: what state_bytes_per_rank must not miss."""
    import torch

    gc.collect()  # garbage in reference cycles is not held, only not yet freed
    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            st = obj.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def run_case(spec: dict, world: int, check_live: bool) -> dict:
    """`check_live`: also count every tensor alive in the process (meaningful for the first
    engine only: DeepSpeed keeps a few of an engine's tensors after destroy())."""
    import deepspeed
    import torch

    from ds_gpt.accounting import CommBytesCounter, state_bytes_per_rank
    from ds_gpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL, bias=spec["bias"]), activation_checkpointing=spec["checkpointing"])
    ds = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": GRAD_ACCUM,
          "train_batch_size": MICRO_BATCH * GRAD_ACCUM * world, "gradient_clipping": 1.0, "steps_per_print": 10**6,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True, "weight_decay": 0.1}},
          "zero_optimization": spec["zero"], "bf16": {"enabled": spec["dtype"] == "bfloat16"}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.optimizer_param_groups(0.1), config=ds)
    counter = CommBytesCounter()
    x = torch.randint(0, MODEL["vocab_size"], (MICRO_BATCH, MODEL["block_size"]))
    for it in range(2):  # the second iteration is steady: AdamW's state exists, ZeRO-3's trace is complete
        if it == 1:
            counter.start()
        for micro in range(GRAD_ACCUM):
            loss = engine(x, x)[1]
            engine.backward(loss)
            del loss
            if it == 1 and micro == GRAD_ACCUM - 1:
                state = state_bytes_per_rank(engine)
                live = live_tensor_bytes() - x.untyped_storage().nbytes() if check_live else None
            engine.step()
    comm = counter.stop()
    engine.destroy()
    del engine, model
    gc.collect()
    return {**spec, "world": world, "state": state, "live_bytes": live, "comm": comm}


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_dir, cases = Path(argv[0]), argv[1:]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        from helpers import free_port
        os.environ["MASTER_PORT"] = str(free_port())
    import logging

    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    lines = [json.dumps({**run_case(parse_case(c), world, check_live=i == 0), "rank": rank})
             for i, c in enumerate(cases)]
    (out_dir / f"rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
