"""DeepSpeed's flops profiler against the analytic forward FLOPs, on real 1-process engines.

Each engine runs in its own process: ZeRO-3 patches torch.nn.functional.linear for the rest
of the process, and DeepSpeed's distributed state is per process.
The compiled engine is profiled in tests/test_train.py's compiled run (its flops_profile event
must agree with the analytic count, and profiling there must compile no graph).
Run one by hand: python tests/test_flops_profile.py <zero_stage> <out_dir> [--no-overrides]
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from helpers import forked_script, free_port  # noqa: E402  (tests/ is on sys.path, also when run as a script)

from ds_gpt.flops_profile import PROFILE_FILE, profiler_ds_overrides  # noqa: E402
from ds_gpt.mfu import fwd_flops_per_token  # noqa: E402

# The tiny model: d=128 keeps the matmuls dominant, as in GPT-2 (the profiler also counts
# LayerNorm and GELU, which the analytic formula leaves out: ~1% here, <0.1% at 124M).
MODEL = dict(block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=128, dropout=0.0, bias=True)
MICRO_BATCH, GRAD_ACCUM, PROFILE_STEP = 2, 2, 1


def worker(zero_stage: int, out_dir: Path, overrides: bool) -> None:
    """Train 3 iterations with the profiler on at PROFILE_STEP; print the events as JSON."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    import deepspeed
    import torch

    from ds_gpt.flops_profile import FlopsProfileCapture
    from ds_gpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    n_params = model.num_params(non_embedding=True)  # before ZeRO-3 partitions the tensors
    ds_config = {
        "train_batch_size": MICRO_BATCH * GRAD_ACCUM,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": GRAD_ACCUM,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10_000,
    }
    extra = profiler_ds_overrides(PROFILE_STEP, zero_stage)
    if not overrides:
        extra.pop("zero_optimization", None)
    for key, block in extra.items():
        ds_config.setdefault(key, {}).update(block)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    capture = FlopsProfileCapture(engine, profile_step=PROFILE_STEP, output_file=out_dir / PROFILE_FILE,
                                  n_params=n_params, n_layer=MODEL["n_layer"], n_embd=MODEL["n_embd"], peak_flops=1e12)
    events = []
    for iter_num in range(3):
        for _ in range(GRAD_ACCUM):
            x = torch.randint(0, MODEL["vocab_size"], (MICRO_BATCH, MODEL["block_size"]))
            with capture.count(iter_num, x):
                _, loss = engine(x, x)
            engine.backward(loss)
            engine.step()
        if iter_num == PROFILE_STEP:  # an eval forward on the profiled step is not wrapped: it must not count
            engine.eval()
            with torch.no_grad():
                engine(x, x)
            engine.train()
        event = capture.step_done(iter_num, step_time_s=0.5)
        if event is not None:
            events.append(event)
    capture.close()
    # DeepSpeed's wall-clock breakdown stays as the config asked (off): the profiler must not turn it on.
    print("EVENTS " + json.dumps({"events": events, "n_params": n_params,
                                  "wall_clock_breakdown": engine.wall_clock_breakdown()}), flush=True)


def run_worker(zero_stage: int, out_dir: Path, overrides: bool = True) -> dict:
    """One engine in a forked process (helpers.forked_script), as `python tests/test_flops_profile.py` runs it."""
    args = [str(zero_stage), str(out_dir), *([] if overrides else ["--no-overrides"])]
    output = forked_script(1, script_main, *args, log_dir=out_dir / "logs", timeout=300)
    line = next(text for text in output.splitlines() if text.startswith("EVENTS "))
    return json.loads(line.removeprefix("EVENTS "))


@pytest.fixture(scope="module")
def eager_stage1(tmp_path_factory) -> tuple[dict, Path]:
    """The ZeRO-1 engine's result and its directory (one of the four stages)."""
    out = tmp_path_factory.mktemp("eager_z1")
    return run_worker(1, out), out


def test_overrides_keep_the_engine_profiler_off_and_fix_zero3():
    off = {"flops_profiler": {"enabled": False}}
    for stage in (0, 1, 2, 3):
        assert profiler_ds_overrides(None, stage) == off
    for stage in (0, 1, 2):
        assert profiler_ds_overrides(5, stage) == off
    assert profiler_ds_overrides(5, 3) == {**off, "zero_optimization": {"memory_efficient_linear": False}}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_profiler_and_analytic_agree(tmp_path, eager_stage1, zero_stage):
    result, tmp_path = eager_stage1 if zero_stage == 1 else (run_worker(zero_stage, tmp_path), tmp_path)
    (event,) = result["events"]  # exactly one profiled iteration
    n = result["n_params"]
    # N by hand: wte 512*128 + per layer (ln 2*2*128 + c_attn 128*384+384 + c_proj 128*128+128
    #   + c_fc 128*512+512 + mlp c_proj 512*128+128) + ln_f 2*128
    assert n == 512 * 128 + 2 * (512 + 49536 + 16512 + 66048 + 65664) + 256 == 462_336
    # forward per token: 2N + 4*L*T*d = 924,672 + 4*2*64*128 = 990,208; 2 micro-batches x 2 x 64 tokens
    assert event["tokens"] == 256 and event["micro_batches"] == 2
    assert event["analytic_fwd_flops"] == 990_208 * 256 == fwd_flops_per_token(n, 2, 128, 64) * 256
    assert event["iter"] == PROFILE_STEP and event["zero_stage"] == zero_stage
    assert result["wall_clock_breakdown"] is False
    assert event["agree"] is True, event
    assert abs(event["flops_ratio"] - 1) < 0.05
    assert event["graphs_compiled"] == 0  # eager: dynamo compiles nothing
    assert event["profiler_fwd_macs"] > 0 and event["profiler_fwd_latency_s"] > 0
    # Same step time for both: the MFUs differ exactly as the FLOP counts do.
    assert event["mfu_analytic"] == pytest.approx(3 * event["analytic_fwd_flops"] / 0.5 / 1e12)
    assert event["mfu_profiler"] / event["mfu_analytic"] == pytest.approx(event["flops_ratio"])
    text = (tmp_path / PROFILE_FILE).read_text()
    assert "DeepSpeed Flops Profiler" in text and "ds_gpt cross-check" in text


@pytest.mark.slow
def test_zero3_without_the_override_is_flagged(tmp_path):
    (event,) = run_worker(3, tmp_path, overrides=False)["events"]
    # Every linear counted twice: the ratio is near 2, far outside 5%.
    assert event["agree"] is False and event["flops_ratio"] > 1.8
    assert "memory_efficient_linear" in event["warning"]


def script_main() -> None:
    worker(int(sys.argv[1]), Path(sys.argv[2]), overrides="--no-overrides" not in sys.argv)


if __name__ == "__main__":
    script_main()
