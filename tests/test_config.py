"""Config parsing, the DeepSpeed JSON resolver and the batch arithmetic."""
from __future__ import annotations

import json
import re
import subprocess

import pytest
from helpers import PYTHON, REPO_ROOT

from ds_gpt.config import TrainConfig, parse_args
from ds_gpt.errors import UserError
from ds_gpt.run_config import BatchSizes, adopt_model_args, resolve, resolve_batch


def test_defaults_are_the_seed_124m_recipe():
    cfg = parse_args([])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (12, 12, 768, 1024, 50304)
    assert (cfg.max_iters, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr) == (600000, 2000, 600000, 6e-5)
    run = resolve(cfg, world_size=8, cuda=True)
    assert run.learning_rate == 6e-4 and run.weight_decay == 0.1
    assert run.ds_config["gradient_clipping"] == 1.0
    assert run.ds_config["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert run.dtype == "bfloat16" and run.zero_stage == 1
    # 12 x 1024 per GPU, 480 sequences: the reference run's 491,520 tokens per iteration
    assert run.tokens_per_iter == 491_520
    assert run.batch == BatchSizes(micro=12, grad_accum=5, world_size=8)
    assert resolve(cfg, world_size=2, cuda=True).batch.grad_accum == 20


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_ds_config_resolves(path):
    """A stale or mistyped shipped JSON fails CI here."""
    for world in (1, 2, 4, 8):
        run = resolve(parse_args(["--deepspeed_config", str(path)]), world_size=world, cuda=True)
        b = run.batch
        assert b.micro * b.grad_accum * world == run.ds_config["train_batch_size"] == 480
    if path.stem.startswith("zero"):  # zero2_offload.json is ZeRO-2
        assert run.zero_stage == int(path.stem.removeprefix("zero").split("_")[0])


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "config").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_file_parses(path):
    import tomllib

    cfg = parse_args(["--config", str(path)])
    written = tomllib.loads(path.read_text())
    assert written and {k: getattr(cfg, k) for k in written} == written


@pytest.mark.parametrize("kwargs, expected", [
    (dict(json_micro=12, json_global=480), (12, 20)),  # world 2: nanoGPT's 40 // 2
    (dict(json_micro=12, json_global=480, micro=4), (4, 60)),  # CLI micro: accumulation follows
    (dict(json_micro=12, json_global=480, micro=2, accum=3), (2, 3)),  # global follows
    (dict(json_micro=12, json_global=480, accum=4), (12, 4)),
    (dict(json_micro=12, json_global=480, global_batch=48), (12, 2)),
    (dict(json_micro=6, json_accum=2), (6, 2)),
    (dict(json_global=8), (4, 1)),  # DeepSpeed's rule: micro = global / world
    (dict(), (1, 1)),
    (dict(json_micro=12, json_global=480, json_accum=20), (12, 20)),
])
def test_resolve_batch(kwargs, expected):
    b = resolve_batch(2, **kwargs)
    assert (b.micro, b.grad_accum) == expected and b.global_batch == b.micro * b.grad_accum * 2


@pytest.mark.parametrize("kwargs, names", [
    (dict(json_micro=12, json_global=480),
     ["train_batch_size=480", "train_micro_batch_size_per_gpu=12", "world_size=7"]),
    (dict(micro=2, accum=3, global_batch=100), ["--global_batch_size=100", "--micro_batch_size=2", "world_size=7"]),
    (dict(json_micro=12, json_global=480, json_accum=5), ["gradient_accumulation_steps=5", "train_batch_size=480"]),
])
def test_inconsistent_batches_name_the_numbers(kwargs, names):
    with pytest.raises(UserError) as err:
        resolve_batch(7, **kwargs)
    for name in names:
        assert name in str(err.value)


