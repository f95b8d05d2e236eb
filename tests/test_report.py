"""report.md / report.png from a synthetic run directory, and TensorBoard read back over HTTP."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_gpt import report as R
from ds_gpt.errors import UserError
from ds_gpt.mfu import flops_per_token, mfu

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FPT_124M = flops_per_token(123_689_472, 12, 768, 1024)  # 855,383,040 (see test_mfu)
TOKENS_PER_ITER = 491_520


def write_run(out: Path, *, agree: bool = True, config: bool = True) -> Path:
    """The reference run's 8 x A100 run in miniature: 20 iterations of the 124M recipe."""
    out.mkdir(parents=True, exist_ok=True)
    if config:
        (out / "config.json").write_text(json.dumps({
            "world_size": 8, "launcher": "srun", "hosts": ["gpu-1", "gpu-2"], "device": "NVIDIA A100-SXM4-40GB",
            "model": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50304},
            "train": {"dtype": "bfloat16", "max_iters": 20, "activation_checkpointing": "full"},
            "dtype": "bfloat16", "zero_stage": 1,
            "peak_source": "table:A100",
            "ds_config": {"zero_optimization": {"stage": 1}, "train_batch_size": 480,
                          "train_micro_batch_size_per_gpu": 12, "gradient_accumulation_steps": 5},
            "versions": {"deepspeed": "0.19.8"}}))
    lines = []
    for it in range(20):
        # warm-up 5 s for the first two, one 2 s eval iteration (10), otherwise 480 ms
        dt_ms = 5000.0 if it < 2 else 2000.0 if it == 10 else 480.0
        tps = TOKENS_PER_ITER / (dt_ms / 1000)
        lines.append({"iter": it, "loss": 11.0 - 0.3 * it, "lr": 6e-4 * min(1, (it + 1) / 10),
                      "tokens": TOKENS_PER_ITER * (it + 1), "dt_ms": dt_ms, "tokens_per_s": tps,
                      "mfu": mfu(tps, FPT_124M, 8, 312e12), "hfu": 1.25 * mfu(tps, FPT_124M, 8, 312e12),
                      "peak_mem_mb": 10240.0 + it})
        if it in (0, 10):
            lines.append({"iter": it, "train_loss": 11.0 - 0.3 * it, "val_loss": 11.1 - 0.3 * it})
        if it == 5:
            lines.append({"event": "flops_profile", "iter": 5, "zero_stage": 1, "agree": agree,
                          "flops_ratio": 0.998 if agree else 1.92, "mfu_profiler": 0.3502 if agree else 0.67,
                          "mfu_analytic": 0.3509, "profiler_fwd_flops": 1.0, "analytic_fwd_flops": 1.0,
                          "step_time_s": 0.4799})
    # A resume from the iter-15 checkpoint logs 16..19 again: the later lines win.
    lines += [{**line, "loss": line["loss"] - 0.01} for line in lines if line.get("iter", 0) >= 16 and "loss" in line]
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n{\"iter\": 20, \"lo")
    return out


def summary_of(out):
    return R.summarize(R.load_config(out), *R.split_events(R.load_metrics(out)))


def test_report_figures(tmp_path):
    s = summary_of(write_run(tmp_path / "run"))
    # steady state: iterations 2..19 (the first 2 are warm-up); median dt 480 ms despite iter 10's 2 s
    assert (s["ms_per_iter"], s["steady_iters"]) == (480.0, 18)
    # 491,520 tokens / 0.48 s = 1,024,000 tokens/s; MFU 1,024,000 x 855,383,040 / (8 x 312e12) = 35.09%
    assert s["tokens_per_s"] == pytest.approx(1_024_000) and s["mfu_analytic"] == pytest.approx(0.350926, rel=1e-5)
    assert (s["mfu_profiler"], s["profile_iter"], s["profile_ratio"], s["profile_agree"]) == (0.3502, 5, 0.998, True)
    assert (s["hardware"], s["hosts"], s["launcher"]) == ("NVIDIA A100-SXM4-40GB", 2, "srun")
    assert (s["world_size"], s["zero_stage"], s["dtype"]) == (8, 1, "bfloat16")
    assert (s["global_batch"], s["micro_batch"], s["grad_accum"], s["tokens_per_iter"]) == (480, 12, 5, 491_520)
    assert s["peak_mem_mb"] == 10259.0 and s["iters"] == 20  # train lines 0..19
    # the resumed lines won: final loss at iter 19 is 11 - 5.7 - 0.01; val best 11.1 - 3.0
    assert s["final_loss"] == pytest.approx(5.29) and s["best_val_loss"] == s["final_val_loss"] == pytest.approx(8.1)


def test_report_files(tmp_path):
    """report.md shows every figure of the summary; report.png is a real picture."""
    md, png = R.write_report(write_run(tmp_path / "run"))
    text = md.read_text()
    assert ("| MFU (analytic, 6N + 12LTd) | 35.09% (median of the steady iterations, each over its own time; "
            "peak: table:A100) |") in text and "DISAGREES" not in text
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_disagreement_is_flagged(tmp_path):
    out = write_run(tmp_path / "run", agree=False)
    assert summary_of(out)["profile_agree"] is False
    md, _ = R.write_report(out)
    assert "**DISAGREES with the analytic count by more than 5%**" in md.read_text()


