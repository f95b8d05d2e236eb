"""The planner against hand arithmetic, the model's own parameter count, DeepSpeed's memory
estimators, and the seed's 8 x A100 run."""
from __future__ import annotations

import json

import pytest

from ds_gpt import plan as P
from ds_gpt.errors import UserError

PSI = 124_475_904  # 124M stored params: 123,689,472 (N) + wpe 1024*768 = 786,432


def seed_plan(**kw) -> dict:
    args = dict(gpus=8, gpu="a100", zero_stage=1, mfu=0.34)
    return P.plan(12, 12, 768, **{**args, **kw})


def test_param_counts_by_hand():
    assert P.gpt_num_params(12, 768, 50304, 1024) == 123_689_472  # nanoGPT prints "123.69M"
    assert P.gpt_num_params(12, 768, 50304, 1024, non_embedding=False) == PSI


@pytest.mark.parametrize("bias", [True, False])
def test_param_counts_match_the_model(bias):
    from ds_gpt.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=3, n_head=2, n_embd=16, bias=bias))
    for non_embedding in (True, False):
        assert P.gpt_num_params(3, 16, 100, 32, bias, non_embedding) == model.num_params(non_embedding)


def test_seed_run_predicted():
    """8 x A100, 491,520 tokens/iter, 600k iters: the seed's ~480 ms/iter and ~3.3-3.4 days.

    34%: 491,520 x 855,383,040 FLOPs / (8 x 312e12 x 0.34) = 4.2044e14 / 8.4864e14 = 0.4954 s;
         x 600,000 = 297,260 s = 3.44 days; x 8 GPUs = 660.6 GPU-hours.
    35%: 0.4813 s, 3.34 days.
    """
    p = seed_plan()
    assert p["iter_time_s"] == pytest.approx(0.4954, abs=1e-4)
    assert p["total_days"] == pytest.approx(3.441, abs=1e-3)
    assert p["gpu_hours"] == pytest.approx(660.6, abs=0.1)
    assert p["grad_accum"] == 5  # 491,520 / (12 x 1024 x 8)
    for mfu in (0.34, 0.35):
        p = seed_plan(mfu=mfu)
        assert 0.480 <= p["iter_time_s"] <= 0.500
        assert 3.3 <= round(p["total_days"], 1) <= 3.4
    assert seed_plan(mfu=0.35)["total_days"] == pytest.approx(3.342, abs=1e-3)


def test_memory_by_hand():
    p = seed_plan()
    gb = p["memory_gb_by_stage"]
    # bf16, ZeRO-0: weights 2 x PSI = 0.249 GB; grads (2 + 4) x PSI = 0.747; optimizer 12 x PSI = 1.494
    assert gb[0]["weights"] == round(2 * PSI / 1e9, 3) == 0.249
    assert gb[0]["grads"] == round(6 * PSI / 1e9, 3) == 0.747
    assert gb[0]["optimizer"] == round(12 * PSI / 1e9, 3) == 1.494
    # ZeRO-1 over 8: fp32 grads and optimizer split 8 ways: 2Ψ + 4Ψ/8 = 0.311; 12Ψ/8 = 0.187
    assert (gb[1]["grads"], gb[1]["optimizer"]) == (0.311, 0.187)
    # activations: 12 layers x 34 x 1024 x 12 x 768 = 3,850,371,072 B
    #   + logits 12 x 1024 x 50304 x 10 B = 6,181,355,520 B  ->  10.032 GB at every stage
    assert all(m["activations"] == 10.032 for m in gb.values())
    assert p["memory_gb"] == gb[1] and p["fits"] is True  # ~10.8 GB on a 40 GB A100
    assert gb[0]["total"] > gb[1]["total"] > gb[2]["total"] > gb[3]["total"]


def test_fp32_states_are_16_bytes_per_param():
    w, g, o = P.model_states(1000, 0, 1, "float32", largest_layer=10)
    assert (w, g, o) == (4000, 4000, 8000)


def test_model_states_match_deepspeed_estimators():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    largest = 50304 * 768
    for gpus in (1, 8, 64):
        _, ds2 = estimate_zero2_model_states_mem_needs(PSI, num_gpus_per_node=gpus, cpu_offload=False)
        ours2 = sum(P.model_states(PSI, 2, gpus, "bfloat16", largest))
        assert ours2 == pytest.approx(ds2, abs=1)  # 2Ψ + 18Ψ/dp, the same accounting
        _, ds3, _ = estimate_zero3_model_states_mem_needs(PSI, largest, num_gpus_per_node=gpus, cpu_offload=False)
        ours3 = sum(P.model_states(PSI, 3, gpus, "bfloat16", largest))
        # DeepSpeed's ZeRO-3 sum (4 x largest layer + 18Ψ/dp) leaves out the 16-bit weight
        # partition every rank keeps: ours is exactly 2Ψ/dp more.
        assert ours3 - ds3 == pytest.approx(2 * PSI / gpus, abs=1)


def test_cli_json(capsys):
    assert P.main(["--model", "124M", "--gpus", "8", "--gpu", "a100", "--zero_stage", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["iter_time_s"] == pytest.approx(0.4954, abs=1e-4)
    assert {"iter_time_s", "total_days", "gpu_hours", "memory_gb"} <= set(out)
    assert set(out["memory_gb"]) == {"weights", "grads", "optimizer", "activations", "total"}


def test_cli_text_and_overrides(capsys):
    assert P.main(["--model", "350M", "--n_layer", "6", "--gpus", "2", "--gpu", "H100"]) == 0
    text = capsys.readouterr().out
    assert "6 layers, 16 heads, d=1024" in text and "<-" in text and "989 TFLOPS" in text


def test_bad_input_is_one_user_error():
    with pytest.raises(UserError, match="--gpu 'tpu'.*not divisible.*multiple of"):
        P.plan(12, 5, 768, gpus=7, gpu="tpu", zero_stage=1)
    with pytest.raises(UserError, match="no bf16 peak"):
        P.plan(12, 12, 768, gpus=8, gpu="v100", zero_stage=1)
