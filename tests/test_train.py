"""The trainer with real DeepSpeed ranks over gloo on CPU (slow: each run starts real processes)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    PYTHON,
    REPO_ROOT,
    TINY,
    background_train,
    forked_background_train,
    forked_train,
    losses,
    read_jsonl,
    train,
    write_token_bins,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_token_bins(tmp_path_factory.mktemp("data"))


# The layout users launch in the README's command, run through the deepspeed launcher; the other
# layouts' ranks are forked (helpers.forked_train), and their curves must still be this one's.
LAUNCHED_LAYOUT = (1, 2, 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Run once per (ZeRO stage, ranks, accumulation) layout; the global batch is 8 sequences."""
    cache: dict[tuple[int, int, int], Path] = {}

    def get(stage: int, nproc: int, accum: int) -> Path:
        key = (stage, nproc, accum)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"z{stage}_w{nproc}_g{accum}")
            args = ["--deepspeed_config", f"ds_configs/zero{stage}.json", "--data_dir", str(data_dir),
                    "--out_dir", str(out), *TINY, "--gradient_accumulation_steps", str(accum),
                    "--micro_batch_size", str(8 // (nproc * accum))]
            if key == LAUNCHED_LAYOUT:
                train(nproc, *args)
            else:
                forked_train(nproc, *args, log_dir=out.with_name(out.name + "_logs"))
            cache[key] = out
        return cache[key]
    return get


def test_run_directory_contract(runs):
    out = runs(1, 2, 2)
    cfg = __import__("json").loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["launcher"] == "deepspeed" and cfg["zero_stage"] == 1
    assert cfg["ds_config"]["train_batch_size"] == 8 and cfg["ds_config"]["gradient_accumulation_steps"] == 2
    assert cfg["model"]["n_layer"] == 2 and "torch" in cfg["versions"] and "deepspeed" in cfg["versions"]
    records = read_jsonl(out / "metrics.jsonl")
    train_events = [r for r in records if "loss" in r and "event" not in r]
    assert [r["iter"] for r in train_events] == list(range(20))
    for key in ("loss", "lr", "tokens", "dt_ms", "tokens_per_s", "mfu"):
        assert all(isinstance(r[key], float | int) for r in train_events), key
    assert train_events[-1]["tokens"] == 20 * 8 * 32
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 10, 20] and all("train_loss" in r for r in evals)
    assert (out / "latest").read_text() == "global_step20"
    assert sorted(p.name for p in out.glob("global_step*")) == ["global_step10", "global_step20"]
    assert list((out / "tb" / "train").glob("events.out.tfevents.*"))


# (ZeRO stage, ranks, accumulation), all with a global batch of 8 sequences: every stage at 2 ranks
# (the resume tests reuse those runs), and 1 and 4 ranks at the stages whose partitioning differs
# most. Each launch costs seconds of start-up, so the full 4 x 3 grid is not run.
REFERENCE_LAYOUT = (0, 1, 4)
LAYOUTS = [(3, 1, 4), (0, 2, 2), (1, 2, 2), (2, 2, 2), (3, 2, 2), (2, 4, 1), (3, 4, 1)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "zero{}-{}ranks-accum{}".format(*layout))
def test_same_loss_curve_for_every_layout(runs, layout):
    """Any ZeRO stage, any ranks x accumulation: the same global batches, so 1 rank's ZeRO-0 loss curve."""
    reference, curve = losses(runs(*REFERENCE_LAYOUT)), losses(runs(*layout))
    assert sorted(reference) == sorted(curve) == list(range(20))
    worst = max(abs(curve[i] - reference[i]) / abs(reference[i]) for i in range(20))
    assert worst <= 1e-5, f"max relative loss difference {worst:.2e} for ZeRO-{layout[0]}, {layout[1]} rank(s)"
    assert reference[19] < reference[0] - 0.5  # and it learns


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_after_sigkill_is_bitwise_exact(runs, data_dir, tmp_path, stage):
    """Kill -9 right after checkpoint 10, resume: iterations 10-19 equal the uninterrupted run's, bit for bit."""
    reference = losses(runs(stage, 2, 2))
    common = ["--deepspeed_config", f"ds_configs/zero{stage}.json", "--data_dir", str(data_dir),
              "--out_dir", str(tmp_path), *TINY, "--gradient_accumulation_steps", "2"]
    # --max_iters 1000 leaves time to kill it; the lr schedule depends on lr_decay_iters, not max_iters.
    with forked_background_train(2, *common, "--max_iters", "1000", log_dir=tmp_path / "logs") as killed:
        pointer = tmp_path / "latest"
        deadline = time.time() + 240
        while not (pointer.exists() and pointer.read_text() == "global_step10"):
            assert killed.poll() is None and time.time() < deadline, "the run ended before checkpoint 10"
            time.sleep(0.005)
        killed.signal(signal.SIGKILL)
        killed.wait()
    resume = forked_train(2, *common, "--init_from", "resume", log_dir=tmp_path / "logs")
    starts = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("event") == "start"]
    assert starts[-1]["resumed_from"] == "global_step10" and starts[-1]["iter"] == 10
    resumed = losses(tmp_path)
    assert [resumed[i] for i in range(10, 20)] == [reference[i] for i in range(10, 20)]
    # DeepSpeed's CPU all-reduce segments live in RAM until unlinked: none may outlive a run, killed or
    # not. Their names hold the run's port; other runs (another test worker's) may hold theirs now.
    for port in (killed.port, resume.master_port):
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_compiled_engine_trains_checkpoints_and_resumes_like_eager(runs, data_dir, tmp_path):
    """--compile True (the default; inductor's C++ backend on CPU), every block recomputed in
    backward (--activation_checkpointing full): the same losses as the eager run without
    recompute, checkpoints with the eager parameter names, and a compiled resume that continues
    the curve. The first half also runs the flops profiler on iteration 3, which must not change
    the math nor turn on DeepSpeed's per-step wall-clock timers. (One compiled run serves all of
    this: inductor's first compile of a model costs ~25 s of this CPU.)"""
    from ds_gpt.checkpoint import load_fp32_state_dict

    eager = runs(1, 2, 2)
    common = ["--deepspeed_config", "ds_configs/zero1.json", "--data_dir", str(data_dir), "--out_dir", str(tmp_path),
              *TINY, "--gradient_accumulation_steps", "2", "--compile", "True", "--activation_checkpointing", "full"]
    forked_train(2, *common, "--max_iters", "10", "--profile_step", "3", log_dir=tmp_path / "logs")
    (profile,) = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("event") == "flops_profile"]
    assert profile["iter"] == 3 and profile["micro_batches"] == 2 and profile["agree"] is True, profile
    # The profiled forwards ran eagerly (a compiled forward hides its FLOPs from the profiler: no
    # agreement) and made dynamo compile nothing (a re-trace under the profiler's hooks would).
    assert profile["graphs_compiled"] == 0, profile
    assert "DeepSpeed Flops Profiler" in (tmp_path / "flops_profile.txt").read_text()
    # What the profiled step's collectives moved for rank 0 is what the planner predicts (ZeRO-1, 2 ranks).
    from ds_gpt.plan import plan

    predicted = plan(2, 2, 64, gpus=2, gpu="a100", zero_stage=1, dtype="float32", block_size=32, vocab_size=512,
                     bias=False, micro_batch=2, tokens_per_iter=8 * 32)["comm_bytes_per_step_per_rank"]
    assert profile["comm_bytes_per_rank"]["total"] == pytest.approx(predicted["total"], rel=0.02), (profile, predicted)
    # The engine got its profiler block off, so DeepSpeed's per-step wall-clock timers stayed off too.
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["profile_step"] == 3 and config["ds_config"]["flops_profiler"]["enabled"] is False
    assert config["train"]["activation_checkpointing"] == "full"
    forked_train(2, *common, "--init_from", "resume", log_dir=tmp_path / "logs")
    compiled, reference = losses(tmp_path), losses(eager)
    assert sorted(compiled) == list(range(20))
    worst = max(abs(compiled[i] - reference[i]) / reference[i] for i in range(20))
    assert worst <= 1e-4, f"compiled vs eager: max relative loss difference {worst:.2e}"
    weights, _ = load_fp32_state_dict(tmp_path)
    assert weights.keys() == load_fp32_state_dict(eager)[0].keys()  # no torch.compile "_orig_mod." prefix


