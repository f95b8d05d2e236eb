"""A job that checkpointed on two nodes, resubmitted on one, continues the same loss curve.

The local two-node SLURM cluster of test_cluster.py (its fixtures and helpers), both launch
modes of slurm/ds_train.sh: the deepspeed launcher (DS_GPT_LAUNCH unset) and srun. The first
job runs 2 ranks to iteration 3 and checkpoints; the resubmitted job (`--nodes=1`, one rank,
accumulation 2 so the global batch stays 4) resumes with ds_train.sh's --init_from auto,
converting the checkpoint for its layout. Its losses are compared with an uninterrupted
one-process run outside SLURM.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import PYTHON, REPO_ROOT, free_port, read_jsonl
from test_cluster import SBATCH_TINY, TINY, cluster, data_dir, job_env, sbatch, tail, train_iters, wait_job  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ITERS = ["--eval_interval", "1000", "--checkpoint_interval", "3"]
ONE_NODE = [a for a in SBATCH_TINY if not a.startswith("--nodes=")] + ["--nodes=1"]


def train_losses(out: Path) -> dict[int, float]:
    return {e["iter"]: e["loss"] for e in read_jsonl(out / "metrics.jsonl") if "loss" in e and "event" not in e}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> dict[int, float]:  # noqa: F811
    """The same 6 iterations in one process, no SLURM: the curve every layout must follow."""
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.train", "--deepspeed_config", "ds_configs/zero1.json",
                           "--data_dir", str(data_dir), "--out_dir", str(out), *TINY, *ITERS, "--max_iters", "6",
                           "--gradient_accumulation_steps", "2"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={**job_env(), "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train_losses(out)


@pytest.mark.parametrize("mode", ["deepspeed", "srun"])
def test_two_node_checkpoint_resumes_on_one_node(cluster, data_dir, uninterrupted, tmp_path, mode):  # noqa: F811
    out = tmp_path / "out"
    env = job_env(DATA_DIR=str(data_dir), OUT_DIR=str(out), **({"DS_GPT_LAUNCH": "srun"} if mode == "srun" else {}))
    first_log, second_log = tmp_path / "first.out", tmp_path / "second.out"
    first = sbatch([*SBATCH_TINY, f"--output={first_log}", "slurm/ds_train.sh", *TINY, *ITERS, "--max_iters", "3"], env)
    info = wait_job(first, first_log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(first_log)
    marker = json.loads((out / "global_step3" / "ds_gpt_complete.json").read_text())
    assert (marker["world_size"], marker["zero_stage"]) == (2, 1)

    second = sbatch([*ONE_NODE, f"--output={second_log}", "slurm/ds_train.sh", *TINY, *ITERS, "--max_iters", "6",
                     "--gradient_accumulation_steps", "2"], env)
    info = wait_job(second, second_log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(second_log)
    events = read_jsonl(out / "metrics.jsonl")
    starts = [e for e in events if e.get("event") == "start"]
    assert [(s["world_size"], s["resumed_from"]) for s in starts] == [(2, None), (1, "global_step3")]
    (change,) = [e for e in events if e.get("event") == "layout_change"]
    assert (change["from"]["world_size"], change["to"]["world_size"], change["converted"]) == (2, 1, True)
    assert json.loads((out / "config.json").read_text())["world_size"] == 1
    assert train_iters(out) == list(range(6))
    curve = train_losses(out)
    for i in range(6):  # 2 ranks then 1: the same global batches, so the same curve
        assert abs(curve[i] - uninterrupted[i]) <= 1e-6 * abs(uninterrupted[i]), (i, curve[i], uninterrupted[i])
    assert (out / "latest").read_text().strip() == "global_step6"
    assert os.path.isdir(out / "global_step3" / "layout_free")
