"""Each benchmark runs end to end with tiny settings and prints its figures (they are not judged)."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import PYTHON, REPO_ROOT


def bench(*args: str, timeout: int = 300) -> str:
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.bench", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_prepare_writes_the_same_files_as_nanogpts_way():
    out = bench("prepare", "--num_proc", "1", "--repeat", "1")
    assert "ds_gpt.prepare" in out and "nanoGPT (datasets.map)" in out and "speed-up" in out
    assert "identical train.bin/val.bin: yes" in out


def test_loader_prints_both_rates_and_the_speed_up():
    out = bench("loader", "--synthetic_mb", "4", "--seconds", "0.2", "--rounds", "2")
    rates = {name: float(rate.replace(",", "")) for name, rate in
             re.findall(r"^  (RandomWindowSampler|nanoGPT get_batch) +([\d,]+) batches/s", out, re.M)}
    assert set(rates) == {"RandomWindowSampler", "nanoGPT get_batch"} and min(rates.values()) > 0
    speed_up = float(re.search(r"speed-up ([\d.]+)x", out).group(1))
    assert speed_up == pytest.approx(rates["RandomWindowSampler"] / rates["nanoGPT get_batch"], abs=0.06)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,extra", [("0", ()), ("1", ("--compile",))])
def test_step_prints_tokens_per_s_overhead_and_mfu(tmp_path, zero_stage, extra):
    out = bench("step", "--zero_stage", zero_stage, "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
                "--block_size", "32", "--vocab_size", "256", "--iters", "2", "--warmup", "1", *extra,
                "--json", str(tmp_path / "step.json"))
    assert out.count("tokens/s") == 2 and "MFU" in out and "DeepSpeed overhead" in out
    # Same init, data, lr and clipping: the two loops train the same model, so the comparison is fair.
    drift = float(re.search(r"largest loss difference between the two (\S+)", out).group(1))
    assert drift < 1e-4
    figures = json.loads((tmp_path / "step.json").read_text())
    assert figures["max_loss_difference"] == pytest.approx(drift, abs=1e-6)
    assert set(figures["results"]) == {"DeepSpeed (ds_gpt)", "plain PyTorch"}
    for name, result in figures["results"].items():
        assert f"{result['tokens_per_s']:,.0f} tokens/s" in out, name
        assert 0 < result["mfu"] < 1 and result["tokens_per_s"] * result["ms_per_iter"] / 1000 == pytest.approx(256)
    assert ("torch.compile" in figures["setting"]) == ("--compile" in extra)


def test_step_refuses_a_count_below_one():
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.bench", "step", "--iters", "0"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--iters: 0 is not a positive integer" in proc.stderr


@pytest.mark.slow
def test_memory_prints_trainer_and_loader_growth():
    # 300 iterations keep the loop running for seconds after the baseline: with 30 it lasted ~0.2 s
    # past iteration 10, and on a slow machine no RSS sample fell inside it.
    out = bench("memory", "--iters", "300", "--warmup", "50", "--synthetic_gb", "0.02", "--block", "64")
    # Each line: RSS before -> after = growth; the growth must be the difference it claims.
    lines = re.findall(r"^  (trainer \(.*?\):|loader, .*?)\s+RSS ([\d,]+) -> ([\d,]+) MiB.*?= ([+-][\d,]+) MiB",
                       out, re.M)
    assert [name.split(" (python")[0] for name, *_ in lines] == [
        "trainer", "loader, pages dropped per batch (ours)", "loader, one long-lived memmap"], out
    for _, before, after, growth in lines:
        before, after, growth = (int(v.replace(",", "")) for v in (before, after, growth))
        assert before > 0 and abs(after - before - growth) <= 1
