"""DeepSpeed's Muon through the JSON: Newton-Schulz really runs, on the right parameters, at every ZeRO stage.

DeepSpeed's Muon has failed silently before (a stage where the step was plain SGD; a model with
nothing tagged), so one optimizer step of the real engine (ds_gpt.engine.build_engine from
ds_configs/zero{1,2,3}_muon.json) is compared with an independent reference: Keller Jordan's Muon
written out below (momentum, Nesterov, the quintic Newton-Schulz in float64, the aspect-ratio
scale) for the hidden matrices, and AdamW's first step for everything else.
The engines run in one forked worker; Muon's kernels run eagerly there (torch.compile off:
the same arithmetic, without the ~40 s compile on first use).
Run the worker by hand: python tests/test_muon.py <out.json>
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from helpers import consolidated, forked_script, free_port, read_jsonl, relative_gap  # noqa: E402

from ds_gpt import muon  # noqa: E402
from ds_gpt.config import parse_args  # noqa: E402
from ds_gpt.errors import UserError  # noqa: E402
from ds_gpt.run_config import resolve  # noqa: E402

SHAPE = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32", "--vocab_size", "512",
         "--compile", "False", "--micro_batch_size", "2", "--gradient_accumulation_steps", "1"]
# (ZeRO stage, dtype). ZeRO-3 last: it patches torch.nn.functional.linear for the rest of its process.
CASES = {"z0": (0, "float32"), "z1": (1, "float32"), "z2": (2, "float32"), "z0-bf16": (0, "bfloat16"),
         "z1-bf16": (1, "bfloat16"), "z2-bf16": (2, "bfloat16"), "z3": (3, "float32")}
LR, ADAM_LR, MOMENTUM, ADAM_WD, MUON_WD = 0.05, 0.01, 0.95, 0.1, 0.02
# Relative error of one step against the reference, (Muon side, AdamW side). DeepSpeed runs its Gram
# Newton-Schulz in float16 wherever the accelerator reports float16 support (CPU does), so even an fp32
# run's Muon update is ~2% from the float64 reference (measured 1.2-2.4%); in bf16 the gradient itself
# is rounded too (measured 5-10%; AdamW's embeddings up to 9%, its gains not compared: their first
# step, sign(g), flips on tiny bf16 gradients, 25-34% measured).
# A plain SGD step, the reported stage-0 failure, is 90-100% away.
TOLERANCE = {"float32": (5e-2, 1e-5), "bfloat16": (0.15, 0.15)}


def reference_muon_direction(grad):
    """Keller Jordan's Muon update for a first step (momentum from zero, Nesterov), in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    momentum = (1 - MOMENTUM) * grad.double()
    x = grad.double().lerp(momentum, MOMENTUM)  # Nesterov
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / (x.norm() + 1e-7)
    for _ in range(muon.NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if tall else x
    return x * max(1.0, grad.size(0) / grad.size(1)) ** 0.5


def worker(out: Path) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from ds_gpt import engine as ds_engine
    from ds_gpt.accounting import state_bytes_per_rank
    from ds_gpt.model import GPT, GPTConfig

    torch._dynamo.config.disable = True
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = {}
    for name, (stage, dtype) in CASES.items():
        shipped = f"ds_configs/zero{max(1, stage)}_muon.json"  # stage 0: zero1_muon.json --zero_stage 0
        cfg = parse_args(["--deepspeed_config", shipped, "--zero_stage", str(stage), "--dtype", dtype, *SHAPE,
                          "--learning_rate", str(LR)])
        run = resolve(cfg, 1, cuda=False)
        run.ds_config["optimizer"]["params"].update(adam_lr=ADAM_LR, momentum=MOMENTUM, weight_decay=MUON_WD,
                                                    adam_weight_decay=ADAM_WD)
        torch.manual_seed(0)
        model = GPT(GPTConfig(**run.model))
        before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
        idx = torch.randint(0, run.model["vocab_size"], (2, run.model["block_size"] + 1),
                            generator=torch.Generator().manual_seed(1))
        reference = copy.deepcopy(model)
        reference(idx[:, :-1], idx[:, 1:])[1].backward()
        grads = {n: p.grad.double() for n, p in reference.named_parameters()}
        hidden = {id(p) for p in model.muon_matrices()}
        muon_names = [n for n, p in model.named_parameters() if id(p) in hidden]

        eng = ds_engine.build_engine(model, run)
        ds_engine.set_lr(eng, run.side_lrs(LR))
        eng.backward(eng(idx[:, :-1], idx[:, 1:])[1])
        eng.step()
        errors = {}
        # ZeRO-0: fp32, the parameter is the master; bf16, DeepSpeed's unfused wrapper keeps one per parameter.
        unfused = type(eng.optimizer).__name__ == "FP16_UnfusedOptimizer"
        masters = {id(lp): hp for lps, hps in zip(eng.optimizer.fp16_groups, eng.optimizer.fp32_groups, strict=True)
                   for lp, hp in zip(lps, hps, strict=True)} if unfused else {}
        for n, p in eng.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            after = (masters.get(id(p), p.detach()) if full is None else full).double()
            if n in muon_names:
                expected = before[n] * (1 - LR * MUON_WD) - LR * reference_muon_direction(grads[n])
                sgd = before[n] * (1 - LR * MUON_WD) - LR * grads[n]
            else:  # AdamW's first step: m / (sqrt(v) + eps) = g / (|g| + eps)
                wd = ADAM_WD if before[n].dim() == 2 else 0.0
                expected = before[n] * (1 - ADAM_LR * wd) - ADAM_LR * grads[n] / (grads[n].abs() + 1e-8)
                sgd = None
            step = expected - before[n]
            errors[n] = {"muon": n in muon_names, "matrix": before[n].dim() == 2,
                         "error": ((after - expected).norm() / step.norm()).item(),
                         "sgd_error": None if sgd is None else ((after - sgd).norm() / step.norm()).item()}
        eng.backward(eng(idx[:, :-1], idx[:, 1:])[1])  # the moment the planner models: before a later step
        results[name] = {"dtype": dtype, "errors": errors, "optimizer": type(eng.optimizer).__name__,
                         "stage": stage, "state_bytes": state_bytes_per_rank(eng)}
        del eng
        out.write_text(json.dumps(results))


def eager_muon() -> None:
    """A forked rank's prelude: Muon's kernels run eagerly (the same arithmetic, no ~40 s compile per
    process). TORCHDYNAMO_DISABLE would come too late: the fork server imported torch._dynamo."""
    import torch._dynamo
    torch._dynamo.config.disable = True


@pytest.fixture(scope="module")
def one_step(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("muon") / "one_step.json"
    forked_script(1, script_main, str(out), log_dir=out.parent / "logs", timeout=900)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_one_muon_step_matches_a_reference_muon_on_the_hidden_matrices_and_adamw_elsewhere(one_step, case):
    result = one_step[case]
    muon_tol, adam_tol = TOLERANCE[result["dtype"]]
    muon_errors = {n: e for n, e in result["errors"].items() if e["muon"]}
    assert len(muon_errors) == 2 * 4, muon_errors  # 2 blocks x (c_attn, attn c_proj, c_fc, mlp c_proj)
    assert {n for n in result["errors"] if not result["errors"][n]["muon"]} >= {"transformer.wte.weight",
                                                                                 "transformer.wpe.weight"}
    # AdamW's first step is about sign(g), which a bf16 gradient flips where it is tiny: in bf16 only the
    # AdamW side's matrices are compared, and at ZeRO-0 (bf16 gradients, no fp32 accumulation: 27% off
    # measured) only the Muon side.
    checked = {n: e for n, e in result["errors"].items()
               if result["dtype"] == "float32" or e["muon"] or (e["matrix"] and result["stage"] > 0)}
    bad = {n: e["error"] for n, e in checked.items() if e["error"] > (muon_tol if e["muon"] else adam_tol)}
    assert not bad, (case, bad)
    # The check can fail: a plain SGD step is nowhere near it.
    assert min(e["sgd_error"] for e in muon_errors.values()) > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] in (1, 2) or CASES[c] == (0, "float32")])
