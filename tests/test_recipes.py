"""The short-schedule recipes: the WSD schedule, the shipped 10B-token and Muon configs, plan's time to finish."""
from __future__ import annotations

import json

import pytest

from ds_gpt import plan
from ds_gpt.config import parse_args
from ds_gpt.errors import UserError
from ds_gpt.run_config import resolve

SCHEDULE = ["--warmup_iters", "10", "--lr_decay_iters", "100", "--max_iters", "100", "--learning_rate", "1e-3",
            "--min_lr", "1e-4"]


def test_wsd_holds_the_peak_after_warmup_then_cools_down_linearly_to_min_lr():
    run = resolve(parse_args([*SCHEDULE, "--lr_schedule", "wsd", "--cooldown_frac", "0.25"]), 1, cuda=False)
    assert run.lr_at(0) == pytest.approx(1e-3 / 11)  # the warmup is the cosine's
    assert [run.lr_at(i) for i in (10, 40, 75)] == [1e-3] * 3  # stable until 100 - 25
    assert run.lr_at(85) == pytest.approx(1e-3 + 0.4 * (1e-4 - 1e-3))  # 10 of the 25 cool-down iterations
    assert [run.lr_at(i) for i in (100, 150)] == pytest.approx([1e-4, 1e-4])
    cosine = resolve(parse_args(SCHEDULE), 1, cuda=False)  # the default is still nanoGPT's cosine
    assert cosine.train.lr_schedule == "cosine" and cosine.lr_at(55) == pytest.approx((1e-3 + 1e-4) / 2)


@pytest.mark.parametrize("argv, message", [
    (["--lr_schedule", "linear"], r"--lr_schedule must be one of cosine, wsd \(got 'linear'\)"),
    (["--cooldown_frac", "0"], r"cooldown_frac must be in \(0, 1\] \(got 0.0\)"),
    (["--cooldown_frac", "1.5"], r"cooldown_frac must be in \(0, 1\] \(got 1.5\)")])
def test_bad_schedules_are_refused(argv, message):
    with pytest.raises(UserError, match=message):
        parse_args(argv)


@pytest.mark.parametrize("name, iters, optimizer", [("gpt2_10b", 19_073, "adamw"), ("gpt2_muon", 14_000, "muon")])
def test_plan_prints_tokens_iterations_and_hours_to_finish_a_shipped_config(capsys, name, iters, optimizer):
    run = resolve(parse_args(["--config", f"config/{name}.toml"]), 8, cuda=True)
    assert (run.optimizer, run.tokens_per_iter, run.train.max_iters) == (optimizer, 491_520, iters)
    assert plan.main(["--config", f"config/{name}.toml", "--gpus", "8", "--gpu", "a100", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert (p["max_iters"], p["tokens_to_finish"]) == (iters, iters * 491_520)
    assert p["hours_to_finish"] == pytest.approx(p["iter_time_s"] * iters / 3600)
    assert p["gpu_hours"] == pytest.approx(8 * p["hours_to_finish"])
    assert plan.main(["--config", f"config/{name}.toml", "--gpus", "8", "--gpu", "a100"]) == 0
    assert f"to finish: {iters * 491_520 / 1e9:.2f}B tokens, {iters:,} iterations" in capsys.readouterr().out


def bench_main() -> None:
    """`python -m ds_gpt.bench ARGS` in a forked rank (helpers.forked_script sets sys.argv), Muon's
    kernels eagerly (the same arithmetic without torch.compile's start-up)."""
    import sys

    import torch._dynamo

    from ds_gpt.bench.__main__ import main
    torch._dynamo.config.disable = True
    main(sys.argv[1:])


@pytest.mark.slow
def test_recipe_bench_writes_the_sweep_and_the_token_ratio(tmp_path, token_bins):
    from helpers import forked_script

    out = tmp_path / "recipe.json"
    tiny = ["--n_layer", "1", "--n_head", "1", "--n_embd", "16", "--block_size", "16", "--batch_size", "2",
            "--steps", "4", "--eval_every", "2", "--eval_iters", "1"]
    forked_script(1, bench_main, "recipe", "--data_dir", str(token_bins), *tiny, "--json", str(out),
                  log_dir=tmp_path / "logs")
    r = json.loads(out.read_text())
    assert {len(r["sweep"]["reference"]), len(r["sweep"]["muon"])} == {3}
    assert r["reference_final_val_loss"] == min(run["final_val_loss"] for run in r["sweep"]["reference"])
    assert r["muon_final_val_loss"] == min(run["final_val_loss"] for run in r["sweep"]["muon"])
    assert r["reference_tokens"] == 4 * 2 * 16
    if r["tokens_to_reference_loss"] is None:
        assert r["token_ratio"] is None and r["muon_final_val_loss"] > r["reference_final_val_loss"]
    else:
        assert 0 < r["tokens_to_reference_loss"] <= r["reference_tokens"]
        assert r["token_ratio"] == pytest.approx(r["reference_tokens"] / r["tokens_to_reference_loss"])


def test_the_gpu_bench_refuses_a_machine_without_cuda_in_one_line():
    import torch

    from ds_gpt.bench.__main__ import main
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        main(["gpu", "--json", "unused.json"])


def test_the_gpu_bench_synthetic_hellaswag_set_prepares_like_the_real_one(tmp_path, gpt2_ranks):
    """bench gpu times a HellaSwag pass on a set written by write_synthetic_hellaswag, prepared by the
    real `prepare --dataset hellaswag --data_files` path: items of about the validation split's lengths."""
    from ds_gpt import hellaswag
    from ds_gpt.bench.gpu import write_synthetic_hellaswag

    write_synthetic_hellaswag(tmp_path / "hs.jsonl", 40)
    meta = hellaswag.prepare(tmp_path / "hellaswag", [str(tmp_path / "hs.jsonl")])
    assert meta["items"] == 40
    hs = hellaswag.load(tmp_path / "hellaswag")
    per_item = meta["tokens"] / 40  # the real split: ~100-130 tokens per item (context + 4 endings)
    assert len(hs) == 40 and 80 < per_item < 250 and set(hs.label.tolist()) <= {0, 1, 2, 3}
