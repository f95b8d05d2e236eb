"""`python -m ds_gpt.ops`: DeepSpeed's CPU op compiled at set-up, so that runs only load it."""
from __future__ import annotations

import importlib
import os
import subprocess
from pathlib import Path

import pytest
from helpers import PYTHON, REPO_ROOT, VENV_BIN, copy_of_the_op_build, two_step_run

from ds_gpt.ops import OP


def ops(extensions: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "ds_gpt.ops"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)})


@pytest.mark.slow
def test_loads_the_set_up_build_without_recompiling_and_past_a_stale_lock(tmp_path):
    ext = tmp_path / "torch_extensions"
    library = copy_of_the_op_build(ext) / f"{OP}.so"
    if not library.exists():  # a run without `make setup`: compile it here once
        assert ops(ext).returncode == 0
    compiled_at = library.stat().st_mtime_ns
    lock = library.parent / "lock"
    lock.touch()  # left by a build that was killed: torch alone would wait on it forever

    proc = ops(ext)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ds_gpt.ops: {OP} and cpu_adam ready under {ext}" in proc.stdout
    assert f"removed stale build lock {lock}" in proc.stderr and not lock.exists()
    assert library.stat().st_mtime_ns == compiled_at  # loaded, not compiled again


def test_usage_error_is_one_line_exit_2():
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.ops", "--bogus"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


def fake_ninja_dir(tmp_path: Path) -> Path:
    """A PATH directory whose `ninja` is not the venv's: a system ninja of another version, say."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ninja").write_text("#!/bin/sh\necho 'not the venv ninja' >&2\nexit 1\n")
    (bin_dir / "ninja").chmod(0o755)
    return bin_dir


def test_the_venvs_ninja_goes_first_once(tmp_path, monkeypatch):
    from ds_gpt.ops import put_venv_ninja_first

    venv_bin = str(VENV_BIN)
    other = str(fake_ninja_dir(tmp_path))
    monkeypatch.setenv("PATH", f"{other}{os.pathsep}/usr/bin")
    put_venv_ninja_first()
    assert os.environ["PATH"] == os.pathsep.join([venv_bin, other, "/usr/bin"])
    put_venv_ninja_first()  # already first: unchanged
    assert os.environ["PATH"] == os.pathsep.join([venv_bin, other, "/usr/bin"])
    monkeypatch.setenv("PATH", "")  # no PATH at all: no empty entry (the current directory) added
    put_venv_ninja_first()
    assert os.environ["PATH"] == venv_bin


@pytest.mark.slow
def test_a_run_outside_the_venv_loads_the_op_with_the_venvs_ninja(tmp_path):
    """`.venv/bin/python -m ds_gpt.train` with another ninja first on PATH (or none): the run
    loads the set-up build with the venv's ninja, neither failing nor recompiling it."""
    library = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / OP / f"{OP}.so"
    assert ops(Path(os.environ["TORCH_EXTENSIONS_DIR"])).returncode == 0
    compiled_at = library.stat().st_mtime_ns
    proc = two_step_run(tmp_path, {**os.environ, "PATH": str(fake_ninja_dir(tmp_path))})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "out" / "latest").read_text() == "global_step2"
    assert library.stat().st_mtime_ns == compiled_at


def ds_comm_backend():
    """deepspeed.comm.torch, the module (as an attribute path, deepspeed.comm.torch is torch itself)."""
    return importlib.import_module("deepspeed.comm.torch")


def test_a_cuda_torch_builds_nothing(monkeypatch, capsys, tmp_path):
    import torch

    from ds_gpt import ops

    def must_not_build():
        raise AssertionError("the CPU op was built for a GPU install")

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no receipt of the set-up's CPU builds
    monkeypatch.setattr(ds_comm_backend(), "build_shm_op", must_not_build)
    assert ops.main([]) == 0
    assert "nothing to build" in capsys.readouterr().out


def test_a_failed_compile_is_one_error_naming_the_op_and_the_fix(monkeypatch, tmp_path):
    from ds_gpt import ops
    from ds_gpt.errors import UserError

    def compiler_fails():
        raise RuntimeError("ninja: build stopped: subcommand failed.\nError building extension 'deepspeed_shm_comm'")

    monkeypatch.setattr(ds_comm_backend(), "build_shm_op", compiler_fails)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there: the build is attempted
    with pytest.raises(UserError, match="compiling DeepSpeed's deepspeed_shm_comm op under .* failed: Error building "
                                        "extension 'deepspeed_shm_comm'") as info:
        ops.main([])
    assert "C++ compiler" in info.value.hint


def test_a_receipt_skips_only_an_unchanged_locked_free_set_up(tmp_path):
    """`make setup` skips loading the ops when the receipt matches; any change to a build, a new
    build (torch's _v1 rebuild), a build lock or a damaged receipt sends it down the full load."""
    from ds_gpt import ops

    for op in ("deepspeed_shm_comm", "cpu_adam"):
        (tmp_path / op).mkdir()
        (tmp_path / op / f"{op}.so").write_bytes(b"built")
    assert not ops.already_loaded(tmp_path)  # no receipt yet
    ops.write_receipt(tmp_path)
    assert ops.already_loaded(tmp_path)
    library = tmp_path / "cpu_adam" / "cpu_adam.so"
    library.write_bytes(b"built again")
    assert not ops.already_loaded(tmp_path)
    ops.write_receipt(tmp_path)
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm_v1.so").write_bytes(b"rebuilt")
    assert not ops.already_loaded(tmp_path)
    ops.write_receipt(tmp_path)
    (tmp_path / "cpu_adam" / "lock").touch()
    assert not ops.already_loaded(tmp_path)
    (tmp_path / "cpu_adam" / "lock").unlink()
    assert ops.already_loaded(tmp_path)
    (tmp_path / ops.RECEIPT).write_text("{")
    assert not ops.already_loaded(tmp_path)
