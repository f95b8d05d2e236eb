"""ds_gpt.hostfile: SLURM node-list expansion, slot counts, hostfile writing and checking."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ds_gpt.errors import EXIT_USER_ERROR, UserError
from ds_gpt.hostfile import expand_nodelist, main, read_hostfile, slots_per_node, tasks_per_node

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("nodelist, hosts", [
    ("ng10101", ["ng10101"]),
    ("ng[10101-10102,10205],cdr7", ["ng10101", "ng10102", "ng10205", "cdr7"]),
    ("node[01-03]", ["node01", "node02", "node03"]),  # zero padding kept
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("a[1-2]-ib,b.cluster", ["a1-ib", "a2-ib", "b.cluster"]),
    (" node[1-2] ", ["node1", "node2"]),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "   ", "ng[1-2", "ng1-2]", "ng[2-1]", "ng[a-b]", "ng[1-]",
                                 "ng[[1-2]]", "a,,b", "ng[1,]", "host name"])
def test_expand_nodelist_rejects_malformed(bad: str) -> None:
    with pytest.raises(UserError):
        expand_nodelist(bad)


def test_slots_precedence() -> None:
    env = {"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "a100:2", "SLURM_TASKS_PER_NODE": "8(x2)",
           "SLURM_NTASKS_PER_NODE": "8"}
    assert slots_per_node(3, env, 2) == [3, 3]
    assert slots_per_node(None, env, 2) == [4, 4]
    assert slots_per_node(None, {"SLURM_GPUS_PER_NODE": "a100:4"}, 1) == [4]
    assert slots_per_node(None, {"SLURM_GPUS_PER_NODE": "gpu:a100:2,v100:2"}, 1) == [4]
    assert slots_per_node(None, {"SLURM_GPUS_PER_NODE": "2"}, 1) == [2]
    assert slots_per_node(None, {"SLURM_NTASKS_PER_NODE": "4"}, 3) == [4, 4, 4]


# What sbatch sets in the job's environment for each allocation (SLURM 22.05 on the local cluster
# and the sbatch man page's OUTPUT ENVIRONMENT VARIABLES).
ALLOCATIONS = {
    "uneven tasks: --ntasks=10 over 3 nodes": (
        {"SLURM_JOB_NODELIST": "cn[1-3]", "SLURM_TASKS_PER_NODE": "4(x2),2", "SLURM_NTASKS": "10"},
        "cn1 slots=4\ncn2 slots=4\ncn3 slots=2\n"),
    "a CPU job: --gpus-per-node=0 --ntasks-per-node=2": (
        {"SLURM_JOB_NODELIST": "cn[1-2]", "SLURM_GPUS_PER_NODE": "0", "SLURM_NTASKS_PER_NODE": "2",
         "SLURM_TASKS_PER_NODE": "2(x2)"},
        "cn1 slots=2\ncn2 slots=2\n"),
    "a CPU job with no per-node request: --gpus-per-node=0 --ntasks=3": (
        {"SLURM_JOB_NODELIST": "cn[1-2]", "SLURM_GPUS_PER_NODE": "0", "SLURM_GPUS_ON_NODE": "0",
         "SLURM_TASKS_PER_NODE": "2,1"},
        "cn1 slots=2\ncn2 slots=1\n"),
    "GPUs win over tasks: --gpus-per-node=a100:4 --ntasks-per-node=1": (
        {"SLURM_JOB_NODELIST": "g[01-02]", "SLURM_GPUS_PER_NODE": "a100:4", "SLURM_TASKS_PER_NODE": "1(x2)",
         "SLURM_NTASKS_PER_NODE": "1"},
        "g01 slots=4\ng02 slots=4\n"),
}


@pytest.mark.parametrize("name", list(ALLOCATIONS))
def test_hostfile_of_an_allocation(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: the built-in node-list expander
    env, text = ALLOCATIONS[name]
    out = tmp_path / "hosts"
    assert main(["--out", str(out)], environ=env) == 0
    assert out.read_text() == text
    assert read_hostfile(out) == [(line.split()[0], int(line.split("=")[1])) for line in text.splitlines()]


@pytest.mark.parametrize("value, counts", [("4", [4]), ("4(x2),2", [4, 4, 2]), ("1,2(x3)", [1, 2, 2, 2]),
                                           (" 3(x1) ", [3])])
def test_tasks_per_node(value: str, counts: list[int]) -> None:
    assert tasks_per_node(value) == counts


@pytest.mark.parametrize("value", ["", "0", "4(x0)", "4(2)", "x", "4(x2", "4,,2"])
def test_tasks_per_node_rejects_malformed(value: str) -> None:
    with pytest.raises(UserError, match="SLURM_TASKS_PER_NODE"):
        tasks_per_node(value)


def test_tasks_per_node_must_cover_the_node_list() -> None:
    with pytest.raises(UserError, match=r"describes 3 node\(s\) but the node list has 2 .*--slots"):
        slots_per_node(None, {"SLURM_TASKS_PER_NODE": "4(x2),2"}, 2)


@pytest.mark.parametrize("env", [{}, {"SLURM_GPUS_PER_NODE": "a100:x"}, {"SLURM_GPUS_ON_NODE": "0"},
                                 {"SLURM_GPUS_PER_NODE": "0"}, {"SLURM_NTASKS_PER_NODE": "four"}])
def test_slots_errors(env: dict) -> None:
    with pytest.raises(UserError):
        slots_per_node(None, env, 1)
    with pytest.raises(UserError):
        slots_per_node(0, {}, 1)


def test_cli_writes_the_seed_hostfile(tmp_path: Path, monkeypatch, capsys) -> None:
    # The pure-Python expander, as on a machine without scontrol.
    monkeypatch.setenv("PATH", str(tmp_path))
    out = tmp_path / "hostfiles" / "123"
    env = {"SLURM_JOB_NODELIST": "ng[10101-10102]", "SLURM_GPUS_PER_NODE": "a100:4"}
    assert main(["--out", str(out)], environ=env) == 0
    assert out.read_text() == "ng10101 slots=4\nng10102 slots=4\n"
    assert read_hostfile(out) == [("ng10101", 4), ("ng10102", 4)]
    assert main(["--nodelist", "cdr[7-8]", "--slots", "2"], environ={}) == 0
    assert capsys.readouterr().out == "cdr7 slots=2\ncdr8 slots=2\n"


def test_cli_outside_an_allocation_is_one_clear_line(tmp_path: Path) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-m", "ds_gpt.hostfile", "--slots", "4"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == EXIT_USER_ERROR
    assert proc.stderr.count("\n") == 1 and "SLURM_JOB_NODELIST" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shipped_hostfiles_parse() -> None:
    assert read_hostfile(REPO_ROOT / "hostfiles" / "narval") == [("ng10101", 4), ("ng10102", 4)]
    assert read_hostfile(REPO_ROOT / "hostfiles" / "localhost") == [("localhost", 2)]


def test_read_hostfile_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "h"
    path.write_text("# two nodes\n\nnode1 slots=4   # first\nnode2  slots=2\n")
    assert read_hostfile(path) == [("node1", 4), ("node2", 2)]


@pytest.mark.parametrize("text, lineno", [
    ("node1 slots=4\nnode2 slot=4\n", 2),
    ("node1 slots=4\nnode2\n", 2),
    ("node1 slots=four\n", 1),
    ("\n\nnode1 slots=0\n", 3),
    ("node1 slots=4\nnode1 slots=4\n", 2),
    ("node1 slots=4 extra\n", 1),
])
def test_read_hostfile_bad_line_names_its_number(tmp_path: Path, text: str, lineno: int) -> None:
    path = tmp_path / "h"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"{path}:{lineno}:"):
        read_hostfile(path)


def test_read_hostfile_empty_missing_or_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(UserError, match="lists no hosts"):
        read_hostfile(tmp_path / "empty")
    with pytest.raises(UserError, match="cannot read"):
        read_hostfile(tmp_path / "missing")
    (tmp_path / "latin1").write_bytes(b"node1 slots=2\n\xe9t\xe9 slots=1\n")  # "été" in latin-1
    with pytest.raises(UserError, match=r"hostfile .*latin1 is not UTF-8 text \(invalid byte at offset 14\)"):
        read_hostfile(tmp_path / "latin1")


def test_check_cli_reports_a_bad_line_before_the_launcher_does(tmp_path: Path) -> None:
    """`deepspeed --hostfile` itself stops with a traceback; `--check` says which line, exit 2."""
    bad = tmp_path / "hosts"
    bad.write_text("node1 slots=4\nnode2 slots=four\n")
    proc = subprocess.run([sys.executable, "-m", "ds_gpt.hostfile", "--check", str(bad)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == EXIT_USER_ERROR
    assert proc.stderr.count("\n") == 1 and f"{bad}:2: bad hostfile line" in proc.stderr
    assert "Traceback" not in proc.stderr
    good = subprocess.run([sys.executable, "-m", "ds_gpt.hostfile", "--check", "hostfiles/narval"],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert good.returncode == 0 and "2 host(s), 8 slot(s)" in good.stderr
