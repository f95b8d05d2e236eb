"""What the deepspeed launcher sends to other nodes arrives byte for byte, or is refused before anything runs.

DeepSpeed's own quoting (its runner's add_export) and a real `sh` judge every value here; the
two-node run through real pdsh is tests/cluster/test_cluster.py's.
"""
from __future__ import annotations

import base64
import re
import shutil
import stat
import subprocess
from types import SimpleNamespace

import pytest
from deepspeed.launcher.multinode_runner import MultiNodeRunner

from ds_gpt import remote_shell
from ds_gpt.errors import UserError

NASTY = ["$(touch pwned)", "`touch pwned`", "a;touch pwned", "it's \"quoted\"", "two\nlines", "naïve 東京",
         "%h %n %u %%", "back\\slash", "a\\$b", "end\\", " padded ", "", "-", "\udcff raw byte"]


def as_the_node_sees(name: str, value: str, cwd) -> str | None:
    """`value` after the env file, DeepSpeed's runner (add_export), pdsh and a shell on the node have
    had it; None when the env file cannot hold it on one line (the runner reads it line by line).
    pdsh's exec module runs the line here as its ssh module hands it to the node's `sh -c`."""
    if len(f"{name}={value}\n".splitlines()) != 1:
        return None
    runner = SimpleNamespace(exports={})
    MultiNodeRunner.add_export(runner, name, value)
    line = f"export {name}={runner.exports[name]}; printf %s \"${name}\" | base64 -w0"
    if shutil.which("pdsh") is None:
        if "%" in value:
            pytest.skip("no pdsh here to replace %h, %n, %u (the cluster tier has it)")
        cmd = ["sh", "-c", line]
    else:
        cmd = ["pdsh", "-R", "exec", "-w", "n1", "sh", "-c", line]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd).stdout.strip()
    return base64.b64decode(out.removeprefix("n1: ")).decode(errors="surrogateescape")


def test_packed_arguments_come_back_exactly_as_one_word_nothing_reads():
    word = remote_shell.pack(NASTY)
    assert re.fullmatch(r"[A-Za-z0-9_=-]+", word)  # no character a shell or pdsh acts on
    assert remote_shell.unpack(word) == NASTY


@pytest.mark.parametrize("word", ["", "not base64!", "eyJhIjogMX0=", "WzFd"])  # {"a": 1}, [1]
def test_a_word_not_made_by_pack_is_refused_in_one_line(word):
    with pytest.raises(UserError, match="is not a word made by"):
        remote_shell.unpack(word)


def test_arguments_too_long_for_the_nodes_command_line_are_refused():
    with pytest.raises(UserError, match="--config file"):
        remote_shell.pack(["x" * remote_shell.MAX_WORD])


@pytest.mark.parametrize("value", [*NASTY[:-1], "/plain/path:/other", "a path with spaces", "x=1,y=2"])
def test_an_export_is_refused_exactly_when_the_node_would_get_other_bytes(value, tmp_path):
    refused = remote_shell.export_problem("NCCL_TEST", value) is not None
    assert refused == (as_the_node_sees("NCCL_TEST", value, cwd=tmp_path) != value), value


def test_the_env_file_is_owner_only_and_carries_the_job_id(tmp_path):
    path = tmp_path / "env"
    remote_shell.write_env_file(str(path), {"PATH": "/venv/bin:/usr/bin", "SLURM_JOB_ID": "77", "NCCL_DEBUG": "INFO",
                                            "HOME": "/root"})
    assert path.read_text() == "PATH=/venv/bin:/usr/bin\nSLURM_JOB_ID=77\nNCCL_DEBUG=INFO\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_env_file_value_a_shell_would_expand_writes_nothing(tmp_path):
    path = tmp_path / "env"
    with pytest.raises(UserError, match="NCCL_SOCKET_IFNAME holds"):
        remote_shell.write_env_file(str(path), {"PATH": "/usr/bin", "NCCL_SOCKET_IFNAME": "$(touch pwned)"})
    assert not path.exists()


def test_launch_refuses_before_the_runner_starts_anything(tmp_path, monkeypatch):
    """DeepSpeed's own exports (PYTHON*) and unpacked script arguments are checked before pdsh runs."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    monkeypatch.setenv("PYTHONWARNINGS", "`touch pwned`")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as refused:
        remote_shell.launch(["--hostfile", str(hostfile), "ds_gpt/train.py", "--out_dir", "a;touch pwned"])
    assert "PYTHONWARNINGS holds" in str(refused.value) and "argument 2 'a;touch pwned'" in str(refused.value)
    assert not list(tmp_path.glob("pwned"))