def test_the_planner_holds_one_momentum_buffer_and_matches_the_live_engine_within_2_percent(one_step, case):
    from ds_gpt.plan_memory import Setup, gpt_layout, state_bytes

    result = one_step[case]
    layout = gpt_layout(2, 64, 512, 32, bias=False)
    planned = state_bytes(Setup(layout, 1, result["stage"], result["dtype"], optimizer="muon"))["gpu"]
    measured = result["state_bytes"]
    for key in planned:
        assert abs(planned[key] - measured[key]) <= 0.02 * measured[key], (case, key, planned, measured)
    adamw = state_bytes(Setup(layout, 1, result["stage"], result["dtype"]))["gpu"]
    hidden = sum(p.numel for p in layout.params if p.muon)
    grad_bytes = 2 if result["dtype"] == "bfloat16" else 4
    # one momentum buffer (in the gradient dtype) instead of two fp32 moments
    assert adamw["optimizer"] - planned["optimizer"] == (8 - grad_bytes) * hidden


def test_muon_json_settings_per_side_and_the_cli_overrides(tmp_path):
    run = resolve(parse_args(["--deepspeed_config", "ds_configs/zero1_muon.json", *SHAPE]), 1, cuda=False)
    params = run.ds_config["optimizer"]["params"]
    assert run.optimizer == "muon" and run.learning_rate == params["lr"]
    assert run.optimizer_sides == {"muon": {"lr": params["lr"], "weight_decay": params["weight_decay"]},
                                   "adam": {"lr": params["adam_lr"], "weight_decay": params["adam_weight_decay"]}}
    ratio = params["adam_lr"] / params["lr"]
    assert run.side_lrs(params["lr"] / 2) == pytest.approx({"muon": params["lr"] / 2, "adam": params["adam_lr"] / 2})
    # --learning_rate moves the Muon side, the AdamW side keeps its ratio; --weight_decay sets both.
    log: list[str] = []
    over = resolve(parse_args(["--deepspeed_config", "ds_configs/zero1_muon.json", *SHAPE, "--learning_rate", "0.01",
                               "--weight_decay", "0.05"]), 1, cuda=False, overrides_log=log)
    assert over.optimizer_sides == {"muon": {"lr": 0.01, "weight_decay": 0.05},
                                    "adam": {"lr": pytest.approx(0.01 * ratio), "weight_decay": 0.05}}
    assert any(line.startswith("--learning_rate: optimizer.params.adam_lr") for line in log), log