def test_sample_from_a_sharded_zero3_checkpoint(runs):
    from ds_gpt.checkpoint import load_fp32_state_dict

    z3, _ = load_fp32_state_dict(runs(3, 2, 2))
    z0, client = load_fp32_state_dict(runs(0, 2, 2))
    assert client["iter_num"] == 20 and client["model_args"]["n_layer"] == 2
    assert z3.keys() >= {"transformer.wte.weight", "lm_head.weight", "transformer.h.1.mlp.c_proj.weight"}
    for name, tensor in z0.items():  # same training, other sharding: the same weights
        torch.testing.assert_close(z3[name], tensor, rtol=1e-4, atol=1e-5)
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.sample", "--out_dir", str(runs(3, 2, 2)), "--start", "!",
                           "--max_new_tokens", "12", "--num_samples", "2"],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("---------------") == 2 and "iteration 20" in proc.stdout


def test_loss_decreases_on_a_real_corpus(shakespeare_data, tmp_path):
    """GPT-2 tokens of Shakespeare's plays, the full 50304-wide head, 2 ranks, ZeRO-1."""
    proc = forked_train(2, "--deepspeed_config", "ds_configs/zero1.json", "--data_dir", str(shakespeare_data),
          "--out_dir", str(tmp_path), "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64",
          "--dtype", "float32", "--compile", "False", "--micro_batch_size", "4", "--gradient_accumulation_steps", "1",
          "--max_iters", "40", "--eval_interval", "40", "--eval_iters", "4", "--log_interval", "10",
          "--checkpoint_interval", "40", "--warmup_iters", "5", "--lr_decay_iters", "40", "--learning_rate", "1e-2",
                 log_dir=tmp_path / "logs")
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "val_loss" in r]
    assert evals[0]["val_loss"] > 10.0  # ~ln(50304) at init
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 3.0
    assert "FutureWarning" not in proc.stdout  # DeepSpeed's use of a deprecated torch call is no news to a user


