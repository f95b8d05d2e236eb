"""The planner against hand arithmetic, the model itself, the reference run, and its own files.
(tests/test_plan_vs_deepspeed.py checks its memory and communication against DeepSpeed.)"""
from __future__ import annotations

import json
import subprocess

import pytest
from helpers import PYTHON, REPO_ROOT

from ds_gpt import plan as P
from ds_gpt import plan_fit
from ds_gpt.errors import UserError
from ds_gpt.plan_comm import LINKS, message_bytes, wire_seconds
from ds_gpt.plan_memory import Setup, gpt_layout, state_bytes, zero12_partition, zero12_rank_grad_numel

PSI = 124_475_904  # 124M with biases, stored: 123,689,472 (N) + wpe 1024*768 = 786,432
PSI_NO_BIAS = 124_373_760  # the trainer's default model (bias=False, nanoGPT's train.py)
SHIPPED = {"124M": "gpt2", "350M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}


def reference(gpus: int, nodes: int, mfu: float = 0.39) -> dict:
    """nanoGPT's DDP run as DeepSpeed would do it: ZeRO-0, fp32 gradients all-reduced once per step."""
    return P.plan(12, 12, 768, gpus=gpus, nodes=nodes, gpu="a100", zero_stage=0, mfu=mfu, comm_dtype="float32")


def test_param_counts_by_hand():
    assert P.gpt_num_params(12, 768, 50304, 1024) == 123_689_472  # nanoGPT prints "123.69M"
    assert P.gpt_num_params(12, 768, 50304, 1024, non_embedding=False) == PSI
    assert P.gpt_num_params(12, 768, 50304, 1024, bias=False, non_embedding=False) == PSI_NO_BIAS


@pytest.mark.parametrize("bias", [True, False])
def test_layout_is_the_models(bias):
    """Names, sizes, order and AdamW groups as ds_gpt.model.GPT has them: DeepSpeed partitions in this order."""
    from ds_gpt.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=3, n_head=2, n_embd=16, bias=bias))
    layout = gpt_layout(3, 16, 100, 32, bias)
    assert [(p.name, p.numel) for p in layout.params] == [(n, p.numel()) for n, p in model.named_parameters()]
    groups = model.optimizer_param_groups(0.1)
    assert layout.groups() == [[p.numel() for p in g["params"]] for g in groups]
    modules = [name for name, m in model.named_modules() if list(m.parameters(recurse=False))]
    assert [name for name, _ in layout.modules] == modules  # lm_head last: it runs wte's weight again
    for non_embedding in (True, False):
        assert P.gpt_num_params(3, 16, 100, 32, bias, non_embedding) == model.num_params(non_embedding)


def test_reference_run_check():
    """The reference run: nanoGPT 124M on Narval, 480 x 1024 tokens per step, 39% MFU and 1680 ms/iter
    on 2 x A100 (one node). From that MFU alone the 8 x A100, 2-node time must land within 10%
    of the measured 480 ms/iter (34% MFU)."""
    one_node = reference(gpus=2, nodes=1)
    assert one_node["iter_time_s"] == pytest.approx(1.680, rel=0.05)  # 1728 ms: 39% was rounded
    two_nodes = reference(gpus=8, nodes=2)
    assert two_nodes["iter_time_s"] == pytest.approx(0.480, rel=0.10)
    # compute at 39%: 491,520 tokens x 854,770,176 FLOPs / (8 x 312e12 x 0.39) = 431.6 ms
    assert two_nodes["compute_time_s"] == pytest.approx(0.4316, abs=1e-4)
    # fp32 gradients, 4 x 124,373,760 B, all-reduced hierarchically: 2 x 3/4 over NVLink (300 GB/s)
    # + 2 x 1/2 over one HDR 200 Gb/s link per node (25 GB/s) = 2.49 + 19.90 ms, nothing hidden
    assert two_nodes["comm_bytes_per_step_per_rank"]["all_reduce"] == 4 * PSI_NO_BIAS
    assert two_nodes["comm_time_s"] == pytest.approx(0.02239, abs=2e-5)
    assert two_nodes["iter_time_s"] == two_nodes["compute_time_s"] + two_nodes["comm_exposed_s"]
    assert 0.9 < two_nodes["scaling_efficiency"] < 1


