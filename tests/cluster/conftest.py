"""Fixtures of the cluster tests, defined here once: a fixture imported into several test modules
would be set up once per module, the cluster and each shared job included.

The session fixture runs `tests/cluster/local_cluster.sh up` (slurmctld + slurmd node1/node2,
munge, sshd on the aliases node1=127.0.0.2 and node2=127.0.0.3). Jobs that several tests read
(one staged two-node run per launch mode) are submitted once per session, when a test first asks.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster_jobs import CLUSTER_SH, Job, node_local_dir, remove_node_local, staged_run
from helpers import write_token_bins
from test_stage import write_meta


@pytest.fixture(scope="session")
def cluster() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: the local SLURM cluster needs root (tests/cluster/local_cluster.sh up)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("LOUD SKIP: the local SLURM cluster needs apt-get to install slurm, munge, sshd, pdsh")
    # A cluster someone brought up by hand stays up; one brought up here goes down afterwards.
    was_up = shutil.which("scontrol") is not None and \
        subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout.count("UP") > 0
    proc = subprocess.run(["bash", str(CLUSTER_SH), "up"], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(f"LOUD SKIP: this machine cannot host the local SLURM cluster: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"local_cluster.sh up failed:\n{proc.stdout}\n{proc.stderr}"
    yield
    if not was_up:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A corpus as nanoGPT leaves it (train.bin, val.bin, no meta.json) on the filesystem every node shares."""
    return write_token_bins(tmp_path_factory.mktemp("cluster_data"))


@pytest.fixture(scope="session")
def meta_data(tmp_path_factory) -> Path:
    """A corpus with meta.json (what staging verifies its copies against) on the shared filesystem."""
    return write_meta(write_token_bins(tmp_path_factory.mktemp("staging_data")))


@pytest.fixture(scope="session")
def staged_runs(cluster, meta_data: Path, tmp_path_factory) -> Iterator[Callable[[str], tuple[Job, Path]]]:
    """staged_runs(mode) -> (job, node-local directory it staged to): the finished two-node job of
    cluster_jobs.staged_run for that launch mode (deepspeed or srun), submitted on first use.
    Tests read its run directory; none writes to it."""
    runs: dict[str, tuple[Job, Path]] = {}
    made: list[Path] = []

    def get(mode: str) -> tuple[Job, Path]:
        if mode not in runs:
            made.append(node_local_dir(f"staged-{mode}"))  # one per mode: each job makes its own copies
            job = staged_run(mode, meta_data, made[-1], tmp_path_factory.mktemp(f"staged_{mode}"))
            runs[mode] = job, made[-1]
        return runs[mode]

    yield get
    for node_local in made:
        remove_node_local(node_local)