def muon_json(tmp_path: Path, **changes) -> str:
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero1_muon.json").read_text())
    for key, value in changes.items():
        if key == "params":
            ds["optimizer"]["params"].update(value)
        else:
            ds[key] = value
    path = tmp_path / "muon.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.mark.parametrize("changes, argv, message", [
    ({}, ["--grad_clip", "1.0"], "would clip Muon's orthogonalized update"),
    ({}, ["--zero_stage", "3"], "needs reduce_scatter off"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, [], "offload_optimizer"),
    ({"params": {"momentom": 0.9}}, [], "unknown Muon optimizer.params key(s) momentom"),
    ({"params": {"ns_method": "svd"}}, [], "ns_method must be one of"),
])
def test_configurations_where_muon_would_not_run_are_refused_in_one_line(tmp_path, changes, argv, message):
    cfg = parse_args(["--deepspeed_config", muon_json(tmp_path, **changes), *SHAPE, *argv])
    with pytest.raises(UserError) as err:
        resolve(cfg, 1, cuda=False)
    assert message in str(err.value)


@pytest.mark.slow
def test_a_killed_muon_run_resumes_bitwise_on_its_layout(tmp_path, token_bins):
    import signal
    import time

    from helpers import TINY, forked_background_train, forked_train, losses

    out = tmp_path / "run"
    args = ["--deepspeed_config", "ds_configs/zero1_muon.json", "--data_dir", str(token_bins), "--out_dir", str(out),
            *TINY, "--gradient_accumulation_steps", "2", "--checkpoint_interval", "3"]
    with forked_background_train(1, *args, "--max_iters", "1000", log_dir=tmp_path / "logs",
                                 prelude=eager_muon) as ranks:
        deadline = time.time() + 600
        # killed between checkpoints 3 and 6, so the resume re-runs iterations the killed run logged
        while not ((out / "global_step3" / "ds_gpt_complete.json").is_file() and len(losses(out)) >= 4):
            assert ranks.poll() is None and time.time() < deadline, ranks.output()[-3000:]
            time.sleep(0.05)
        ranks.signal(signal.SIGKILL)
        ranks.wait()
    before = losses(out)
    forked_train(1, *args, "--init_from", "resume", "--max_iters", "9", log_dir=tmp_path / "logs", prelude=eager_muon)
    start = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "start"][-1]
    resumed = losses(out)
    again = [i for i in range(start["iter"], 9) if i in before]  # iterations both runs trained
    assert start["iter"] in (3, 6) and again, (start, sorted(before))
    assert [resumed[i] for i in again] == [before[i] for i in again]  # bitwise


