"""The sampler's os.preadv reads and the BatchPrefetcher: the same batches as before, read ahead."""
from __future__ import annotations

import gc
import hashlib
import subprocess
import threading

import numpy as np
import pytest
import torch
from helpers import PYTHON, REPO_ROOT

from ds_gpt.bench.common import MappedSampler
from ds_gpt.data import BatchPrefetcher, RandomWindowSampler, TokenFile
from ds_gpt.errors import UserError

N_TOKENS, BLOCK, VOCAB, SEED = 30_011, 16, 512, 1337
# sha256 (first 16 hex digits) of the concatenated (x, y) tensors, computed with the sampler that
# gathered windows through a mmap, before it read them with os.preadv: batches must not change.
PINNED = {  # (world, rank, micro, accum): (micro_batch of steps 0, 1, 7, 123456; eval_batch 0 and 3)
    (1, 0, 3, 2): ("5cef5f4aaf1df883", "00578daac416a145"),
    (2, 1, 2, 2): ("fdea409cd7643551", "6468d3ddc18d2ac2"),
    (4, 3, 5, 1): ("b082ca54a886f5e9", "a08dc2ed9b1811d2"),
}


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.fixture
def token_file(tmp_path) -> TokenFile:
    """A fixed file, free of any RNG: token i is (7919 i) mod 509."""
    path = tmp_path / "train.bin"
    ((np.arange(N_TOKENS, dtype=np.int64) * 7919) % 509).astype(np.uint16).tofile(path)
    return TokenFile(path, N_TOKENS)


def make(tf: TokenFile, world=1, rank=0, micro=3, accum=2, split="train", cls=RandomWindowSampler):
    return cls(tf, split, BLOCK, VOCAB, SEED, micro, accum, world, rank)


def prefetcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ds_gpt-batch-prefetch"]


@pytest.mark.parametrize("shape", PINNED)
def test_batches_are_pinned_to_the_previous_implementation(token_file, shape):
    world, rank, micro, accum = shape
    s = make(token_file, world, rank, micro, accum)
    train = [t for step in (0, 1, 7, 123456) for m in range(accum) for t in s.micro_batch(step, m)]
    val = make(token_file, world, rank, micro, accum, split="val")
    evals = [t for k in (0, 3) for t in val.eval_batch(k)]
    assert (digest(train), digest(evals)) == PINNED[shape]
    assert all(t.dtype == torch.int64 and t.is_contiguous() and t.shape == (micro, BLOCK) for t in train + evals)
    # The mmap reader the bench compares against reads the same windows.
    old = make(token_file, world, rank, micro, accum, cls=MappedSampler)
    assert digest([t for step in (0, 1, 7, 123456) for m in range(accum) for t in old.micro_batch(step, m)]) \
        == digest(train)


@pytest.mark.parametrize("seed", [0, 2**32 - 1, 2**32, 2**40 + 5])
def test_offsets_are_numpys_default_rng_of_seed_stream_split_step(token_file, seed):
    s = RandomWindowSampler(token_file, "val", BLOCK, VOCAB, seed, 3, 2, 1, 0)
    want = np.random.default_rng([seed, 1, 1, 99]).integers(0, N_TOKENS - BLOCK, size=6, dtype=np.int64)
    assert np.array_equal(s._offsets(1, 99, 6), want)


def test_a_new_seed_from_a_checkpoint_changes_the_very_next_batch(token_file):
    s, other = make(token_file), make(token_file)
    other.load_state_dict({"seed": SEED + 1})
    before = s.micro_batch(4, 0)[0]
    s.load_state_dict(other.state_dict())
    assert torch.equal(s.micro_batch(4, 1)[0], other.micro_batch(4, 1)[0])
    assert not torch.equal(s.micro_batch(4, 0)[0], before)


def test_a_file_truncated_under_the_run_is_a_user_error(token_file):
    s = make(token_file, micro=64, accum=1)
    with open(token_file.path, "r+b") as fh:
        fh.truncate(BLOCK * 4)
    with pytest.raises(UserError, match="replaced or truncated") as err:
        s.micro_batch(0, 0)
    # the file's length now, whichever window ran past it first
    assert f"now holds {BLOCK * 4 // 2} tokens, short of the {token_file.n_tokens}" in str(err.value)


def test_prefetcher_gives_the_samplers_micro_batches_in_any_order(token_file):
    s = make(token_file, world=2, rank=1, micro=2, accum=3)
    direct = make(token_file, world=2, rank=1, micro=2, accum=3)
    with BatchPrefetcher(s, "cpu", depth=2) as p:
        # the loop's order, then a step abandoned midway and asked again, a skip back, a jump ahead
        for step in [5, 6, 7, "abandon 8", 8, 3, 100, 101]:
            if step == "abandon 8":
                next(p.batches(8))
                continue
            got = list(p.batches(step))
            assert len(got) == 3
            for micro, (x, y) in enumerate(got):
                want_x, want_y = direct.micro_batch(step, micro)
                assert torch.equal(x, want_x) and torch.equal(y, want_y), (step, micro)
                # eval on the caller's thread while the reader runs
                assert torch.equal(s.eval_batch(micro)[0], direct.eval_batch(micro)[0])
    assert not prefetcher_threads()


def micro_batches_before_the_error(read) -> int:
    """How many micro-batches `read(step)` yields, over steps 0, 1, ..., before one raises."""
    n = 0
    with pytest.raises(UserError, match="token id 999"):
        for step in range(500):
            for _ in read(step):
                n += 1
    return n


def test_a_read_error_is_raised_in_the_caller_where_its_batch_was_due(token_file):
    data = np.zeros(N_TOKENS, dtype=np.uint16)
    data[15_000:15_100] = 999  # beyond VOCAB: one window in ~250 holds it
    data.tofile(token_file.path)
    direct = make(token_file, micro=4, accum=2)
    due = micro_batches_before_the_error(lambda step: (direct.micro_batch(step, m) for m in range(2)))
    p = BatchPrefetcher(make(token_file, micro=4, accum=2), "cpu")
    assert micro_batches_before_the_error(p.batches) == due > 0
    assert len(list(p.batches(0))) == 2  # a new reader starts after the error
    p.close()
    assert not prefetcher_threads()


def test_close_stops_the_reader_even_midway_and_is_final(token_file):
    p = BatchPrefetcher(make(token_file), "cpu", depth=3)
    next(p.batches(0))  # the reader is now blocked on a full queue
    assert len(prefetcher_threads()) == 1
    p.close()
    p.close()
    assert not prefetcher_threads()
    with pytest.raises(RuntimeError, match="after close"):
        next(p.batches(1))
    # Dropped without close(): the reader stops with its prefetcher.
    q = BatchPrefetcher(make(token_file), "cpu")
    next(q.batches(0))
    del q
    gc.collect()
    assert not prefetcher_threads()


def test_interpreter_exits_promptly_with_a_reader_running(token_file):
    code = (f"from ds_gpt.data import BatchPrefetcher, RandomWindowSampler, TokenFile\n"
            f"tf = TokenFile({str(token_file.path)!r}, {N_TOKENS})\n"
            f"s = RandomWindowSampler(tf, 'train', 16, 512, 0, 2, 2, 1, 0)\n"
            f"p = BatchPrefetcher(s, 'cpu')\n"
            f"next(p.batches(0))\n")
    proc = subprocess.run([PYTHON, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
