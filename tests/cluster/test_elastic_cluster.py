"""A job that checkpointed on two nodes, resubmitted on one, continues the same loss curve.

The local two-node SLURM cluster, both launch modes of slurm/ds_train.sh: the deepspeed launcher
(DS_GPT_LAUNCH unset) and srun. The two-node half is the session's staged run of that mode
(conftest.py: 2 ranks, 6 iterations, checkpoints at 3 and 6), copied to a run directory of its
own; the resubmitted job (`--nodes=1`, one rank, accumulation 2 so the global batch stays 4)
resumes from iteration 6 with ds_train.sh's --init_from auto, converting the checkpoint for its
layout. Its losses are compared with an uninterrupted one-process run outside SLURM. The two
modes' one-node jobs take a node each, so they run side by side, with the reference run beside them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
from cluster_jobs import LAUNCH, SBATCH_TINY, STAGED_ITERS, TINY, job_env, sbatch, tail, train_iters, wait_job
from helpers import PYTHON, REPO_ROOT, free_port, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

MODES = ("deepspeed", "srun")
RESUMED_AT, MAX_ITERS = 6, 9  # the staged run's last checkpoint; the one-node job trains 3 more
ONE_NODE = [a for a in SBATCH_TINY if not a.startswith("--nodes=")] + ["--nodes=1"]
ITERS = [*STAGED_ITERS, "--max_iters", str(MAX_ITERS)]  # the last --max_iters wins


def train_losses(out: Path) -> dict[int, float]:
    return {e["iter"]: e["loss"] for e in read_jsonl(out / "metrics.jsonl") if "loss" in e and "event" not in e}


class Resumed(NamedTuple):
    info: dict[str, str]  # the one-node job's scontrol record
    out: Path
    log: Path


@pytest.fixture(scope="module")
def resumed(staged_runs, meta_data: Path, tmp_path_factory) -> tuple[dict[str, Resumed], dict[int, float]]:
    """Each mode's one-node job, resuming a copy of that mode's staged run, and the same iterations
    in one process with no SLURM (the curve every layout must follow), all at once."""
    copies = {}
    for mode in MODES:
        (_, info, two_node_out, two_node_log), _ = staged_runs(mode)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(two_node_log)
        copies[mode] = tmp_path_factory.mktemp(f"resumed_{mode}")
        shutil.copytree(two_node_out, copies[mode] / "out", symlinks=True)  # the shared run stays as others read it
    reference_out = tmp_path_factory.mktemp("reference")
    reference_log = reference_out.parent / f"{reference_out.name}.log"
    with open(reference_log, "w") as log:
        reference = subprocess.Popen(
            [PYTHON, "-m", "ds_gpt.train", "--deepspeed_config", "ds_configs/zero1.json", "--data_dir", str(meta_data),
             "--out_dir", str(reference_out), *TINY, *ITERS, "--gradient_accumulation_steps", "2"],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env={**job_env(), "MASTER_PORT": str(free_port())})
        try:
            jobs = {}
            for mode, where in copies.items():
                out, second_log = where / "out", where / "second.out"
                env = job_env(DATA_DIR=str(meta_data), OUT_DIR=str(out), **LAUNCH[mode])
                job = sbatch([*ONE_NODE, f"--output={second_log}", "slurm/ds_train.sh", *TINY, *ITERS,
                              "--gradient_accumulation_steps", "2"], env)
                jobs[mode] = job, out, second_log
            runs = {mode: Resumed(wait_job(job, second_log), out, second_log)
                    for mode, (job, out, second_log) in jobs.items()}
            assert reference.wait(timeout=300) == 0, tail(reference_log)
        finally:
            if reference.poll() is None:
                reference.kill()
                reference.wait()
    return runs, train_losses(reference_out)


@pytest.mark.parametrize("mode", MODES)
def test_two_node_checkpoint_resumes_on_one_node(resumed, mode: str) -> None:
    runs, uninterrupted = resumed
    info, out, second_log = runs[mode]
    marker = json.loads((out / f"global_step{RESUMED_AT}" / "ds_gpt_complete.json").read_text())
    assert (marker["world_size"], marker["zero_stage"]) == (2, 1)
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
