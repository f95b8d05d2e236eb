"""Each benchmark runs end to end with tiny settings and writes its figures as one JSON object
(--json FILE); the figures are not judged, only that they are there and consistent."""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys

import pytest
from helpers import PYTHON, REPO_ROOT, forked_script

from ds_gpt.bench.__main__ import main as bench_main


def bench_script() -> None:
    """`python -m ds_gpt.bench ARGV`, as a forked process runs it (helpers.forked_script)."""
    sys.exit(bench_main(sys.argv[1:]))


def bench(tmp_path, what: str, *args: str, in_process: bool = False, timeout: int = 300) -> dict:
    """Run `python -m ds_gpt.bench <what> ... --json FILE` in a forked process (or its main() in
    this one) and return the JSON, checked for the fields every benchmark writes."""
    out = tmp_path / f"{what}.json"
    argv = [what, *args, "--json", str(out)]
    if in_process:
        assert bench_main(argv) == 0
    else:
        forked_script(1, bench_script, *argv, log_dir=tmp_path / f"{what}.logs", timeout=timeout)
    figures = json.loads(out.read_text())
    assert figures["benchmark"] == what and re.fullmatch(r"\d{4}-\d\d-\d\d", figures["date"])
    assert figures["machine"] and len(figures["load_average"]) == 3 and "torch" in figures["versions"]
    return figures


@pytest.mark.slow
def test_prepare_writes_the_same_files_as_nanogpts_way(tmp_path):
    figures = bench(tmp_path, "prepare", "--num_proc", "1", "--repeat", "1")
    results = figures["results"]
    assert set(results) == {"ds_gpt.prepare", "nanoGPT (datasets.map)"} and figures["identical_files"] is True
    for r in results.values():
        assert r["tokens_per_s"] * r["seconds"] == pytest.approx(figures["tokens"])
    assert figures["speed_up"] == pytest.approx(
        results["nanoGPT (datasets.map)"]["seconds"] / results["ds_gpt.prepare"]["seconds"])


def test_loader_reports_every_loader_warm_and_cold(tmp_path):
    figures = bench(tmp_path, "loader", "--synthetic_mb", "4", "--seconds", "0.1", "--rounds", "2", "--batch", "3",
                    "--cold", "--cold_gb", "1", "--alternatives", in_process=True)
    assert (figures["batch"], figures["block"]) == (3, 1024)
    everyone = {"RandomWindowSampler", "nanoGPT get_batch", "mmap + MADV_DONTNEED (previous)",
                "mmap + MADV_RANDOM + MADV_DONTNEED", "one long-lived mmap (RSS grows)",
                "os.preadv into a fresh buffer per batch", "os.pread per window, then np.stack"}
    # A long-lived map's pages cannot be dropped from the page cache: it has no cold figure.
    expected = {"warm": (2 * 2**20, everyone), "cold": (2**29, everyone - {"one long-lived mmap (RSS grows)"})}
    for mode, (tokens, names) in expected.items():
        result = figures[mode]
        assert result["tokens"] == tokens and set(result["loaders"]) == names, mode
        for name, r in result["loaders"].items():
            assert len(r["rounds_batches_per_s"]) == 2 and min(r["rounds_batches_per_s"]) > 0, (mode, name)
            assert r["batches_per_s"] == pytest.approx(statistics.median(r["rounds_batches_per_s"]))
            assert r["us_per_window"] == pytest.approx(1e6 / (r["batches_per_s"] * 3)), (mode, name)
        rate = {name: r["batches_per_s"] for name, r in result["loaders"].items()}
        assert result["speed_up"] == pytest.approx(rate["RandomWindowSampler"] / rate["nanoGPT get_batch"])


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,extra", [("0", ()), ("1", ("--compile", "--plain_fused"))])
def test_step_reports_tokens_per_s_overhead_and_mfu(tmp_path, zero_stage, extra):
    figures = bench(tmp_path, "step", "--zero_stage", zero_stage, "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
                    "--block_size", "32", "--vocab_size", "256", "--iters", "2", "--warmup", "1",
                    "--profile_iters", "1", *extra)
    # Same init, data, lr and clipping: the two loops train the same model, so the comparison is fair.
    assert figures["max_loss_difference"] < 1e-4
    assert set(figures["results"]) == {"DeepSpeed (ds_gpt)", "plain PyTorch"}
    for result in figures["results"].values():
        assert 0 < result["mfu"] < 1 and result["tokens_per_s"] * result["ms_per_iter"] / 1000 == pytest.approx(256)
    assert ("torch.compile" in figures["setting"]) == ("--compile" in extra)
    assert ("plain loop with fused AdamW" in figures["setting"]) == ("--plain_fused" in extra)
    assert figures["host_syncs_per_step"] is None  # counted on a GPU only: CPU work is synchronous
    # ds_gpt's speed over the plain loop's, one ratio per pair of back-to-back steps, with its spread.
    speed = figures["speed_ratio_paired"]
    assert len(speed["values"]) == 2 and speed["median"] == pytest.approx(statistics.median(speed["values"]))
    assert speed["ci95"][0] <= speed["median"] <= speed["ci95"][1] and speed["iqr"][0] <= speed["iqr"][1]
    assert figures["overhead_paired"] == pytest.approx(statistics.median(1 / r for r in speed["values"]) - 1)
    lo, hi = speed["ci95"]
    assert figures["verdict"] == ("ds_gpt faster" if lo > 1 else "ds_gpt slower" if hi < 1
                                  else "no difference this run can resolve")
    if "--compile" in extra:  # the profiler's markers would be compiled into the model: no split
        assert figures["breakdown"] == {} and figures["overhead_excess_fraction"] is None
        return
    # Each profiled step splits into the model's forward, backward and optimizer, and the rest.
    assert set(figures["breakdown"]) == set(figures["results"])
    for split in figures["breakdown"].values():
        parts = [split[f"{p}_ms"] for p in ("forward", "backward", "optimizer")]
        assert split["steps"] == 1 and min(parts) > 0 and 0 <= split["overhead_fraction"] < 1
        assert sum(parts) + split["overhead_ms"] == pytest.approx(split["step_ms"], rel=1e-6)
        assert split["overhead_ms"] == pytest.approx(split["overhead_fraction"] * split["step_ms"])
    ds_split, plain_split = (figures["breakdown"][name] for name in ("DeepSpeed (ds_gpt)", "plain PyTorch"))
    assert figures["overhead_excess_fraction"] == pytest.approx(
        (ds_split["overhead_ms"] - plain_split["overhead_ms"]) / ds_split["step_ms"])


