"""The random-window loader: a pure function of (seed, step), vectorised, checked inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ds_gpt.data import RandomWindowSampler, check_data_dir, check_token_file
from ds_gpt.errors import UserError


def sampler(token_bins, world, rank, micro=2, accum=1, seed=7, split="train", block=16, vocab=512):
    files = check_data_dir(token_bins, block, vocab)
    return RandomWindowSampler(files[split], split, block, vocab, seed, micro, accum, world, rank)


def test_windows_are_shifted_slices_of_the_file(token_bins):
    s = sampler(token_bins, 1, 0, micro=4)
    x, y = s.micro_batch(step=3, micro_step=0)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    data = np.fromfile(token_bins / "train.bin", dtype=np.uint16).astype(np.int64)
    offsets = s._offsets(0, 3, 4)
    for row, off in zip(range(4), offsets, strict=True):
        assert torch.equal(x[row], torch.from_numpy(data[off:off + 16]))
        assert torch.equal(y[row], torch.from_numpy(data[off + 1:off + 17]))


def test_global_batch_is_the_same_for_every_world_size(token_bins):
    """1 rank x accum 4 == 2 ranks x accum 2 == 4 ranks x accum 1, in order."""
    def global_batch(world, accum):
        rows = [sampler(token_bins, world, r, micro=2, accum=accum).micro_batch(5, m)[0]
                for r in range(world) for m in range(accum)]
        return torch.cat(rows)
    one = global_batch(1, 4)
    assert torch.equal(one, global_batch(2, 2)) and torch.equal(one, global_batch(4, 1))
    assert not torch.equal(one, sampler(token_bins, 1, 0, micro=8).micro_batch(6, 0)[0])  # steps differ


def test_pure_function_of_seed_and_step(token_bins):
    a, b = sampler(token_bins, 2, 1), sampler(token_bins, 2, 1)
    b.micro_batch(0, 0)  # reading other steps first changes nothing
    assert torch.equal(a.micro_batch(9, 0)[0], b.micro_batch(9, 0)[0])
    assert not torch.equal(a.micro_batch(9, 0)[0], sampler(token_bins, 2, 1, seed=8).micro_batch(9, 0)[0])


def test_eval_batches_repeat_and_differ_per_rank(token_bins):
    r0, r1 = sampler(token_bins, 2, 0, split="val"), sampler(token_bins, 2, 1, split="val")
    assert torch.equal(r0.eval_batch(3)[0], r0.eval_batch(3)[0])
    assert not torch.equal(r0.eval_batch(3)[0], r1.eval_batch(3)[0])


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "train.bin").unlink(), "train.bin not found"),
    (lambda d: (d / "val.bin").write_bytes(b""), "val.bin is empty"),
    (lambda d: (d / "train.bin").write_bytes(b"\x01\x00\x02"), "odd size (3 bytes)"),
    (lambda d: np.array([5, 600, 7] * 100, dtype=np.uint16).tofile(d / "val.bin"), "token id 600 >= vocab_size 512"),
    (lambda d: np.arange(10, dtype=np.uint16).tofile(d / "val.bin"), "too few for block_size 16"),
    (lambda d: (d / "meta.json").write_text(json.dumps({"splits": {"train": {"tokens": 5}}})), "meta.json says 5"),
    (lambda d: (d / "meta.json").write_text("{"), "meta.json is not valid JSON"),
    (lambda d: (d / "meta.json").write_bytes(b'{"dataset": "caf\xe9"}'),
     "meta.json is not UTF-8 text (invalid byte at offset 16)"),
    (lambda d: (d / "meta.json").write_text("[1, 2]"), "meta.json is not a ds_gpt meta.json"),
    # sizes, as prepare records them: a file from another run (or cut short) is refused, naming the fix
    (lambda d: (d / "meta.json").write_text(json.dumps({"dataset": "shakespeare", "splits": {"val": {"bytes": 6000}}})),
     "val.bin holds 4000 tokens but meta.json says 3000"),
    (lambda d: (d / "meta.json").write_text(json.dumps({"dataset": "shakespeare", "splits": {"val": {"bytes": 6000}}})),
     "HINT: rewrite the set: python -m ds_gpt.prepare --dataset shakespeare --out_dir "),
    (lambda d: (d / "train.bin").unlink() or (d / "train.bin").mkdir(), "train.bin is not a file"),
])
def test_bad_data_is_a_user_error(token_bins, damage, message):
    damage(token_bins)
    with pytest.raises(UserError) as err:
        check_data_dir(token_bins, 16, 512)
    assert message in str(err.value)


def test_nanogpt_bins_without_meta_json_are_accepted(token_bins):
    assert not (token_bins / "meta.json").exists()
    files = check_data_dir(token_bins, 16, 512)
    assert (files["train"].n_tokens, files["val"].n_tokens) == (20_000, 4_000)


def test_ids_beyond_vocab_in_a_big_file_are_caught_when_read(token_bins):
    """Files too big for a full scan are checked at both ends, and every batch as it is read."""
    data = np.zeros(50_000, dtype=np.uint16)
    data[25_000:25_100] = 999
    data.tofile(token_bins / "train.bin")
    f = check_token_file(token_bins / "train.bin", 16, 512, full_scan_limit=1000, end_tokens=1000)  # middle not scanned
    s = RandomWindowSampler(f, "train", 16, 512, 0, 64, 1, 1, 0)
    with pytest.raises(UserError, match="token id 999"):
        for step in range(200):
            s.micro_batch(step, 0)