def test_signal_on_one_rank_checkpoints_all_and_exits_75(data_dir, tmp_path):
    """SIGUSR1 to rank 1 alone: both ranks stop at the same step boundary, checkpoint, exit 75."""
    common = ["--deepspeed_config", "ds_configs/zero2.json", "--data_dir", str(data_dir), "--out_dir", str(tmp_path),
              *TINY, "--gradient_accumulation_steps", "1", "--micro_batch_size", "4"]
    with background_train(2, *common, "--max_iters", "100000", "--checkpoint_interval", "100000",
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.time() + 240
        while not (metrics.exists() and len(losses(tmp_path)) >= 3):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        rank1 = subprocess.run(["pgrep", "-f", "-s", str(proc.pid), "--", "local_rank=1"],
                               capture_output=True, text=True)
        pids = rank1.stdout.split()
        assert len(pids) == 1, rank1
        os.kill(int(pids[0]), signal.SIGUSR1)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-3000:]
    tag = (tmp_path / "latest").read_text()
    stopped_at = int(tag.removeprefix("global_step"))
    assert stopped_at == max(losses(tmp_path)) + 1
    assert sorted(p.name for p in (tmp_path / tag).glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    forked_train(2, *common, "--max_iters", str(stopped_at + 3), "--init_from", "auto", log_dir=tmp_path / "logs")
    assert max(losses(tmp_path)) == stopped_at + 2


def test_tensorboard_serves_a_real_runs_scalars(runs):
    """The live view: the real tensorboard server, over HTTP, on a real trainer run's OUT/tb."""
    from tb_helpers import read_tensorboard_scalars

    out = runs(1, 2, 2)
    tags = ["train/loss", "train/lr", "train/tokens_per_s", "train/mfu", "val/loss"]
    scalars = read_tensorboard_scalars(out / "tb", tags)
    logged = losses(out)
    assert [step for step, _ in scalars["train/loss"]] == sorted(logged)
    for step, value in scalars["train/loss"]:
        assert value == pytest.approx(logged[step], rel=1e-6)  # float32 in the event file
    assert [step for step, _ in scalars["val/loss"]] == [0, 10, 20]
    assert all(v > 0 for _, v in scalars["train/tokens_per_s"] + scalars["train/mfu"] + scalars["train/lr"])


# ZeRO-3 at 4 ranks is left out: with the shipped persistence threshold (1e5 elements) every
# parameter of this tiny model is "persistent", which the planner counts whole on every rank, but
# DeepSpeed was measured holding less there (docs/planning.md, known gaps). The planner's own
# test (test_plan_vs_deepspeed.py) covers ZeRO-3 at 4 ranks with a threshold that gathers.
MEMORY_LAYOUTS = [layout for layout in [REFERENCE_LAYOUT, *LAYOUTS] if layout != (3, 4, 1)]


@pytest.mark.parametrize("layout", MEMORY_LAYOUTS, ids=lambda layout: "zero{}-{}ranks".format(*layout))
def test_memory_event_is_what_the_planner_predicts(runs, layout):
    """The bytes DeepSpeed held per rank (the trainer's memory event) against `plan`'s model, within 2%."""
    from ds_gpt.plan import plan

    stage, nproc, accum = layout
    (event,) = [r for r in read_jsonl(runs(*layout) / "metrics.jsonl") if r.get("event") == "memory"]
    assert event["iter"] == 1 and len(event["per_rank"]) == nproc
    predicted = plan(2, 2, 64, gpus=nproc, gpu="a100", zero_stage=stage, dtype="float32", block_size=32,
                     vocab_size=512, bias=False, micro_batch=8 // (nproc * accum), tokens_per_iter=8 * 32)
    measured = event["per_rank"][predicted["state_bytes_rank"]]
    for key, value in predicted["state_bytes_per_rank"].items():
        assert measured[key] == pytest.approx(value, rel=0.02), (key, measured, predicted["state_bytes_per_rank"])