def test_step_refuses_a_count_below_one():
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.bench", "step", "--iters", "0"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--iters: must be a positive integer (got '0')" in proc.stderr


@pytest.mark.slow
def test_memory_reports_trainer_and_loader_growth(tmp_path):
    # 300 iterations keep the loop running for seconds after the baseline: with 30 it lasted ~0.2 s
    # past iteration 10, and on a slow machine no RSS sample fell inside it.
    figures = bench(tmp_path, "memory", "--iters", "300", "--warmup", "50", "--synthetic_gb", "0.02", "--block", "64")
    trainer = figures["trainer"]
    assert 0 < trainer["base_mib"] <= trainer["max_mib"] and trainer["minutes"] > 0
    assert trainer["growth_mib"] == pytest.approx(trainer["end_of_loop_mib"] - trainer["base_mib"])
    loader = figures["loader"]
    assert list(loader) == ["loader, RandomWindowSampler (ours)", "loader, one long-lived mmap"]
    assert [r["batches"] for r in loader.values()] == [250, 300]
    for r in loader.values():
        assert r["base_mib"] > 0 and r["growth_mib"] == pytest.approx(r["end_mib"] - r["base_mib"])


@pytest.mark.slow
def test_checkpoint_reports_save_and_verify_times(tmp_path):
    figures = bench(tmp_path, "checkpoint", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
                    "--block_size", "32", "--vocab_size", "256", "--dir", str(tmp_path))
    assert figures["n_params"] == 12 * 32 * 32 + 256 * 32 + 32 * 32 + 3 * 32  # blocks, wte, wpe, 3 norms
    assert 0 < figures["checksums_s"] < figures["save_s"] and figures["verify_s"] > 0 and figures["bytes"] > 0
    # a test-sized model is not labelled with the GPT-2 size its shape flags replaced
    assert figures["setting"]["model"] == ("GPT-2 124M's shape with n_layer=1 n_head=2 n_embd=32 block_size=32 "
                                           "vocab_size=256")
    assert figures["setting"]["model_args"]["n_layer"] == 1