def test_cli_wins_over_config_file_over_defaults(tmp_path):
    (tmp_path / "c.toml").write_text('n_layer = 4\nn_head = 2\nbias = true\nlearning_rate = 1e-3\n')
    cfg = parse_args(["--config", str(tmp_path / "c.toml"), "--n_head", "4", "--bias=False", "--compile", "True"])
    assert (cfg.n_layer, cfg.n_head, cfg.bias, cfg.compile, cfg.learning_rate) == (4, 4, False, True, 1e-3)
    run = resolve(cfg, 1, cuda=False)
    assert run.learning_rate == 1e-3
    assert run.ds_config["optimizer"]["params"]["torch_adam"] is True  # CPU: torch's AdamW


def test_overrides_are_applied_and_logged():
    log: list[str] = []
    cfg = parse_args(["--zero_stage", "3", "--dtype", "float32", "--grad_clip", "0.5", "--weight_decay", "0.0"])
    run = resolve(cfg, 2, cuda=True, overrides_log=log)
    assert run.zero_stage == 3 and run.dtype == "float32"
    assert run.ds_config["gradient_clipping"] == 0.5 and run.weight_decay == 0.0
    assert any(line.startswith("--zero_stage: zero_optimization.stage 1 -> 3") for line in log)


@pytest.mark.parametrize("json_block, argv, step", [
    ({"enabled": False, "profile_step": 10}, [], None),           # the shipped block: no profile
    ({"enabled": False, "profile_step": 10}, ["--profile_step", "4"], 4),
    ({"enabled": True, "profile_step": 7}, [], 7),                 # the JSON asks: honoured
    ({"enabled": True}, [], 1),                                   # DeepSpeed's default step
    ({"enabled": True, "profile_step": 7}, ["--profile_step", "4"], 4),
])
def test_profile_step_comes_from_the_cli_or_the_json_and_the_engine_block_stays_off(tmp_path, json_block, argv, step):
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero1.json").read_text())
    (tmp_path / "ds.json").write_text(json.dumps({**ds, "flops_profiler": json_block}))
    run = resolve(parse_args(["--deepspeed_config", str(tmp_path / "ds.json"), *argv]), 1, cuda=True)
    assert run.profile_step == step and run.to_dict()["profile_step"] == step
    assert run.ds_config["flops_profiler"]["enabled"] is False  # DeepSpeed would force its per-step timers


@pytest.mark.parametrize("argv, message", [
    (["--n_layr", "4"], "unrecognized arguments: --n_layr"),
    (["--n_layer", "four"], "--n_layer expects int, got 'four'"),
    (["--bias", "maybe"], "--bias expects bool"),
    (["--n_layer", "1.5"], "--n_layer expects int"),
    (["--dtype", "float64"], "dtype must be one of"),
    (["--n_embd", "100", "--n_head", "3"], "n_embd 100 is not divisible by n_head 3"),
    (["--zero_stage", "4", "--max_iters", "0"], "max_iters must be positive"),  # both reported at once
])
def test_bad_options_are_user_errors(argv, message):
    with pytest.raises(UserError, match=None) as err:
        parse_args(argv)
    assert message in str(err.value)


@pytest.mark.parametrize("argv, messages", [
    (["--seed", "-1"], ["seed must be in [0, 2**32) (got -1)"]),
    (["--seed", str(2**32)], ["seed must be in [0, 2**32)"]),
    (["--learning_rate", "nan", "--min_lr", "inf"],
     ["learning_rate must be a finite number (got nan)", "min_lr must be a finite number (got inf)"]),
    (["--learning_rate=-1e-3", "--min_lr", "-1"], ["learning_rate must be >= 0", "min_lr must be >= 0"]),
    (["--learning_rate", "1e-5"], ["min_lr (6e-05) must not exceed learning_rate (1e-05)"]),
    (["--grad_clip", "-1", "--weight_decay", "-0.1"], ["grad_clip must be >= 0", "weight_decay must be >= 0"]),
    (["--peak_tflops", "0"], ["peak_tflops must be positive (got 0.0)"]),
    (["--peak_tflops=-inf", "--dropout", "nan"],
     ["dropout must be a finite number (got nan)", "peak_tflops must be a finite number (got -inf)"]),
    (["--milestone_every", "-5"], ["milestone_every must be >= 0"]),
])
def test_numeric_options_are_checked_all_at_once(argv, messages):
    with pytest.raises(UserError) as err:
        parse_args(argv)
    assert all(m in str(err.value) for m in messages), str(err.value)
    assert str(err.value).count(";") == len(messages) - 1  # each problem once, in one error


