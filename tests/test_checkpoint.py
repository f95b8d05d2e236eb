"""Checkpoint bookkeeping: pointer, completeness, retention (the engine side is in test_train.py)."""
from __future__ import annotations

import json

import pytest

from ds_gpt import checkpoint
from ds_gpt.atomic import write_text
from ds_gpt.checkpoint import CheckpointInfo, check_resumable, find_latest, tags_to_prune
from ds_gpt.errors import UserError


def fake_tag(out, n, complete=True):
    (out / f"global_step{n}").mkdir(parents=True)
    if complete:
        (out / f"global_step{n}" / checkpoint.MARKER).write_text(json.dumps({"iter_num": n, "model_args": {}}))


def test_seed_retention_schedule():
    iters = list(range(0, 120_001, 5000))
    kept = sorted(set(iters) - set(tags_to_prune(iters, keep_last=2, milestones={10000, 20000}, milestone_every=50000)))
    assert kept == [10000, 20000, 50000, 100000, 115000, 120000]


def test_find_latest_follows_pointer_and_skips_partial(tmp_path):
    fake_tag(tmp_path, 10)
    fake_tag(tmp_path, 20)
    fake_tag(tmp_path, 30, complete=False)  # crashed mid-save
    assert find_latest(tmp_path) is not None and find_latest(tmp_path).tag == "global_step20"
    write_text(tmp_path / "latest", "global_step30")  # DeepSpeed's premature pointer
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        assert find_latest(tmp_path).tag == "global_step20"
    write_text(tmp_path / "latest", "global_step10")
    assert find_latest(tmp_path).tag == "global_step10"
    assert find_latest(tmp_path / "missing") is None


def test_resume_refuses_another_layout_with_the_command_that_works():
    info = CheckpointInfo("global_step5", 5, {"model_args": {"n_layer": 2}, "world_size": 2, "zero_stage": 1, "out_dir": "o"})
    with pytest.raises(UserError, match="written by 2 rank.* at ZeRO-1; this run has 4 rank.* at ZeRO-3.*--init_from weights:o/global_step5"):
        check_resumable(info, 4, 3)
    check_resumable(info, 2, 1)


def test_write_text_leaves_no_temp_files(tmp_path):
    write_text(tmp_path / "latest", "a")
    write_text(tmp_path / "latest", "b")
    assert [p.name for p in tmp_path.iterdir()] == ["latest"] and (tmp_path / "latest").read_text() == "b"