def test_ring_bytes_by_hand():
    links = LINKS["a100"]
    one_gb = 1e9
    # one node of 4: 2 x 3/4 x 1 GB / 300 GB/s
    assert wire_seconds("all_reduce", one_gb, 4, 1, links) == pytest.approx(1.5 / 300)
    # 8 over 2 nodes, all-gather of 1 GB per rank (8 GB out): 3/4 x 8 / 300 + 1/2 x 8 / 25
    assert wire_seconds("all_gather", one_gb, 8, 2, links) == pytest.approx(6 / 300 + 4 / 25)
    assert wire_seconds("reduce_scatter", one_gb, 1, 1, links) == 0


def test_zero12_partitions_by_hand():
    """A group is padded to a multiple of 2 x world and split; a rank holds the whole gradient of every
    parameter that overlaps its slice, plus the padding inside it."""
    group = [10, 7]  # two parameters: 17 elements
    assert zero12_partition(group, 2) == 10  # 17 -> 20
    assert [zero12_rank_grad_numel(group, 2, r) for r in range(2)] == [10, 7 + 3]
    assert zero12_partition(group, 4) == 6  # 17 -> 24
    # slices [0,6) [6,12) [12,18) [18,24): the 10-element parameter crosses the first boundary
    assert [zero12_rank_grad_numel(group, 4, r) for r in range(4)] == [10, 10 + 7, 7 + 1, 6]


