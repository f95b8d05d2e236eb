"""ds_gpt.atomic: a failed replace leaves the old file and no temp file, and names the user's path."""
from __future__ import annotations

import errno
import os

import pytest

from ds_gpt import atomic
from ds_gpt.errors import UserError


def test_write_text_onto_a_directory_names_it_and_leaves_nothing(tmp_path):
    (tmp_path / "hosts").mkdir()
    with pytest.raises(IsADirectoryError) as err:
        atomic.write_text(tmp_path / "hosts", "node1 slots=2\n")
    assert err.value.filename == str(tmp_path / "hosts")  # not the temp file's name
    assert [p.name for p in tmp_path.iterdir()] == ["hosts"]


def test_write_text_on_a_full_disk_keeps_the_old_file(tmp_path, mounts):
    disk = mounts.tmpfs(tmp_path / "disk", "64k")
    atomic.write_text(disk / "config.json", "old\n")
    with pytest.raises(OSError) as err:
        atomic.write_text(disk / "config.json", "x" * 200_000)
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(disk / "config.json"))
    assert (disk / "config.json").read_text() == "old\n" and [p.name for p in disk.iterdir()] == ["config.json"]


def test_read_text_names_the_first_bad_byte(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"line 1\r\nline 2\rna\xefve\n")
    with pytest.raises(UserError, match=r"--start .*a\.txt is not UTF-8 text \(invalid byte at offset 17\)"):
        atomic.read_text(tmp_path / "a.txt", "--start")
    (tmp_path / "a.txt").write_bytes("line 1\r\nline 2\rnaïve\n".encode())
    assert atomic.read_text(tmp_path / "a.txt") == "line 1\nline 2\nnaïve\n"  # open()'s universal newlines


def test_the_file_mode_rule_reads_the_umask_and_keeps_private_files_private(tmp_path):
    from ds_gpt import file_modes

    old = os.umask(0o027)
    try:
        assert file_modes.umask() == 0o027
        (tmp_path / "run" / "sub").mkdir(parents=True, mode=0o700)
        (tmp_path / "run" / "sub" / "f").write_text("x")
        (tmp_path / "run" / "sub" / "f").chmod(0o600)
        file_modes.as_created(tmp_path / "run")
        file_modes.write_private(tmp_path / "run" / "secret", "token")
        file_modes.private_dir(tmp_path / "run" / "wandb")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").rglob("*")}
    assert modes == {"sub": 0o750, "f": 0o640, "secret": 0o600, "wandb": 0o700}