@pytest.mark.parametrize("argv", [
    ["--seed", "0"], ["--seed", str(2**32 - 1)], ["--learning_rate", "0"],  # lr 0: weights stay as loaded
    ["--learning_rate", "1e-5", "--decay_lr", "False"], ["--learning_rate", "1e-4", "--min_lr", "1e-4"],
    ["--grad_clip", "0", "--weight_decay", "0"],
])
def test_numeric_options_at_their_limits_are_accepted(argv):
    parse_args(argv)


def test_nan_from_a_config_file_is_refused(tmp_path):
    (tmp_path / "c.toml").write_text("learning_rate = nan\nweight_decay = inf\n")
    with pytest.raises(UserError, match="learning_rate must be a finite number .*weight_decay must be a finite"):
        parse_args(["--config", str(tmp_path / "c.toml")])


def test_bad_config_file(tmp_path):
    (tmp_path / "bad.toml").write_text("n_layr = 4\n")
    with pytest.raises(UserError, match="unknown option 'n_layr'"):
        parse_args(["--config", str(tmp_path / "bad.toml")])
    (tmp_path / "typed.toml").write_text('n_layer = "4"\n')
    with pytest.raises(UserError, match="n_layer must be an integer, not a quoted string") as err:
        parse_args(["--config", str(tmp_path / "typed.toml")])
    assert err.value.hint == "write it as n_layer = 3 (TOML values keep their type)"


@pytest.mark.parametrize("line, message", [
    ("bias = 3", "bias must be true or false, not int (3)"),
    ("learning_rate = true", "learning_rate must be a number, not a boolean (True)"),
    ("n_layer = 2.0", "n_layer must be an integer, not float (2.0)"),
    ("milestones = [10, 20]", "milestones must be a string, not a list ([10, 20])"),
])
def test_config_file_values_keep_their_toml_type(tmp_path, line, message):
    (tmp_path / "c.toml").write_text(line + "\n")
    with pytest.raises(UserError, match=re.escape(message)):
        parse_args(["--config", str(tmp_path / "c.toml")])


@pytest.mark.parametrize("line, field, value", [
    ("learning_rate = 1", "learning_rate", 1.0), ("milestones = 10000", "milestones", "10000"),
    ("pg_timeout = 604800", "pg_timeout", 604800),  # a week: the longest wait a collective may be given
])
def test_config_file_values_that_widen_are_accepted(tmp_path, line, field, value):
    (tmp_path / "c.toml").write_text(line + "\n")
    assert getattr(parse_args(["--config", str(tmp_path / "c.toml")]), field) == value


@pytest.mark.parametrize("content, message", [
    ('{"train_batch_size": 8,,}', "is not valid JSON"),
    ('{"zero_optimisation": {"stage": 2}}', "unknown key(s) zero_optimisation"),
    ('{"flops_profiler": {"enabld": true}}', "unknown flops_profiler key(s) enabld"),
    ('{"scheduler": {"type": "WarmupLR"}}', "remove the scheduler block"),
    ('{"optimizer": {"type": "SGD", "params": {"lr": 1}}}', "must be AdamW"),
    ('{"train_batch_size": 8}', "optimizer.params.lr is missing"),
])
def test_bad_ds_configs(tmp_path, content, message):
    (tmp_path / "ds.json").write_text(content)
    with pytest.raises(UserError) as err:
        resolve(parse_args(["--deepspeed_config", str(tmp_path / "ds.json")]), 1, cuda=False)
    assert message in str(err.value)


