"""Bounded host memory: the loader's RSS stays flat over many full-size batches from a big file.

One long-lived np.memmap keeps every page a random window touches mapped, so RSS climbs with
the pages read (measured: +382 MB over 3000 batches of a 400 MB file); a long run can then
be OOM-killed by a cgroup that charges those pages to the job. The same measurement on that
variant must grow clearly, which shows the bound below can fail.
"""
from __future__ import annotations

import pytest

from ds_gpt.bench.common import LongLivedMemmapSampler, loader_rss, sampler_for, write_synthetic_bin

pytestmark = pytest.mark.slow

BATCH, BLOCK, VOCAB = 12, 1024, 512
FILE_TOKENS = 128 * 2**20  # 256 MiB of uint16
BATCHES, WARMUP = 1500, 20
OURS_MAX_MB = 30  # generous: allocator noise is a few MiB
# 18,000 windows of 1-2 pages over 65,536 pages keep ~90 MiB mapped even with 4 KiB faults; with
# 2 MiB page-cache folios (this kernel) each window maps a whole folio and it is the whole file.
LEAK_MIN_MB = 60


def test_sampler_rss_is_bounded_and_a_long_lived_memmap_is_not(tmp_path):
    tf = write_synthetic_bin(tmp_path / "train.bin", FILE_TOKENS, VOCAB)
    base, end = loader_rss(sampler_for(tf, BATCH, BLOCK, VOCAB), BATCHES, WARMUP)
    # From its first batch: the long-lived map would fill most of the file during a warm-up. The
    # allocator is already warm from the same shapes above.
    leak_base, leak_end = loader_rss(sampler_for(tf, BATCH, BLOCK, VOCAB, LongLivedMemmapSampler), BATCHES, 0)
    assert end - base < OURS_MAX_MB, f"RandomWindowSampler: RSS {base:.0f} -> {end:.0f} MiB over {BATCHES} batches"
    assert leak_end - leak_base > LEAK_MIN_MB, (
        f"the long-lived memmap grew only {leak_end - leak_base:.0f} MiB: the measurement cannot see a leak")
    print(f"\nRSS growth over {BATCHES} batches: RandomWindowSampler {end - base:+.1f} MiB, "
          f"long-lived memmap {leak_end - leak_base:+.1f} MiB")
