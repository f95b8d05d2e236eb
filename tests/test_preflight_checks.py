"""The preflight's judgements on hand-made facts; the checks themselves run on the local cluster
(tests/cluster/test_preflight.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import write_token_bins

from ds_gpt.plan_comm import LINKS
from ds_gpt.preflight import checkpoint_bytes
from ds_gpt.preflight_checks import (
    NO_REPO,
    VENV_BIN,
    Allocation,
    allocation_results,
    env_file_results,
    gpu_type,
    gpus_from_job,
    judge_allreduce,
    judge_probes,
)

TWO_NODES = Allocation("node[1-2]", ["node1", "node2"], {"node1": 4, "node2": 4}, {"node1": 4, "node2": 4})


def failed(results) -> dict[str, list[str]]:
    return {r.check: r.hosts for r in results if not r.ok}


@pytest.mark.parametrize("dtype,stage,per_param", [
    # measured with DeepSpeed 0.19.8 on a 2.64 M parameter model: all ranks' files / parameters
    ("float32", 0, 12), ("bfloat16", 0, 14), ("float32", 1, 16), ("bfloat16", 1, 14), ("float32", 2, 16),
    ("float32", 3, 12), ("bfloat16", 3, 12)])
def test_checkpoint_bytes_per_parameter(dtype: str, stage: int, per_param: int) -> None:
    assert checkpoint_bytes(1000, dtype, stage) == 1000 * per_param


def test_gpus_per_node_from_scontrol() -> None:
    text = ("JobId=7 JobName=x\n   JOB_GRES=gpu:a100:6\n"
            "     Nodes=node[1-2] CPU_IDs=0-7 Mem=0 GRES=gpu:a100:2(IDX:0-1)\n"
            "     Nodes=big7 CPU_IDs=0-3 Mem=0 GRES=gpu:2(IDX:0,2)\n"
            "     Nodes=cpu1 CPU_IDs=0 Mem=0 GRES=\n")
    assert gpus_from_job(text) == {"node1": 2, "node2": 2, "big7": 2, "cpu1": 0}
    assert [gpu_type(t) for t in ("gpu:a100:2(IDX:0-1)", "H100:4", "gpu:2(IDX:0,2)", "4", "")] == \
        ["a100", "h100", None, None, None]


def test_hostfile_against_the_allocation() -> None:
    assert not failed(allocation_results([("node1", 4), ("node2", 4)], TWO_NODES, "deepspeed"))
    results = allocation_results([("node1", 4), ("node3", 4)], TWO_NODES, "deepspeed")
    assert [(r.check, r.hosts) for r in results if not r.ok] == [("hostfile", ["node3"]), ("hostfile", ["node2"])]
    assert "not in this job's allocation" in results[0].message and "not in the hostfile" in results[1].message
    results = allocation_results([("node1", 8), ("node2", 8)], TWO_NODES, "deepspeed")
    assert failed(results) == {"hostfile": ["node1", "node2"]} and "4 GPU(s)" in results[0].message
    uneven = Allocation("node[1-2]", ["node1", "node2"], {"node1": 2, "node2": 4}, {"node1": 4, "node2": 4})
    assert failed(allocation_results([("node1", 4), ("node2", 4)], uneven, "srun")) == {"allocation": ["node1"]}
    assert not failed(allocation_results([("h", 2)], None, "deepspeed"))


def test_env_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    wanted = {"PATH": f"{VENV_BIN}:/usr/bin", "TORCH_EXTENSIONS_DIR": "/cache/ext", "NCCL_IB_HCA": "mlx5"}
    env_file = tmp_path / "env"
    results, _ = env_file_results({"DS_ENV_FILE": str(env_file)}, wanted)
    assert failed(results) == {"env": []} and "no " in results[0].message
    env_file.write_text(f"PATH={VENV_BIN}:/bin\nTORCH_EXTENSIONS_DIR=/cache/ext\n")
    env_file.chmod(0o600)
    results, details = env_file_results({"DS_ENV_FILE": str(env_file)}, wanted)
    assert list(results[0].details["problems"]) == ["NCCL_IB_HCA"] and details["mode"] == "0600"
    env_file.write_text("PATH=/usr/bin\nTORCH_EXTENSIONS_DIR=/other\nNCCL_IB_HCA=mlx5\n")
    results, _ = env_file_results({"DS_ENV_FILE": str(env_file)}, wanted)
    assert sorted(results[0].details["problems"]) == ["PATH", "TORCH_EXTENSIONS_DIR"]
    env_file.write_text("just words\n")
    assert ":1:" in env_file_results({"DS_ENV_FILE": str(env_file)}, wanted)[0][0].message
    # Without DS_ENV_FILE the launcher reads .deepspeed_env in ~ and then in the working directory.
    Path(".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in wanted.items()))
    assert not failed(env_file_results({}, wanted)[0])


def probe(**over) -> dict:
    report = {"versions": {"python": "3.11.7", "torch": "2.13.0", "deepspeed": "0.19.8"},
              "master": {"addrs": ["127.0.0.2"]}, "port": {"free": True}, "data": {"ok": True},
              "out_dir": {"writable": True, "free_bytes": 10**9, "token": "T"}}
    report.update(over)
    return report


def test_probe_reports() -> None:
    here = probe()["versions"]
    model = {"checkpoint_bytes": 10**6}

    def judge(probes):
        return failed(judge_probes(probes, "node1", 29500, "T", 3 * 10**6, model, 2, here, "ssh"))

    assert judge({"node1": probe(), "node2": probe()}) == {}
    assert judge({"node1": probe(), "node2": {"failed": 255, "stderr": "Connection refused"}}) == {"ssh": ["node2"]}
    assert judge({"node1": probe(), "node2": {"failed": NO_REPO, "stderr": ""}}) == {"repo": ["node2"]}
    taken = {"free": False, "error": "Address already in use"}
    assert judge({"node1": probe(), "node2": probe(port=taken)}) == {}  # only the master's port matters
    assert judge({"node1": probe(port=taken), "node2": probe()}) == {"port": ["node1"]}
    small = {"writable": True, "free_bytes": 10**6, "token": "T"}
    assert judge({"node1": probe(out_dir=small), "node2": probe(out_dir=small)}) == {"out_dir": ["node1", "node2"]}
    unshared = {"writable": True, "free_bytes": 10**9, "token": None}
    assert judge({"node1": probe(), "node2": probe(out_dir=unshared)}) == {"out_dir": ["node2"]}
    other = probe(versions={**here, "torch": "2.12.0"})
    assert judge({"node1": probe(), "node2": other}) == {"python": ["node2"]}


def test_allreduce_bus_bandwidth_and_rank_env() -> None:
    wanted = {"PATH": f"{VENV_BIN}{os.pathsep}/bin", "DS_GPT_CACHE": "/c"}
    env = {"PATH": VENV_BIN, "DS_GPT_CACHE": "/c"}
    ranks = [{"rank": r, "node_rank": r // 2, "world_size": 4, "hostname": "h", "node": None, "correct": True,
              "backend": "nccl", "bytes": 10**9, "seconds": 0.1, "env": env} for r in range(4)]
    results, measured = judge_allreduce(ranks, "", 4, ["node1", "node2"], wanted, "a100", LINKS["a100"])
    assert not failed(results)
    assert measured["busbw_gbps"] == pytest.approx(10 * 2 * 3 / 4)  # algbw 10 GB/s x 2(n-1)/n
    assert measured["link"].startswith("inter-node") and measured["assumed_gbps"] == 25.0
    ranks[3]["env"] = {"PATH": "/bin"}
    assert failed(judge_allreduce(ranks, "", 4, ["node1", "node2"], wanted, "a100", LINKS["a100"])[0]) == \
        {"env": ["node2"]}
    assert failed(judge_allreduce(ranks[:3], "", 4, ["node1", "node2"], wanted, "a100", LINKS["a100"])[0]) == \
        {"allreduce": []}
    one_node = [{**r, "node_rank": 0, "env": env} for r in ranks]
    assert judge_allreduce(one_node, "", 4, ["node1"], wanted, "h100", LINKS["h100"])[1]["assumed_gbps"] == 450


def test_a_failed_preflight_leaves_no_out_dir(tmp_path, capsys):
    """Its write test makes --out_dir (and parents) if need be, and removes them again: a preflight
    that fails (here: a host that does not resolve) leaves no empty run directory behind."""
    from ds_gpt import preflight
    from ds_gpt.errors import run_cli

    (tmp_path / "hosts").write_text("no-such-host.invalid slots=1\n")
    data = write_token_bins(tmp_path / "data", n_train=2000, n_val=500)
    argv = ["--hostfile", str(tmp_path / "hosts"), "--data_dir", str(data), "--out_dir", str(tmp_path / "a" / "out"),
            "--timeout_s", "5", "--", "--n_layer", "2"]
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: preflight.main(argv, environ={"PATH": os.environ["PATH"]}), prog="ds_gpt.preflight")
    assert stop.value.code == 2 and "no-such-host.invalid" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hosts"]
    # asked for its report inside the run directory (as slurm/ds_train.sh does), it makes the directory for it
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: preflight.main(["--json", str(tmp_path / "a" / "out" / "preflight.json"), *argv],
                                       environ={"PATH": os.environ["PATH"]}), prog="ds_gpt.preflight")
    assert stop.value.code == 2
    assert [p.name for p in (tmp_path / "a" / "out").iterdir()] == ["preflight.json"]
