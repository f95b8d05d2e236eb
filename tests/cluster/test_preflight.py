"""`python -m ds_gpt.preflight` on the local two-node cluster: the healthy cluster passes, and each
fault, made real, gives its named line and exit 2.

The healthy run is the one slurm/ds_train.sh makes before the session's staged mode A job
(conftest.py): the same checks and all-reduce, through the deepspeed launcher over ssh, with the
hostfile and env file a job writes. The faults: node2's sshd stopped; a hostfile naming a host
outside the allocation; the master port bound by another process; data on node1's local disk
only; an out_dir on a 1 MB tmpfs; an out_dir on node-local disks; an env file that leaves out a
variable. One two-node allocation (salloc) serves every fault; the preflight runs with its
variables, as it does inside a job, with the hostfile it writes from them, so each fault's report
shows every other check passing. Assertions read the --json report.

Every fault but the stopped sshd belongs to its own preflight run alone (its hostfile, master
port, data, out_dir or env file), so those runs go side by side, each fault made before and
undone after. The stopped sshd would fail every run at once: its test runs alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
from cluster_jobs import NODE_LOCAL, NODES, SHARED_MNT, job_env, local_cluster, on_node, tail
from helpers import PYTHON, REPO_ROOT, free_port

TINY_MODEL = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--vocab_size", "512",
              "--dtype", "float32"]
CACHE_VARS = ("PATH", "DS_GPT_CACHE", "TORCH_EXTENSIONS_DIR", "TIKTOKEN_CACHE_DIR")

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


# -----------------------------------------------------------------------------
# helpers


class Outcome(NamedTuple):
    rc: int
    report: dict
    stderr: str


def write_env_file(path: Path, env: dict[str, str], names=CACHE_VARS) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # owner-only from the start, as a job makes it
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{k}={env[k]}\n" for k in names if k in env))
    return path


def failures(report: dict) -> dict[str, list[str]]:
    return {c["check"]: c["hosts"] for c in report["checks"] if not c["ok"]}


# -----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def allocation(cluster, tmp_path_factory) -> dict[str, str]:
    """The SLURM_* variables of a two-node allocation held for this file's tests (released after)."""
    where = tmp_path_factory.mktemp("allocation")
    env_file, hold = where / "env", where / "hold"
    hold.touch()
    # salloc runs the command here with the allocation's variables; the allocation lasts as long as it does.
    holder = subprocess.Popen(
        ["salloc", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=a100:1", "--cpus-per-task=1", "--time=15",
         "bash", "-c", f"env -0 >{env_file}.tmp && mv {env_file}.tmp {env_file} && "
         f"while [ -e {hold} ]; do sleep 0.5; done"],
        cwd=REPO_ROOT, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not env_file.exists():
        assert holder.poll() is None and time.monotonic() < deadline, "salloc gave no allocation"
        time.sleep(0.5)
    env = dict(item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item)
    slurm = {k: v for k, v in env.items() if k.startswith("SLURM_")}
    try:
        yield slurm
    finally:
        hold.unlink()  # the command ends, and salloc releases the allocation
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            subprocess.run(["scancel", slurm["SLURM_JOB_ID"]], capture_output=True)
            holder.kill()
            holder.wait()


Run = Callable[[], Outcome]


def preflight(allocation: dict, where: Path, data_dir: Path, out_dir: Path, *args: str,
              env_file_names=CACHE_VARS, port: int | None = None) -> Run:
    """The preflight as a job would run it, made ready here (its env file, its master port) and run
    by the callable returned."""
    env = {**job_env(), **allocation, "MASTER_PORT": str(port or free_port())}
    env["DS_ENV_FILE"] = str(write_env_file(where / "deepspeed_env", env, env_file_names))
    report = where / "preflight.json"
    cmd = [PYTHON, "-m", "ds_gpt.preflight", "--data_dir", str(data_dir), "--out_dir", str(out_dir),
           "--json", str(report), *args, "--", *TINY_MODEL]

    def run() -> Outcome:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert report.exists(), proc.stderr
        return Outcome(proc.returncode, json.loads(report.read_text()), proc.stderr)

    return run


def assert_fails_with(result: Outcome, expected: dict[str, list[str]]) -> dict:
    rc, report, stderr = result
    assert rc == 2 and not report["ok"], stderr
    assert failures(report) == expected, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == len(expected), "one line per failed check"
    assert all(line.startswith("ds_gpt.preflight: ") and "(HINT: " in line for line in lines), stderr
    return report


# -----------------------------------------------------------------------------
# the runs side by side: the healthy one and one per fault, each fault made by its context manager


@contextlib.contextmanager
def host_outside_the_allocation(allocation: dict, where: Path, data: Path, port: int) -> Iterator[Run]:
    hostfile = where / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\nnode3 slots=1\n")
    yield preflight(allocation, where, data, where / "out", "--hostfile", str(hostfile), port=port)


@contextlib.contextmanager
def master_port_in_use(allocation: dict, where: Path, data: Path, port: int) -> Iterator[Run]:
    with socket.socket() as squatter:  # a stale rank's rendezvous server, say
        squatter.bind(("0.0.0.0", port))
        squatter.listen()
        yield preflight(allocation, where, data, where / "out", "--master_port", str(port))


@contextlib.contextmanager
def data_on_one_node_only(allocation: dict, where: Path, data: Path, port: int) -> Iterator[Run]:
    local = NODE_LOCAL / f"preflight-{uuid.uuid4().hex[:8]}"
    assert on_node("node1", "cp", "-r", str(data), str(local)).returncode == 0
    try:
        yield preflight(allocation, where, local, where / "out", port=port)
    finally:
        on_node("node1", "rm", "-rf", str(local))


@contextlib.contextmanager
def out_dir_too_small(allocation: dict, where: Path, data: Path, port: int) -> Iterator[Run]:
    small = SHARED_MNT / f"preflight-{uuid.uuid4().hex[:8]}"  # mounts here reach every node
    small.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        yield preflight(allocation, where, data, small, port=port)
    finally:
        subprocess.run(["umount", str(small)], check=True)
        small.rmdir()


@contextlib.contextmanager
def out_dir_on_node_local_disks(allocation: dict, where: Path, data: Path, port: int) -> Iterator[Run]:
    local = NODE_LOCAL / f"preflight-{uuid.uuid4().hex[:8]}"
    for node in NODES:
        on_node(node, "mkdir", "-p", str(local))
    try:
        yield preflight(allocation, where, data, local, port=port)
    finally:
        for node in NODES:
            on_node(node, "rm", "-rf", str(local))
        subprocess.run(["rm", "-rf", str(local)])  # the token, in this host's view of that path


@contextlib.contextmanager
def env_file_without_a_variable(allocation: dict, where: Path, data: Path, port: int) -> Iterator[Run]:
    names = [n for n in CACHE_VARS if n != "TORCH_EXTENSIONS_DIR"]
    yield preflight(allocation, where, data, where / "out", env_file_names=names, port=port)


SIDE_BY_SIDE = (host_outside_the_allocation, master_port_in_use, data_on_one_node_only, out_dir_too_small,
                out_dir_on_node_local_disks, env_file_without_a_variable)


@pytest.fixture(scope="module")
def outcomes(allocation, meta_data: Path, tmp_path_factory) -> dict[str, Outcome]:
    """Each SIDE_BY_SIDE run's outcome by its name, all run at once."""
    ports: set[int] = set()
    while len(ports) < len(SIDE_BY_SIDE):  # a master port of its own each, as runs at once take
        ports.add(free_port())
    with contextlib.ExitStack() as faults:
        runs = {scenario.__name__: faults.enter_context(scenario(allocation, tmp_path_factory.mktemp(scenario.__name__),
                                                                  meta_data, port))
                for scenario, port in zip(SIDE_BY_SIDE, sorted(ports), strict=True)}
        with ThreadPoolExecutor(len(runs)) as pool:
            futures = {name: pool.submit(run) for name, run in runs.items()}
            return {name: future.result() for name, future in futures.items()}


# -----------------------------------------------------------------------------
# healthy


def test_healthy_cluster_passes(staged_runs) -> None:
    """First in this file: the staged job takes both nodes, which the allocation holds once a fault test asks for it."""
    (_, info, out, log), _ = staged_runs("deepspeed")
    assert info["JobState"] == "COMPLETED", tail(log)  # a failed preflight ends the job with exit 2
    report = json.loads((out / "preflight.json").read_text())
    assert report["ok"], tail(log)
    checks = {c["check"]: c for c in report["checks"]}
    assert set(checks) == {"hostfile", "env", "ssh", "python", "master", "data", "out_dir", "allreduce"}
    assert report["hosts"] == {"node1": 1, "node2": 1} and report["transport"] == "ssh"
    assert report["data_meta"] and report["sha256_checked"]  # small data: hashed on every node
    assert checks["env"]["mode"] == "0600"
    ar = report["allreduce"]
    assert ar["world_size"] == 2 and ar["backend"] == "gloo" and ar["busbw_gbps"] > 0
    assert ar["link"].startswith("inter-node") and ar["assumed_gbps"] == 25.0
    assert not list(out.glob(".preflight*")), "the preflight leaves nothing in out_dir"


# -----------------------------------------------------------------------------
# one fault each


def test_stopped_sshd_is_named(allocation, meta_data: Path, tmp_path: Path) -> None:
    local_cluster("stop-sshd", "node2")
    try:
        result = preflight(allocation, tmp_path, meta_data, tmp_path / "out")()
    finally:
        local_cluster("up")
    assert_fails_with(result, {"ssh": ["node2"]})


def test_host_outside_the_allocation(outcomes) -> None:
    assert_fails_with(outcomes["host_outside_the_allocation"], {"hostfile": ["node3"]})


def test_master_port_in_use(outcomes) -> None:
    assert_fails_with(outcomes["master_port_in_use"], {"port": ["node1"]})


def test_data_on_one_node_only(outcomes) -> None:
    report = assert_fails_with(outcomes["data_on_one_node_only"], {"data": ["node2"]})
    assert "not found" in next(c["message"] for c in report["checks"] if c["check"] == "data")


def test_out_dir_too_small(outcomes) -> None:
    report = assert_fails_with(outcomes["out_dir_too_small"], {"out_dir": ["node1", "node2"]})
    check = next(c for c in report["checks"] if c["check"] == "out_dir")
    assert check["free_bytes"] <= 1 << 20 < check["need_bytes"] == 3 * report["model"]["checkpoint_bytes"]


def test_out_dir_on_node_local_disks(outcomes) -> None:
    """Checkpoint shards written to each node's own disk would never form one checkpoint."""
    report = assert_fails_with(outcomes["out_dir_on_node_local_disks"], {"out_dir": ["node1", "node2"]})
    assert "not one filesystem" in next(c["message"] for c in report["checks"] if c["check"] == "out_dir")


def test_env_file_without_a_variable(outcomes) -> None:
    report = assert_fails_with(outcomes["env_file_without_a_variable"], {"env": []})
    check = next(c for c in report["checks"] if c["check"] == "env")
    assert list(check["problems"]) == ["TORCH_EXTENSIONS_DIR"]
