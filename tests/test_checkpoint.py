"""Checkpoint bookkeeping: pointer, completeness, retention (the engine side is in test_train.py)."""
from __future__ import annotations

import json
import shutil

import pytest

from ds_gpt import checkpoint
from ds_gpt.atomic import write_text
from ds_gpt.checkpoint import find_latest, tags_to_prune
from ds_gpt.errors import UserError

# What a save writes besides iter_num and files (ds_gpt.run_dir.marker)
MARKER = {"model_args": {"block_size": 32, "vocab_size": 512, "n_layer": 1, "n_head": 1, "n_embd": 16},
          "world_size": 1, "zero_stage": 1, "dtype": "float32"}


def fake_tag(out, n, complete=True, files=None):
    """A tag directory; `files` (name -> bytes) are written and recorded in its marker, as a save does."""
    tag_dir = out / f"global_step{n}"
    tag_dir.mkdir(parents=True)
    for name, data in (files or {}).items():
        (tag_dir / name).write_bytes(data)
    if complete:
        record = {name: checkpoint.file_digest(tag_dir / name) for name in files or {}}
        (tag_dir / checkpoint.MARKER).write_text(json.dumps({**MARKER, "iter_num": n, "files": record}))


def warnings_of(out):
    seen = []
    return seen, (lambda message: seen.append(message))


def test_seed_retention_schedule():
    iters = list(range(0, 120_001, 5000))
    kept = sorted(set(iters) - set(tags_to_prune(iters, keep_last=2, milestones={10000, 20000}, milestone_every=50000)))
    assert kept == [10000, 20000, 50000, 100000, 115000, 120000]


def test_find_latest_takes_the_newest_complete_tag_whatever_the_pointer_says(tmp_path):
    fake_tag(tmp_path, 10)
    fake_tag(tmp_path, 20)
    fake_tag(tmp_path, 30, complete=False)  # crashed mid-save
    seen, warn = warnings_of(tmp_path)
    assert find_latest(tmp_path, warn).tag == "global_step20"
    assert seen == [f"skipping incomplete checkpoint(s) global_step30 in {tmp_path}"]
    write_text(tmp_path / "latest", "global_step10")  # a kill between the marker of 20 and the pointer
    assert find_latest(tmp_path, warn).tag == "global_step20"
    assert find_latest(tmp_path / "missing", warn) is None


SHARDS = {"mp_rank_00_model_states.pt": b"weights" * 100, "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"adam" * 100}


def damaged(tag_dir, how):
    shard = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif how == "missing":
        shard.unlink()
    elif how == "flipped":
        data = bytearray(shard.read_bytes())
        data[17] ^= 0x01
        shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("how", ["truncated", "missing", "flipped"])
def test_a_damaged_tag_falls_back_to_the_newest_older_one_that_verifies(tmp_path, how):
    fake_tag(tmp_path, 10, files=SHARDS)
    fake_tag(tmp_path, 20, files=SHARDS)
    shard = damaged(tmp_path / "global_step20", how)
    seen, warn = warnings_of(tmp_path)
    assert find_latest(tmp_path, warn).tag == "global_step10"
    assert len(seen) == 1 and seen[0].startswith(f"skipping checkpoint global_step20: {shard}")
    with pytest.raises(UserError, match=f"checkpoint global_step20 is damaged: {shard}"):
        checkpoint.resolve_tag(tmp_path, "global_step20")  # sample/export of that tag by name: refused
    assert checkpoint.resolve_tag(tmp_path, None) == "global_step10"


def test_no_tag_that_verifies_is_one_error(tmp_path):
    fake_tag(tmp_path, 10, files=SHARDS)
    damaged(tmp_path / "global_step10", "flipped")
    with pytest.raises(UserError, match="no checkpoint in .* verifies"):
        find_latest(tmp_path, warnings_of(tmp_path)[1])


@pytest.mark.parametrize("pointer", ["binary", "directory"])
def test_an_unreadable_pointer_is_a_warning(tmp_path, pointer):
    fake_tag(tmp_path, 10, files=SHARDS)
    if pointer == "binary":
        (tmp_path / "latest").write_bytes(b"\xff\xfe\x00global")
    else:
        (tmp_path / "latest").mkdir()
    seen, warn = warnings_of(tmp_path)
    assert find_latest(tmp_path, warn).tag == "global_step10"
    assert len(seen) == 1 and seen[0].startswith(f"{tmp_path / 'latest'} is unreadable")


@pytest.mark.parametrize("marker", [b"[1, 2]", b"\x80\x81binary", b'{"iter_num": 20}', b"{not json"])
def test_a_marker_that_is_not_ours_leaves_the_tag_incomplete(tmp_path, marker):
    fake_tag(tmp_path, 10, files=SHARDS)
    fake_tag(tmp_path, 20, complete=False)
    (tmp_path / "global_step20" / checkpoint.MARKER).write_bytes(marker)
    assert find_latest(tmp_path, warnings_of(tmp_path)[1]).tag == "global_step10"


def test_write_text_leaves_no_temp_files(tmp_path):
    write_text(tmp_path / "latest", "a")
    write_text(tmp_path / "latest", "b")
    assert [p.name for p in tmp_path.iterdir()] == ["latest"] and (tmp_path / "latest").read_text() == "b"


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m.pop("world_size"), "its world_size is null, not a positive integer"),
    (lambda m: m.update(model_args="124M"), "its model_args is str, not an object"),
    (lambda m: m.update(zero_stage="one"), 'its zero_stage is "one", not 0-3'),
    (lambda m: next(iter(m["files"].values())).pop("bytes"), "its files record lacks a size (bytes)"),
])
def test_a_marker_of_the_wrong_shape_is_damage_and_the_older_tag_is_taken(tmp_path, edit, problem):
    fake_tag(tmp_path, 10, files=SHARDS)
    fake_tag(tmp_path, 20, files=SHARDS)
    path = tmp_path / "global_step20" / checkpoint.MARKER
    marker = json.loads(path.read_text())
    edit(marker)
    path.write_text(json.dumps(marker))
    seen, warn = warnings_of(tmp_path)
    assert find_latest(tmp_path, warn).tag == "global_step10"
    assert len(seen) == 1 and seen[0].startswith(
        f"skipping checkpoint global_step20: its completion marker {path} is malformed: {problem}"), seen
    with pytest.raises(UserError, match="checkpoint global_step20 is damaged: its completion marker") as err:
        checkpoint.resolve_tag(tmp_path, "global_step20")
    assert "pick an older tag" in err.value.hint