# --- resuming on another layout: Muon's momentum converted like AdamW's moments ---------------

MUON_RESUME = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32", "--vocab_size", "512",
               "--compile", "False", "--global_batch_size", "8", "--checkpoint_interval", "3", "--eval_interval",
               "1000", "--eval_iters", "1", "--log_interval", "1", "--warmup_iters", "2", "--lr_decay_iters", "20"]


@pytest.fixture(scope="module")
def muon_layouts(tmp_path_factory) -> dict[str, Path]:
    """A Muon run at ZeRO-1 on 2 ranks to iteration 6 (checkpoints 3 and 6), and its checkpoint 3
    resumed at ZeRO-3 on one rank to 6: a ZeRO-1 tag whose momentum straddles two partitions,
    converted, and a ZeRO-3 tag written after the conversion."""
    import shutil

    from helpers import forked_train, write_token_bins

    root = tmp_path_factory.mktemp("muon_layouts")
    data = write_token_bins(root / "data")
    runs = {"z1w2": (1, 2), "z3w1": (3, 1)}
    for name, (stage, ranks) in runs.items():
        out = root / name
        if name == "z3w1":
            shutil.copytree(root / "z1w2", out, ignore=shutil.ignore_patterns("global_step6"))
            (out / "latest").write_text("global_step3")
        forked_train(ranks, "--deepspeed_config", f"ds_configs/zero{stage}_muon.json", "--data_dir", str(data),
                     "--out_dir", str(out), *MUON_RESUME, "--micro_batch_size", str(8 // ranks), "--max_iters", "6",
                     *(["--init_from", "resume"] if name == "z3w1" else []), log_dir=root / f"{name}.logs",
                     prelude=eager_muon)
    return {name: root / name for name in runs}


@pytest.mark.slow
def test_a_muon_run_resumed_on_another_layout_continues_with_its_momentum(muon_layouts):
    """ZeRO-1 on 2 ranks -> ZeRO-3 on 1: the curve and the state at iteration 6 are the uninterrupted
    run's, up to the float16 Newton-Schulz's rounding (measured: losses within 6e-6, states within
    1.3%). A resume that loaded everything but the momentum was measured 3e-4 and 27-68% away."""
    from helpers import losses

    reference, resumed = (losses(muon_layouts[name]) for name in ("z1w2", "z3w1"))
    assert all(abs(resumed[i] - reference[i]) <= 1e-4 * reference[i] for i in (3, 4, 5)), (reference, resumed)
    [change] = [r for r in read_jsonl(muon_layouts["z3w1"] / "metrics.jsonl") if r.get("event") == "layout_change"]
    assert change["converted"] and (change["from"]["zero_stage"], change["to"]["zero_stage"]) == (1, 3)
    expected, got = (consolidated(muon_layouts[name] / "global_step6")[0] for name in ("z1w2", "z3w1"))
    assert set(got["momentum_buffer"]) == {n for n in got["fp32"] if ".h." in n and n.endswith("weight")
                                          and "ln_" not in n}
    for key in ("fp32", "exp_avg", "exp_avg_sq", "momentum_buffer"):
        assert relative_gap(expected[key], got[key]) < 0.05, key
    # what the comparison would say of a resume that started Muon's momentum from zero
    restarted = consolidated(muon_layouts["z1w2"] / "global_step3")[0]["momentum_buffer"]
    assert relative_gap(expected["momentum_buffer"], restarted) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("source, iter_num", [("z1w2", 3), ("z3w1", 6)])
def test_muon_state_loads_into_every_stage_and_saves_back_bit_for_bit(muon_layouts, tmp_path, monkeypatch, request,
                                                                      source, iter_num):
    """The layout-free form loaded into a Muon engine at ZeRO 0-3, fp32 and bf16, then saved by
    DeepSpeed and read back: the same masters, moments and momentum, and the weights set."""
    import shutil

    import deepspeed
    import torch

    from ds_gpt import elastic
    from ds_gpt import engine as ds_engine
    from ds_gpt.model import GPT, GPTConfig

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    eager = torch._dynamo.config.disable
    torch._dynamo.config.disable = True  # Muon's kernels eager (monkeypatch would delete the config key after)
    request.addfinalizer(lambda: setattr(torch._dynamo.config, "disable", eager))
    tag_dir = tmp_path / f"global_step{iter_num}"
    shutil.copytree(muon_layouts[source] / tag_dir.name, tag_dir)
    marker = json.loads((tag_dir / "ds_gpt_complete.json").read_text())
    elastic.convert(tag_dir, marker)
    saved = {key: torch.load(tag_dir / elastic.DIRNAME / f"{key}.pt", weights_only=True) for key in elastic.STATES}
    assert len(saved["momentum_buffer"]) == 8 and len(saved["exp_avg"]) == 7
    for stage in (0, 1, 2, 3):  # ZeRO-3 last: it patches torch.nn.functional.linear for the rest of the process
        for dtype in ("float32", "bfloat16"):
            cfg = parse_args(["--deepspeed_config", f"ds_configs/zero{max(1, stage)}_muon.json", "--zero_stage",
                              str(stage), "--dtype", dtype, *SHAPE])
            run = resolve(cfg, 1, cuda=False)
            eng = ds_engine.build_engine(GPT(GPTConfig(**marker["model_args"])), run)
            elastic.load_into(eng, tag_dir)
            with deepspeed.zero.GatheredParameters(list(eng.module.parameters()), enabled=stage == 3):
                weights = {n: p.detach().clone() for n, p in eng.module.named_parameters()}
            assert all(torch.equal(w, saved["fp32"][n].to(w.dtype)) for n, w in weights.items()), (stage, dtype)
            eng.save_checkpoint(str(tmp_path / "back"), tag=f"z{stage}-{dtype}",
                                client_state={"config": {"ds_config": run.ds_config}})
            back_dir = tmp_path / "back" / f"z{stage}-{dtype}"
            (back_dir / "ds_gpt_complete.json").write_text(json.dumps(marker))
            back, back_step = consolidated(back_dir)
            different = [(key, n) for key in elastic.STATES for n in saved[key]
                         if not torch.equal(back[key][n], saved[key][n])]
            assert not different and back.keys() == saved.keys(), (stage, dtype, different[:3])
            assert back_step == iter_num, (stage, dtype)
            del eng


def eager_muon_and_nan_at(forwards: set[int]) -> None:
    """Prelude: eager Muon, and a NaN loss on the training forwards numbered in `forwards`."""
    from nan_injection import poison
    eager_muon()
    poison(forwards)


@pytest.mark.slow
def test_the_nonfinite_guard_skips_a_muon_step_and_leaves_the_weights_as_they_were(tmp_path, token_bins):
    import functools

    import torch
    from helpers import TINY, forked_train

    from ds_gpt.checkpoint import load_fp32_state_dict

    out = tmp_path / "run"
    forked_train(1, "--deepspeed_config", "ds_configs/zero1_muon.json", "--data_dir", str(token_bins), "--out_dir",
                 str(out), *TINY, "--gradient_accumulation_steps", "1", "--max_iters", "6", "--checkpoint_interval",
                 "1", "--keep_last", "100", "--on_nan", "skip", log_dir=tmp_path / "logs",
                 prelude=functools.partial(eager_muon_and_nan_at, {5}))
    [event] = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "nonfinite_loss"]
    assert (event["iter"], event["action"]) == (4, "skip")
    before, after, later = (load_fp32_state_dict(out, f"global_step{i}")[0] for i in (4, 5, 6))
    assert all(torch.equal(before[k], after[k]) for k in before)  # lr 0 on both sides: nothing moved
    assert not torch.equal(after["transformer.h.0.attn.c_attn.weight"], later["transformer.h.0.attn.c_attn.weight"])


def test_newton_schulz_flops_by_hand():
    # one 768 x 3072 matrix (GPT-2's c_fc), 5 steps: 5 x (4 x 768^2 x 3072 + 2 x 768^3)
    assert muon.ns_flops_per_step([(3072, 768)]) == 5 * (4 * 768 ** 2 * 3072 + 2 * 768 ** 3)


def script_main() -> None:
    worker(Path(sys.argv[1]))


if __name__ == "__main__":
    script_main()
