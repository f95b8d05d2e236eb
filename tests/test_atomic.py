"""ds_gpt.atomic: a failed replace leaves the old file and no temp file, and names the user's path."""
from __future__ import annotations

import errno

import fs_faults
import pytest

from ds_gpt import atomic
from ds_gpt.errors import UserError


@pytest.fixture
def mounts():
    yield from fs_faults.mounted()


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