def test_lr_schedule_is_nanogpts():
    run = resolve(parse_args(["--warmup_iters", "10", "--lr_decay_iters", "110", "--min_lr", "1e-5"]), 1, cuda=True)
    assert run.lr_at(0) == pytest.approx(6e-4 * 1 / 11)
    assert run.lr_at(9) == pytest.approx(6e-4 * 10 / 11)
    assert run.lr_at(60) == pytest.approx(1e-5 + 0.5 * (6e-4 - 1e-5))  # half way down the cosine
    assert run.lr_at(110) == pytest.approx(1e-5) and run.lr_at(10**6) == 1e-5


def test_cli_reports_one_line_and_exit_2(tmp_path):
    """The edge: a user error is one line on stderr, no traceback, exit code 2."""
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 1}, "trian_batch_size": 8}')
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.train", "--deepspeed_config", str(tmp_path / "ds.json"),
                           "--out_dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "ds_gpt.train: error:" in line]
    assert len(errors) == 1 and "trian_batch_size" in errors[0]
    assert "Traceback" not in proc.stderr


def test_checkpoint_shape_fills_in_what_the_user_did_not_set(tmp_path):
    saved = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32, "vocab_size": 512, "bias": True, "dropout": 0.1}
    run = resolve(parse_args(["--dropout", "0.0", "--n_layer", "2"]), 1, cuda=False)
    adopt_model_args(run, saved, "ckpt")
    assert run.model == {**saved, "dropout": 0.0}  # dropout is the run's own choice
    assert run.tokens_per_iter == run.batch.global_batch * 32
    run = resolve(parse_args(["--n_layer", "4", "--bias", "False"]), 1, cuda=False)
    with pytest.raises(UserError,
                       match="another model: n_layer=2 there vs --n_layer=4, bias=True there vs --bias=False"):
        adopt_model_args(run, saved, "ckpt")


def test_the_docs_document_every_training_option():
    """--help is generated from TrainConfig; the option table in docs/training.md must not fall behind it."""
    import dataclasses

    table = (REPO_ROOT / "docs" / "training.md").read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig)
               if f.metadata.get("cli") is not False and f"`--{f.name}`" not in table]
    assert not missing, f"docs/training.md lacks {missing}"


def test_the_recommended_124m_run_is_one_set_up():
    """`sbatch slurm/ds_train.sh` trains config/train_gpt2.toml with the JSON that file names: the
    reference run's model, schedule and batch (the README's recommended path)."""
    import tomllib

    script = (REPO_ROOT / "slurm" / "ds_train.sh").read_text()
    toml = tomllib.loads((REPO_ROOT / "config" / "train_gpt2.toml").read_text())
    assert "TRAIN_CONFIG=${TRAIN_CONFIG-config/train_gpt2.toml}" in script
    assert f"DS_CONFIG=${{DS_CONFIG:-{toml['deepspeed_config']}}}" in script
    # the job's arguments as ds_train.sh puts them, with a user's override after them
    cfg = parse_args(["--config", "config/train_gpt2.toml", "--deepspeed_config", toml["deepspeed_config"],
                      "--data_dir", "data/openwebtext", "--out_dir", "out/gpt2-124m", "--init_from", "auto",
                      "--eval_interval", "500"])
    assert (cfg.eval_interval, cfg.log_interval, cfg.checkpoint_interval) == (500, 10, 1000)
    defaults = parse_args([])
    assert all(getattr(cfg, k) == getattr(defaults, k) for k in ("n_layer", "n_head", "n_embd", "block_size",
                                                                 "max_iters", "learning_rate", "min_lr"))
    run = resolve(cfg, world_size=8, cuda=True)
    assert (run.zero_stage, run.dtype, run.batch.micro, run.batch.grad_accum) == (1, "bfloat16", 12, 5)
    assert run.batch.global_batch * cfg.block_size == 491_520
