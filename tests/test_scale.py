"""The bigger GPT-2s: --model presets, activation checkpointing and ZeRO-Offload.

Activation checkpointing and offload change where tensors live and when they are computed,
never the arithmetic, so both are checked the way users would notice a bug: the loss curve of a
tiny fp32 model on CPU must not move. The engines run one after another in one worker process
(ZeRO-3 last: it patches torch.nn.functional.linear for the rest of its process); one 2-rank
trainer run per path covers the real launcher, and tests/test_train.py's compiled run covers
activation checkpointing under torch.compile.
Run the worker by hand: python tests/test_scale.py <out.json>
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from helpers import TINY, forked_script, forked_train, free_port, losses, write_token_bins  # noqa: E402

from ds_gpt import presets  # noqa: E402
from ds_gpt.config import model_args, parse_args  # noqa: E402
from ds_gpt.errors import UserError  # noqa: E402
from ds_gpt.mfu import flops_per_token  # noqa: E402
from ds_gpt.recompute import hardware_flops_per_token  # noqa: E402
from ds_gpt.run_config import adopt_model_args, resolve  # noqa: E402

# ---------------------------------------------------------------------------------------------
# --model presets


@pytest.mark.parametrize("name, alias", [("124M", "gpt2"), ("350M", "gpt2-medium"), ("774M", "gpt2-large"),
                                         ("1558M", "gpt2-xl")])
def test_presets_are_nanogpts_shapes_by_name_or_alias(name, alias):
    nanogpt = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
               "gpt2-xl": (48, 25, 1600)}  # nanoGPT's from_pretrained
    for given in (name, alias, alias.upper()):
        cfg = parse_args(["--model", given])
        assert (cfg.model, cfg.n_layer, cfg.n_head, cfg.n_embd) == (name, *nanogpt[alias])


def test_shape_flags_override_the_preset_and_the_default_is_124m(tmp_path):
    cfg = parse_args(["--model", "gpt2-xl", "--n_layer", "4"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (4, 25, 1600)
    assert tuple(parse_args([]).__dict__[k] for k in ("n_layer", "n_head", "n_embd")) == presets.MODELS["124M"]
    (tmp_path / "run.toml").write_text('model = "350M"\nn_embd = 512\n')
    cfg = parse_args(["--config", str(tmp_path / "run.toml")])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (24, 16, 512)


def test_unknown_preset_is_one_line_naming_the_choices():
    with pytest.raises(UserError) as err:
        parse_args(["--model", "3B"])
    message = str(err.value)
    assert "\n" not in message and "'3B'" in message
    assert all(choice in message for choice in presets.CHOICES)


def test_a_preset_contradicted_by_the_checkpoint_is_refused(tmp_path):
    saved_124m = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50304,
                  "bias": False, "dropout": 0.0}
    run = resolve(parse_args(["--model", "350M"]), 1, cuda=False)
    with pytest.raises(UserError, match="another model: n_layer=12 there vs --n_layer=24"):
        adopt_model_args(run, saved_124m, "ckpt")
    run = resolve(parse_args(["--model", "124M"]), 1, cuda=False)
    adopt_model_args(run, saved_124m, "ckpt")  # the same shape by name
    assert run.model == saved_124m


# ---------------------------------------------------------------------------------------------
# activation checkpointing in the model, and its FLOPs


def test_activation_checkpointing_is_a_checked_option_outside_the_model_args():
    cfg = parse_args(["--activation_checkpointing", "full"])
    assert cfg.activation_checkpointing == "full"
    assert "activation_checkpointing" not in model_args(cfg)  # nanoGPT's model_args: the shape only
    with pytest.raises(UserError, match="--activation_checkpointing must be one of none, full"):
        parse_args(["--activation_checkpointing", "selective"])


def saved_activation_bytes(model, x) -> tuple[float, list, int]:
    """Loss, gradients, and the bytes autograd kept for backward (what checkpointing cuts)."""
    import torch

    kept = []

    def pack(t):
        # Parameters are kept by reference, not as activations; count only what the forward made.
        if not isinstance(t, torch.nn.Parameter):
            kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, x)
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters()], sum(kept)


def test_full_checkpointing_changes_no_number_and_keeps_less():
    import torch

    from ds_gpt.model import GPT, GPTConfig

    results = {}
    for mode in ("none", "full"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=512, n_layer=4, n_head=2, n_embd=64, dropout=0.1),
                    activation_checkpointing=mode)
        torch.manual_seed(1)  # the same dropout masks; the recompute must replay them
        results[mode] = saved_activation_bytes(model, torch.randint(0, 512, (4, 32)))
    (loss, grads, kept), (loss_ac, grads_ac, kept_ac) = results["none"], results["full"]
    assert loss == loss_ac
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ac, strict=True))
    # The blocks' internals go; the block inputs, the head's logits and the loss stay.
    assert kept_ac < 0.5 * kept, (kept, kept_ac)


def test_hardware_flops_count_one_more_forward_with_full_checkpointing():
    n, layers, d, t = 123_689_472, 12, 768, 1024
    model_flops = flops_per_token(n, layers, d, t)
    assert hardware_flops_per_token(n, layers, d, t, "none") == model_flops == 6 * n + 12 * layers * t * d
    assert hardware_flops_per_token(n, layers, d, t, "full") == 8 * n + 16 * layers * t * d
    # The output head (2·V·d per token) is not recomputed: 50304 x 768 weights out of the extra forward.
    exact = hardware_flops_per_token(n, layers, d, t, "full", vocab_size=50304)
    assert exact == 8 * n + 16 * layers * t * d - 2 * 50304 * 768
    # By hand: 6N + 12LTd = 855.4 M; the blocks' forward, 2(N - Vd) + 4LTd = 207.9 M, is 24% more.
    assert exact / flops_per_token(n, layers, d, t) == pytest.approx(1.243, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# offload in the resolver: DeepSpeed's CPU Adam, not torch's AdamW


@pytest.mark.parametrize("path, torch_adam", [("zero2.json", True), ("zero2_offload.json", False),
                                              ("zero3_offload.json", False)])
def test_offload_configs_step_with_deepspeeds_cpu_adam(path, torch_adam):
    run = resolve(parse_args(["--deepspeed_config", f"ds_configs/{path}"]), world_size=2, cuda=False)
    assert run.ds_config["optimizer"]["params"]["torch_adam"] is torch_adam
    zero = run.ds_config["zero_optimization"]
    assert zero.get("offload_optimizer", {}).get("device", "none") == ("none" if torch_adam else "cpu")
    assert ("offload_param" in zero) == (path == "zero3_offload.json")


def test_offload_overrides_a_json_that_asks_for_torch_adam(tmp_path):
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero2_offload.json").read_text())
    ds["optimizer"]["params"]["torch_adam"] = True
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    log: list[str] = []
    run = resolve(parse_args(["--deepspeed_config", str(tmp_path / "ds.json")]), 1, cuda=True, overrides_log=log)
    assert run.ds_config["optimizer"]["params"]["torch_adam"] is False
    assert any("torch_adam True -> False" in line for line in log)


@pytest.mark.parametrize("path, params, fused", [
    ("zero1.json", {}, True),  # AdamW on CPU: torch's fused kernel
    ("zero1.json", {"fused": False}, False),  # a JSON's own choice stands
    ("zero1.json", {"foreach": True}, None),  # torch refuses fused and foreach together
    ("zero1_muon.json", {}, None),  # Muon's auxiliary AdamW takes no such option
    ("zero2_offload.json", {}, None),  # DeepSpeed's CPU Adam
])
def test_adamw_on_cpu_steps_with_torchs_fused_kernel(tmp_path, path, params, fused):
    ds = json.loads((REPO_ROOT / "ds_configs" / path).read_text())
    ds["optimizer"]["params"].update(params)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    for cuda, want in ((False, fused), (True, params.get("fused"))):  # GPUs: DeepSpeed's FusedAdam
        run = resolve(parse_args(["--deepspeed_config", str(tmp_path / "ds.json")]), 1, cuda=cuda)
        assert run.ds_config["optimizer"]["params"].get("fused") is want, cuda


# ---------------------------------------------------------------------------------------------
# real DeepSpeed engines, in one process (python tests/test_scale.py <out.json>)

MODEL = dict(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=64, bias=True)
MICRO, ACCUM, STEPS = 2, 2, 4
# name: (ZeRO stage, activation checkpointing, offload), all with dropout: the recompute must
# replay its masks. ZeRO-3 runs last: it patches torch.nn.functional.linear for the rest of the process.
DROPOUT = 0.1
RUNS = {**{f"z{s}-{ac}": (s, ac, False) for s in range(3) for ac in ("none", "full")},
        "z2-offload": (2, "none", True),
        **{f"z3-{ac}": (3, ac, False) for ac in ("none", "full")},
        "z3-offload-full": (3, "full", True)}


def ds_config(stage: int, offload: bool) -> dict:
    zero: dict = {"stage": stage}
    if offload:  # as ds_configs/zero{2,3}_offload.json
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    # torch's AdamW unless offloading, as ds_gpt.run_config resolves it on CPU
    return {"train_batch_size": MICRO * ACCUM, "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": ACCUM, "gradient_clipping": 1.0, "steps_per_print": 10_000,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": 0.1, "torch_adam": not offload}},
            "zero_optimization": zero}


def worker(out: Path) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import deepspeed
    import torch

    from ds_gpt.model import GPT, GPTConfig

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # a real process group of one rank
    curves = {}
    for name, (stage, ac, offload) in RUNS.items():
        torch.manual_seed(0)
        model = GPT(GPTConfig(**MODEL, dropout=DROPOUT), activation_checkpointing=ac)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.optimizer_param_groups(0.1),
                                          config=ds_config(stage, offload))
        data = torch.Generator().manual_seed(1)
        curve = []
        for _ in range(STEPS):
            losses = []
            for _ in range(ACCUM):
                # Counting sequences from random starts: learnable, so the curve falls and the steps matter.
                start = torch.randint(0, MODEL["vocab_size"], (MICRO, 1), generator=data)
                idx = (start + torch.arange(MODEL["block_size"] + 1)) % MODEL["vocab_size"]
                _, loss = engine(idx[:, :-1], idx[:, 1:].contiguous())
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            curve.append(sum(losses) / ACCUM)
        curves[name] = {"losses": curve, "optimizer": type(engine.optimizer.optimizer if hasattr(
            engine.optimizer, "optimizer") else engine.optimizer).__name__}
    out.write_text(json.dumps(curves))


def run_worker(tmp_path: Path) -> dict:
    """The engines in one forked process (helpers.forked_script), as `python tests/test_scale.py`."""
    out = tmp_path / "engines.json"
    forked_script(1, script_main, str(out), log_dir=tmp_path / "engines.logs", timeout=900)
    return json.loads(out.read_text())


def curve_gap(a: list[float], b: list[float]) -> float:
    """max over points of |a - b| / |b|: how far a loss curve strays from its reference
    (helpers.relative_gap is the same for dicts of tensors)."""
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def engine_curves(tmp_path_factory) -> dict:
    return run_worker(tmp_path_factory.mktemp("engines"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", range(4))
def test_checkpointing_keeps_the_loss_curve_at_every_zero_stage(engine_curves, stage):
    plain, checkpointed = engine_curves[f"z{stage}-none"]["losses"], engine_curves[f"z{stage}-full"]["losses"]
    assert curve_gap(checkpointed, plain) <= 1e-6, (plain, checkpointed)
    assert plain[-1] < plain[0] - 0.1  # it trains: the steps in between count


@pytest.mark.slow
def test_offload_keeps_the_loss_curve_with_deepspeeds_cpu_adam(engine_curves):
    offloaded = {2: engine_curves["z2-offload"], 3: engine_curves["z3-offload-full"]}
    assert [run["optimizer"] for run in offloaded.values()] == ["DeepSpeedCPUAdam"] * 2
    assert engine_curves["z2-none"]["optimizer"] == "AdamW"
    for stage, run in offloaded.items():
        gap = curve_gap(run["losses"], engine_curves[f"z{stage}-none"]["losses"])
        assert gap <= 1e-5, (stage, gap)


@pytest.mark.slow
def test_two_ranks_offloaded_and_checkpointed_follow_the_plain_curve(tmp_path):
    """The trainer end to end (forked ranks): ZeRO-3 with parameters and optimizer on the host and
    every block recomputed, against plain ZeRO-3, 2 CPU ranks each."""
    data = write_token_bins(tmp_path / "data")
    common = ["--data_dir", str(data), *TINY, "--max_iters", "8", "--gradient_accumulation_steps", "2"]
    forked_train(2, "--deepspeed_config", "ds_configs/zero3.json", "--out_dir", str(tmp_path / "plain"), *common,
                 log_dir=tmp_path / "logs")
    forked_train(2, "--deepspeed_config", "ds_configs/zero3_offload.json", "--activation_checkpointing", "full",
                 "--out_dir", str(tmp_path / "scaled"), *common, log_dir=tmp_path / "logs")
    plain, scaled = losses(tmp_path / "plain"), losses(tmp_path / "scaled")
    assert sorted(plain) == sorted(scaled) == list(range(8))
    assert curve_gap([scaled[i] for i in range(8)], [plain[i] for i in range(8)]) <= 1e-5
    effective = json.loads((tmp_path / "scaled" / "config.json").read_text())
    assert effective["train"]["activation_checkpointing"] == "full"
    assert effective["ds_config"]["optimizer"]["params"]["torch_adam"] is False
    assert effective["ds_config"]["zero_optimization"]["offload_param"]["device"] == "cpu"
    # The plain run, resumed with offload switched on: torch AdamW's saved state into DeepSpeed's CPU Adam.
    forked_train(2, "--deepspeed_config", "ds_configs/zero3_offload.json", "--out_dir", str(tmp_path / "plain"),
                 *common[:-4], "--max_iters", "10", "--gradient_accumulation_steps", "2", "--init_from", "resume",
                 log_dir=tmp_path / "logs")
    assert sorted(losses(tmp_path / "plain")) == list(range(10))


def script_main() -> None:
    worker(Path(sys.argv[1]))


if __name__ == "__main__":
    script_main()