def test_state_bytes_by_hand():
    layout = gpt_layout(12, 768, 50304, 1024, bias=False)
    psi = layout.numel
    zero0 = state_bytes(Setup(layout, 8, 0, "bfloat16", zero={}))
    assert zero0["gpu"] == {"params": 2 * psi, "grads": 2 * psi, "optimizer": 12 * psi}
    zero3 = state_bytes(Setup(layout, 8, 3, "bfloat16", zero={"reduce_bucket_size": 1000}))
    part = sum(-(-p.numel // 8) for p in layout.params)
    norms = sum(p.numel for p in layout.params if not p.decay)  # persistent: at most 1e5 elements
    assert zero3["gpu"] == {"params": 2 * part + 2 * norms, "grads": 2 * part + 2000, "optimizer": 12 * part}
    offloaded = state_bytes(Setup(layout, 8, 3, "bfloat16", offload_optimizer=True, offload_param=True, zero={}))
    assert offloaded["gpu"]["optimizer"] == 0 and offloaded["cpu"]["optimizer"] == 12 * part
    assert offloaded["gpu"]["params"] == 2 * norms


def test_comm_bytes_by_hand():
    layout = gpt_layout(12, 768, 50304, 1024, bias=False)
    psi = layout.numel
    msg = {s: message_bytes(Setup(layout, 8, s, "bfloat16", zero={}), grad_accum=5) for s in range(4)}
    assert msg[0] == {"all_reduce": 2 * psi, "reduce_scatter": 0, "all_gather": 0, "broadcast": 0}
    assert msg[1]["all_reduce"] == 2 * psi and msg[1]["all_gather"] == 2 * psi // 8
    assert msg[2]["all_reduce"] == 5 * 2 * psi  # every micro-batch
    # ZeRO-3 under 1e9 parameters: each parameter's slice gathered once per micro-batch (the forward's
    # gathers serve the backward), every gradient reduce-scattered per micro-batch
    assert msg[3]["reduce_scatter"] == 5 * 2 * psi
    assert msg[3]["all_gather"] == pytest.approx(5 * 2 * psi / 8, rel=0.01)


def test_cli_json_fields(capsys):
    assert P.main(["--model", "124M", "--gpus", "8", "--nodes", "2", "--gpu", "a100", "--zero_stage", "1",
                   "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["state_bytes_per_rank"]) == {"params", "grads", "optimizer"}
    assert {"all_reduce", "reduce_scatter", "all_gather", "total"} <= set(out["comm_bytes_per_step_per_rank"])
    for key in ("compute_time_s", "comm_time_s", "iter_time_s", "scaling_efficiency"):
        assert out[key] > 0
    assert out["nodes"] == 2 and out["grad_accum"] == 5 and any("overlap" in a for a in out["assumptions"])


def test_cli_text_and_overrides(capsys):
    assert P.main(["--model", "350M", "--n_layer", "6", "--gpus", "2", "--gpu", "H100"]) == 0
    text = capsys.readouterr().out
    assert "6 layers, 16 heads, d=1024" in text and "989 TFLOPS" in text


def test_bad_input_is_one_user_error():
    with pytest.raises(UserError, match="--gpu 'tpu'.*not divisible.*multiple of"):
        P.plan(12, 5, 768, gpus=7, gpu="tpu", zero_stage=1)
    with pytest.raises(UserError, match="no bf16 peak"):
        P.plan(12, 12, 768, gpus=8, gpu="v100", zero_stage=1)
    with pytest.raises(UserError, match="parameter offload"):
        P.plan(12, 12, 768, gpus=8, gpu="a100", zero_stage=2, offload="all")


def test_fit_writes_a_config_the_trainer_resolves(tmp_path, capsys):
    from ds_gpt.config import parse_args
    from ds_gpt.run_config import resolve

    ds, toml = tmp_path / "plan.json", tmp_path / "plan.toml"
    assert P.main(["--fit", "--model", "774M", "--gpus", "8", "--gpu", "a100", "--write_config", str(ds),
                   "--write_run_config", str(toml), "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert chosen["fits"] and chosen["fit"]["fitting"] <= chosen["fit"]["candidates"]
    fastest = max(a["tokens_per_s"] for a in chosen["fit"]["alternatives"])
    assert chosen["tokens_per_s"] >= fastest * (1 - plan_fit.TOLERANCE)
    run = resolve(parse_args(["--config", str(toml)]), world_size=8, cuda=True)
    assert run.train.deepspeed_config == str(ds) and run.train.model == "774M"
    assert run.train.activation_checkpointing == chosen["activation_checkpointing"]
    assert (run.zero_stage, run.batch.micro, run.batch.grad_accum) == (
        chosen["zero_stage"], chosen["micro_batch"], chosen["grad_accum"])
    assert run.tokens_per_iter == 491_520  # the recipe's global batch


def test_a_run_config_written_from_a_config_keeps_its_model(tmp_path, capsys):
    """`--config` names the model: the TOML written back names the same one, and a shape that is no
    preset is refused rather than written as 124M."""
    from ds_gpt.config import parse_args
    from ds_gpt.run_config import resolve

    toml = tmp_path / "plan.toml"
    assert P.main(["--config", "config/gpt2-medium.toml", "--gpus", "8", "--gpu", "a100", "--fit",
                   "--write_config", str(tmp_path / "plan.json"), "--write_run_config", str(toml), "--json"]) == 0
    assert resolve(parse_args(["--config", str(toml)]), world_size=8, cuda=True).train.model == "350M"
    with pytest.raises(UserError, match="writes a GPT-2 preset"):
        P.main(["--config", "config/demo_cpu.toml", "--gpus", "2", "--gpu", "a100", "--fit",
                "--write_run_config", str(tmp_path / "demo.toml")])


def test_model_that_cannot_fit_is_one_line():
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.plan", "--fit", "--model", "1558M", "--gpus", "1", "--gpu", "l4",
                           "--gpu_mem_gb", "2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "does not fit" in proc.stderr and "needs 3." in proc.stderr
    assert "(HINT: use GPUs with >= 5 GB)" in proc.stderr


@pytest.mark.parametrize("model", sorted(SHIPPED))
def test_shipped_run_configs_are_the_planners(model):
    """ds_configs/gpt2*.json and config/gpt2*.toml are what --fit writes for 8 x A100-40GB (Narval, 2
    nodes) today: a change to the model or the defaults that changes the choice fails here."""
    name = SHIPPED[model]
    ds_path, toml_path = f"ds_configs/{name}.json", f"config/{name}.toml"
    shape = P.MODELS[model]
    chosen = plan_fit.fit(P.plan, shape.n_layer, shape.n_head, shape.n_embd, gpus=8, gpu="a100",
                          nodes=2, tokens_per_iter=491_520)
    assert json.loads((REPO_ROOT / ds_path).read_text()) == plan_fit.ds_config(chosen)
    assert (REPO_ROOT / toml_path).read_text() == plan_fit.run_config_toml(chosen, model, ds_path)
