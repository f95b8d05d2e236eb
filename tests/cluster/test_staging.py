"""slurm/ds_train.sh with its preflight and node-local staging, as jobs on the local two-node cluster.

Each node has a disk of its own (tests/cluster/local_cluster.sh), so a run that trains from
staged data proves that every node made its own copy: a rank whose node has none cannot start.
The staged training runs are the session's (conftest.py), which test_cluster.py's launch-mode
tests and test_elastic_cluster.py read too.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from cluster_jobs import (
    NODES,
    SBATCH_TINY,
    TINY,
    job_env,
    node_local_dir,
    on_node,
    remove_node_local,
    sbatch,
    tail,
    train_iters,
    wait_job,
)
from helpers import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture
def node_local(cluster) -> Path:
    """A fresh directory on every node's own disk, removed afterwards."""
    path = node_local_dir("test")
    yield path
    remove_node_local(path)


def run_job(tmp_path: Path, data_dir: Path, **env: str) -> tuple[int, dict, Path, Path]:
    out, log = tmp_path / "out", tmp_path / "job.out"
    job = sbatch([*SBATCH_TINY, f"--output={log}", "slurm/ds_train.sh", *TINY, "--max_iters", "4",
                  "--eval_interval", "2", "--checkpoint_interval", "4"],
                 job_env(DATA_DIR=str(data_dir), OUT_DIR=str(out), **{"DS_GPT_PREFLIGHT": "1", **env}))
    return job, wait_job(job, log), out, log


def sha256_on(node: str, path: Path) -> str:
    proc = on_node(node, "sha256sum", str(path))
    return proc.stdout.split()[0] if proc.returncode == 0 else f"(none: {proc.stderr.strip()})"


@pytest.mark.parametrize("mode", ["deepspeed", "srun"])
def test_preflight_then_staged_training(mode: str, staged_runs, meta_data: Path) -> None:
    """Mode A with STAGE_DIR, mode B with SLURM_TMPDIR: preflight passes, every node stages, the run trains."""
    (job, info, out, log), node_local = staged_runs(mode)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)

    preflight = json.loads((out / "preflight.json").read_text())
    assert preflight["ok"] and preflight["launcher"] == mode and preflight["allreduce"]["world_size"] == 2
    staged = node_local / f"ds_gpt-{meta_data.name}"
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["data_dir"] == str(staged) and config["world_size"] == 2
    assert train_iters(out)[-1] == 5
    meta = json.loads((meta_data / "meta.json").read_text())
    for node in NODES:  # each node's own copy, byte for byte
        assert sha256_on(node, staged / "train.bin") == meta["splits"]["train"]["sha256"], node
        assert on_node(node, "cmp", str(meta_data / "meta.json"), str(staged / "meta.json")).returncode == 0

    # The job's hostfile and env file went with it, and the env file was its owner's alone.
    assert not list((REPO_ROOT / "hostfiles").glob(f"{job}*"))
    assert not list(Path("/tmp").glob(f"ds_gpt-job{job}.*")) and not list(node_local.glob(f"ds_gpt-job{job}.*"))
    assert not on_node("node1", "sh", "-c", f"ls -d {node_local}/ds_gpt-job{job}.*").stdout.strip()
    if mode == "deepspeed":
        env_check = next(c for c in preflight["checks"] if c["check"] == "env")
        assert env_check["mode"] == "0600" and Path(env_check["path"]).parent.name.startswith(f"ds_gpt-job{job}.")

    # The preflight's checkpoint estimate against the checkpoint the run wrote.
    written = sum(f.stat().st_size for f in (out / "global_step6").rglob("*") if f.is_file())
    assert 0.9 < written / preflight["model"]["checkpoint_bytes"] < 1.1


def test_failed_preflight_starts_no_training(cluster, tmp_path: Path) -> None:
    job, info, out, log = run_job(tmp_path, tmp_path / "no-such-data")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", tail(log)
    report = json.loads((out / "preflight.json").read_text())
    assert {c["check"] for c in report["checks"] if not c["ok"]} == {"data"}
    assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()
    assert "ds_gpt.preflight: data: node1,node2: data directory" in log.read_text()


def test_preflight_only_job(meta_data: Path, cluster, tmp_path: Path) -> None:
    """DS_GPT_PREFLIGHT=only: the checks of a first job on a new cluster, and no training."""
    job, info, out, log = run_job(tmp_path, meta_data, DS_GPT_LAUNCH="srun", DS_GPT_PREFLIGHT="only")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    report = json.loads((out / "preflight.json").read_text())
    assert report["ok"] and report["transport"] == "srun" and report["hosts"] == {"node1": 1, "node2": 1}
    assert not (out / "metrics.jsonl").exists()


def test_corrupt_copy_starts_no_training(meta_data: Path, node_local: Path, tmp_path: Path) -> None:
    """A copy whose bytes disagree with meta.json is an error on every node, and leaves no file behind."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("train.bin", "val.bin"):
        (bad / name).write_bytes((meta_data / name).read_bytes())
    meta = json.loads((meta_data / "meta.json").read_text())
    meta["splits"]["train"]["sha256"] = "0" * 64
    (bad / "meta.json").write_text(json.dumps(meta))
    # The preflight would catch it first (it hashes small data on every node): skip it, to test the copy.
    job, info, out, log = run_job(tmp_path, bad, STAGE_DATA="1", STAGE_DIR=str(node_local), DS_GPT_PREFLIGHT="0")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", tail(log)
    assert not (out / "metrics.jsonl").exists()
    text = log.read_text()
    for node in NODES:
        assert f"ds_gpt.stage: {node}: error: copy of {bad}/train.bin: sha256 differs" in text, tail(log)
        assert on_node(node, "ls", "-A", str(node_local / "ds_gpt-bad")).stdout.split() == [], node
