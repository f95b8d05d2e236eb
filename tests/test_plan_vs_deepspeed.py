"""The planner's memory and communication models against DeepSpeed itself, on real CPU ranks.

tests/plan_worker.py builds a real engine for each case (ZeRO stage, precision, flags) inside
one launch per world size, trains two iterations, and records on every rank what the engine
holds (ds_gpt.accounting.state_bytes_per_rank, before the second iteration's optimizer step) and
what it passes to deepspeed.comm over that iteration (CommBytesCounter, from DeepSpeed's comms
logger). Each figure must match ds_gpt.plan_memory / plan_comm within 2%. The first case of each
process also counts every tensor alive in the process, so that state_bytes_per_rank is known to
miss nothing.
"""
from __future__ import annotations

import json
import os

import pytest
from helpers import forked_script

from ds_gpt.plan_comm import message_bytes
from ds_gpt.plan_memory import Setup, gpt_layout, state_bytes

# First case per world: the one whose every live tensor is counted too.
CASES = {
    1: ["fp32:0:b", "fp32:1", "fp32:2", "fp32:3"],
    2: ["bf16:3:rc", "fp32:0", "fp32:1:b", "fp32:2", "fp32:3"],
    4: ["bf16:1", "fp32:0", "fp32:1", "fp32:2:b", "fp32:3"],
}
TOLERANCE = 0.02
SCALARS = 64  # bytes: the gradient-norm and overflow all-reduces the model leaves out


def run_worker(world: int, out_dir) -> list[dict]:
    """plan_worker.py's ranks, forked (helpers.forked_script), one thread each: they share two cores."""
    import plan_worker

    forked_script(world, plan_worker.main, str(out_dir), *CASES[world], log_dir=out_dir / "logs",
                  env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    rows = [json.loads(line) for rank in range(world)
            for line in (out_dir / f"rank{rank}.jsonl").read_text().splitlines()]
    assert len(rows) == world * len(CASES[world])
    return rows


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda w: f"world{w}")
def measured(request, tmp_path_factory) -> list[dict]:
    return run_worker(request.param, tmp_path_factory.mktemp(f"world{request.param}"))


def setup_for(row: dict) -> Setup:
    from plan_worker import MODEL

    layout = gpt_layout(MODEL["n_layer"], MODEL["n_embd"], MODEL["vocab_size"], MODEL["block_size"], row["bias"])
    return Setup(layout, row["world"], row["stage"], row["dtype"], zero=row["zero"])


@pytest.mark.slow
def test_state_bytes_match_deepspeed(measured):
    for row in measured:
        predicted = state_bytes(setup_for(row), row["rank"])
        assert predicted["cpu"] == {"params": 0, "grads": 0, "optimizer": 0}
        for key, value in row["state"].items():
            assert predicted["gpu"][key] == pytest.approx(value, rel=TOLERANCE), (row["case"], row["rank"], key)


@pytest.mark.slow
def test_comm_bytes_match_deepspeed_logger(measured):
    from plan_worker import GRAD_ACCUM

    for row in measured:
        predicted = message_bytes(setup_for(row), GRAD_ACCUM, row["checkpointing"])
        assert row["comm"]["other"] == 0, row["case"]
        for op, value in predicted.items():
            assert abs(row["comm"][op] - value) <= TOLERANCE * value + SCALARS, (row["case"], row["rank"], op)
        assert row["comm"]["total"] > 0


@pytest.mark.slow
def test_state_bytes_miss_no_tensor(measured):
    """Every storage alive on the rank is one state_bytes_per_rank counted (the first case of a process)."""
    first = [row for row in measured if row["live_bytes"] is not None]
    assert len(first) == first[0]["world"]
    for row in first:
        assert sum(row["state"].values()) == pytest.approx(row["live_bytes"], rel=0.01), row["case"]
