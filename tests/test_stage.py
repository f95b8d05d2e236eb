"""ds_gpt.stage: data checked against meta.json, and copies that are verified before they count."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from helpers import write_token_bins

from ds_gpt.errors import UserError
from ds_gpt.stage import stage, verify


def write_meta(data_dir: Path) -> Path:
    """meta.json as ds_gpt.prepare writes it (tokens and sha256 per split) for write_token_bins' files."""
    splits = {}
    for split in ("train", "val"):
        raw = (data_dir / f"{split}.bin").read_bytes()
        splits[split] = {"tokens": len(raw) // 2, "sha256": hashlib.sha256(raw).hexdigest()}
    (data_dir / "meta.json").write_text(json.dumps({"vocab_size": 512, "dtype": "uint16", "splits": splits}))
    return data_dir


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_meta(write_token_bins(tmp_path / "data", n_train=4000, n_val=1000))


def test_verify_sizes_and_sha256(data: Path) -> None:
    assert verify(data, checksum=True) == {"bytes": 10_000, "sha256_checked": True, "meta": True}
    raw = bytearray((data / "train.bin").read_bytes())
    raw[100] ^= 1
    (data / "train.bin").write_bytes(raw)  # same size, one bit off
    assert verify(data, checksum=False)["sha256_checked"] is False
    with pytest.raises(UserError, match="sha256 differs"):
        verify(data, checksum=True)
    (data / "val.bin").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="has 10 bytes but meta.json says 2000"):
        verify(data, checksum=False)


def test_verify_without_meta_checks_presence_only(tmp_path: Path) -> None:
    data = write_token_bins(tmp_path / "nanogpt")  # nanoGPT's bins come without meta.json
    assert verify(data, checksum=True) == {"bytes": 48_000, "sha256_checked": False, "meta": False}
    (data / "val.bin").unlink()
    with pytest.raises(UserError, match="val.bin not found"):
        verify(data, checksum=True)


def test_stage_copies_verifies_and_skips_a_good_copy(data: Path, tmp_path: Path) -> None:
    dst = tmp_path / "local" / "data"
    assert stage(data, dst)["copied"] is True
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (dst / name).read_bytes() == (data / name).read_bytes()
    assert sorted(os.listdir(dst)) == ["meta.json", "train.bin", "val.bin"]
    assert stage(data, dst)["copied"] is False
    (dst / "val.bin").write_bytes(b"\0" * 2000)  # same size, other bytes: copied again
    assert stage(data, dst)["copied"] is True and (dst / "val.bin").read_bytes() == (data / "val.bin").read_bytes()


def test_corrupt_source_leaves_no_copy(data: Path, tmp_path: Path) -> None:
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["val"]["sha256"] = "0" * 64
    (data / "meta.json").write_text(json.dumps(meta))
    dst = tmp_path / "local"
    with pytest.raises(UserError, match="val.bin: sha256 differs"):
        stage(data, dst)
    # train.bin went in (it checked), but no meta.json vouches for the directory, and no partial file is left.
    assert sorted(os.listdir(dst)) == ["train.bin"]


def test_stage_needs_meta_and_another_place(tmp_path: Path, data: Path) -> None:
    with pytest.raises(UserError, match="onto itself"):
        stage(data, data)
    with pytest.raises(UserError, match="meta.json not found"):
        stage(write_token_bins(tmp_path / "nanogpt"), tmp_path / "dst")
