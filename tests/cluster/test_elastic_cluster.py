"""A job that checkpointed on two nodes, resubmitted on one, continues the same loss curve.

The local two-node SLURM cluster, both launch modes of slurm/ds_train.sh: the deepspeed launcher
(DS_GPT_LAUNCH unset) and srun. The two-node half is the session's staged run of that mode
(conftest.py: 2 ranks, 6 iterations, checkpoints at 3 and 6), copied to a run directory of this
test's own; the resubmitted job (`--nodes=1`, one rank, accumulation 2 so the global batch stays
4) resumes from iteration 6 with ds_train.sh's --init_from auto, converting the checkpoint for
its layout. Its losses are compared with an uninterrupted one-process run outside SLURM.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cluster_jobs import SBATCH_TINY, STAGED_ITERS, TINY, job_env, sbatch, tail, train_iters, wait_job
from helpers import PYTHON, REPO_ROOT, free_port, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

RESUMED_AT, MAX_ITERS = 6, 9  # the staged run's last checkpoint; the one-node job trains 3 more
ONE_NODE = [a for a in SBATCH_TINY if not a.startswith("--nodes=")] + ["--nodes=1"]
ITERS = [*STAGED_ITERS, "--max_iters", str(MAX_ITERS)]  # the last --max_iters wins


def train_losses(out: Path) -> dict[int, float]:
    return {e["iter"]: e["loss"] for e in read_jsonl(out / "metrics.jsonl") if "loss" in e and "event" not in e}


@pytest.fixture(scope="module")
def uninterrupted(meta_data, tmp_path_factory) -> dict[int, float]:
    """The same iterations in one process, no SLURM: the curve every layout must follow."""
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.train", "--deepspeed_config", "ds_configs/zero1.json",
                           "--data_dir", str(meta_data), "--out_dir", str(out), *TINY, *ITERS,
                           "--gradient_accumulation_steps", "2"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={**job_env(), "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train_losses(out)


@pytest.mark.parametrize("mode", ["deepspeed", "srun"])
def test_two_node_checkpoint_resumes_on_one_node(staged_runs, meta_data, uninterrupted, tmp_path, mode):
    (_, info, two_node_out, log), _ = staged_runs(mode)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    out = tmp_path / "out"
    shutil.copytree(two_node_out, out, symlinks=True)  # the shared run stays as other tests read it
    marker = json.loads((out / f"global_step{RESUMED_AT}" / "ds_gpt_complete.json").read_text())
    assert (marker["world_size"], marker["zero_stage"]) == (2, 1)

    env = job_env(DATA_DIR=str(meta_data), OUT_DIR=str(out), **({"DS_GPT_LAUNCH": "srun"} if mode == "srun" else {}))
    second_log = tmp_path / "second.out"
    second = sbatch([*ONE_NODE, f"--output={second_log}", "slurm/ds_train.sh", *TINY, *ITERS,
                     "--gradient_accumulation_steps", "2"], env)
    info = wait_job(second, second_log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(second_log)
    events = read_jsonl(out / "metrics.jsonl")
    starts = [e for e in events if e.get("event") == "start"]
    assert [(s["world_size"], s["resumed_from"]) for s in starts] == [(2, None), (1, f"global_step{RESUMED_AT}")]
    (change,) = [e for e in events if e.get("event") == "layout_change"]
    assert (change["from"]["world_size"], change["to"]["world_size"], change["converted"]) == (2, 1, True)
    assert json.loads((out / "config.json").read_text())["world_size"] == 1
    assert train_iters(out) == list(range(MAX_ITERS))
    curve = train_losses(out)
    for i in range(MAX_ITERS):  # 2 ranks then 1: the same global batches, so the same curve
        assert abs(curve[i] - uninterrupted[i]) <= 1e-6 * abs(uninterrupted[i]), (i, curve[i], uninterrupted[i])
    assert (out / "latest").read_text().strip() == f"global_step{MAX_ITERS}"
    assert os.path.isdir(out / f"global_step{RESUMED_AT}" / "layout_free")