def test_missing_config_reads_na(tmp_path):
    s = summary_of(write_run(tmp_path / "run", config=False))
    assert s["hardware"] is None and s["global_batch"] is None and s["ms_per_iter"] == 480.0


def test_missing_or_empty_metrics_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no metrics file"):
        R.write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="no events"):
        R.write_report(tmp_path)


def test_warmup_skip():
    events = [{"iter": i} for i in range(30)]
    assert R.steady_state(events)[0]["iter"] == 3  # 10% of 30
    assert R.steady_state(events[:5])[0]["iter"] == 2  # at least 2
    assert len(R.steady_state(events[:1])) == 1  # never empty


@pytest.mark.slow  # a real TensorBoard server takes a few seconds to start
def test_tensorboard_serves_the_scalars(tmp_path):
    from tb_helpers import read_tensorboard_scalars
    from torch.utils.tensorboard import SummaryWriter

    tags = {"train/loss": lambda i: 11.0 - 0.5 * i, "train/lr": lambda i: 6e-4 * (i + 1) / 4,
            "train/tokens_per_s": lambda i: 1000.0 + i, "train/mfu": lambda i: 0.3 + 0.01 * i,
            "val/loss": lambda i: 10.0 - i}
    writer = SummaryWriter(str(tmp_path / "tb" / "train"))  # DeepSpeed's monitor: output_path/job_name
    for step in range(4):
        for tag, f in tags.items():
            writer.add_scalar(tag, f(step), step)
    writer.close()
    got = read_tensorboard_scalars(tmp_path / "tb", list(tags))
    for tag, f in tags.items():
        assert [s for s, _ in got[tag]] == [0, 1, 2, 3]
        assert [v for _, v in got[tag]] == pytest.approx([f(s) for s in range(4)], rel=1e-6)  # float32


def test_summary_reports_hfu_beside_mfu(tmp_path):
    s = summary_of(write_run(tmp_path / "run"))
    assert s["mfu_analytic"] == pytest.approx(0.350926, rel=1e-5)  # 1,024,000 x 855,383,040 / (8 x 312e12)
    assert s["hfu"] == pytest.approx(1.25 * s["mfu_analytic"]) and s["activation_checkpointing"] == "full"


def test_each_loss_and_mfu_says_what_it_is(tmp_path):
    """The last train line (one global batch) and the last eval (the console's closing `step N:` line)
    are different numbers: each row names which; each MFU names the time it divides by."""
    text = R.write_report(write_run(tmp_path / "run"))[0].read_text()
    assert "| train loss, last logged iteration | 5.2900 (iter 19: that iteration's global batch) |" in text
    assert "| last eval, train / val loss | 8.0000 / 8.1000 (the console's `step 10:` line) |" in text
    assert ("| MFU (flops profiler) | 35.02% (iter 5: its FLOPs over one step time, 479.9 ms, the iteration before "
            "it; the analytic count over that time: 35.09%; profiler/analytic FLOPs 0.998) |") in text


def test_cpu_runs_are_not_drawn_against_the_a100_figures(tmp_path, monkeypatch):
    out = write_run(tmp_path / "run")
    config = json.loads((out / "config.json").read_text())
    drawn = []
    real_plot = R.plot
    monkeypatch.setattr(R, "plot", lambda path, train, evals, profiles, gpu, *rest: drawn.append(gpu)
                        or real_plot(path, train, evals, profiles, gpu, *rest))
    R.write_report(out)
    (out / "config.json").write_text(json.dumps({**config, "device": "cpu"}))
    text = R.write_report(out)[0].read_text()
    assert drawn == [True, False]
    assert "Those are GPU figures: this run's MFU is not comparable with them" in text


@pytest.mark.parametrize("losses, top", [
    # the first 5% of the iterations (10.8 down to 6.5) are cut off, above the rest of the curve plus 5%
    ([10.8, 9.0, 8.0, 7.0, 6.5] + [6.0 - 0.02 * i for i in range(95)], 6.0 + 0.05 * (6.0 - 4.12)),
    ([5.0, 4.9, 4.8], None),  # nothing to cut: the whole curve is readable
])
def test_loss_axis_is_cut_above_the_curve_after_the_first_iterations(losses, top):
    got = R.loss_axis_top(list(enumerate(losses)))
    assert got == (None if top is None else pytest.approx(top))


def test_out_dir_flag_or_positional(tmp_path, capsys):
    out = write_run(tmp_path / "run")
    assert R.main(["--out_dir", str(out)]) == 0 and R.main([str(out)]) == 0
    for argv in ([], [str(out), "--out_dir", str(out)]):
        with pytest.raises(UserError, match="give the run directory once"):
            R.main(argv)


def test_lines_and_config_of_the_wrong_shape_are_skipped(tmp_path):
    """A list or a string appended to metrics.jsonl is no event; a config.json that is a list says nothing."""
    out = write_run(tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('\n[1, 2]\n"text"\n{"iter": "x", "loss": 1.0}\n{"iter": 21, "loss": "nan?"}\n')
    (out / "config.json").write_text("[1, 2]")
    s = summary_of(out)
    assert s["final_loss"] == pytest.approx(5.29) and s["hardware"] is None
    assert R.write_report(out)[0].read_text().startswith("# Run report")