# --- what a real run's checkpoints record (the tiny_run fixture: eval and checkpoint every 2 iterations)

def test_a_checkpoint_carries_the_eval_of_its_own_iteration(tiny_run, tmp_path):
    """best_val_loss counts the eval at the checkpoint's iteration (saved after it), in the exports too."""
    import torch
    from helpers import read_jsonl

    from ds_gpt import export

    evals = {e["iter"]: e["val_loss"] for e in read_jsonl(tiny_run / "out" / "metrics.jsonl") if "val_loss" in e}
    assert sorted(evals) == [0, 2, 4] and evals[2] < evals[0]  # learning: the eval at 2 is the best so far
    for n in (2, 4):
        _, client = checkpoint.load_fp32_state_dict(tiny_run / "out", f"global_step{n}")
        assert client["best_val_loss"] == min(v for i, v in evals.items() if i <= n), n
    argv = ["--out_dir", str(tiny_run / "out"), "--tag", "global_step2", "--dest", str(tmp_path / "ng")]
    assert export.main([*argv, "--format", "nanogpt"]) == 0
    assert torch.load(tmp_path / "ng" / "ckpt.pt", weights_only=True)["best_val_loss"] == evals[2]


def test_resume_compares_the_tokenizer_the_checkpoint_was_trained_on(tiny_run, tmp_path):
    """Data re-prepared in place with another tokenizer: the saved data directory now names the new
    one too, so only the checkpoint's own record can tell."""
    from helpers import TINY_RUN_TOKENIZER, tiny_run_args

    from ds_gpt.startup import build_run

    marker = json.loads((tiny_run / "out" / "global_step4" / checkpoint.MARKER).read_text())
    assert marker["tokenizer"] == f"gpt2 (sha256 {TINY_RUN_TOKENIZER['tokenizer_sha256'][:12]})"
    shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("logs"))
    meta = tmp_path / "run" / "data" / "meta.json"
    meta.write_text(json.dumps({"tokenizer": "cl100k_base", "tokenizer_sha256": "f" * 64, "vocab_size": 512}))
    argv = [*tiny_run_args(tmp_path / "run", tmp_path / "run" / "out"), "--max_iters", "6", "--init_from", "resume"]
    with pytest.raises(UserError, match=r"tokenized with gpt2 \(sha256 0123456789ab\); --data_dir .* is tokenized "
                                        r"with cl100k_base"):
        build_run(argv)
