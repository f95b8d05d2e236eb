"""Resuming on another layout (ds_gpt.elastic): world size, ZeRO stage, precision, batch split.

The trainer runs for real (deepspeed launcher for several ranks, one plain process for one).
The matrix shares first halves: every run is the uninterrupted reference for the resumes made
from its checkpoint at iteration 3 (or 6, or 9), and a resumed run that goes on is in turn the
reference for the resumes made from its own later checkpoint. Each resume is compared, over
the three iterations after it, with the run its checkpoint came from.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import fs_faults
import pytest
import torch
from helpers import (
    PYTHON,
    REPO_ROOT,
    consolidated,
    forked_train,
    free_port,
    losses,
    read_jsonl,
    relative_gap,
    tiny_run_args,
    write_token_bins,
)

from ds_gpt import elastic
from ds_gpt.errors import UserError
from ds_gpt.run_config import BatchSizes

MODEL = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32", "--vocab_size", "512"]
SEGMENT = 3  # iterations between checkpoints; a resume is checked over the next SEGMENT
FP32_RTOL = 1e-6  # per-iteration loss, resumed vs uninterrupted (measured: <= 1e-7)
BF16_RTOL = 1e-4  # bf16 (measured: ~2e-5, as between two uninterrupted bf16 runs on other layouts)


@dataclass(frozen=True)
class Run:
    """One trainer run: from scratch (parent None) or resumed from `parent`'s checkpoint at `start`."""

    stage: int
    ranks: int
    end: int  # --max_iters
    parent: str | None = None
    start: int = 0
    micro: int | None = None  # default: the global batch of 8 in one micro-step per rank
    dtype: str = "float32"


# name -> run, parents first. Pairs checked: world size 2->1, 1->2, 2->4, 4->2 at ZeRO-1; ZeRO
# 1->3, 3->1, 3->2, 2->3, 2->0, 0->2, each with a change of world size; bf16 across stage and
# world size; a new micro batch/accumulation split on the same layout.
RUNS = {
    "z1w2": Run(1, 2, 6),
    "z1w1": Run(1, 1, 9, "z1w2", 3, micro=4),  # 2->1 (and accumulation 2)
    "z1w1_to_z1w2": Run(1, 2, 9, "z1w1", 6),  # 1->2
    "z1w4": Run(1, 4, 9, "z1w2", 3),  # 2->4
    "z1w4_to_z1w2": Run(1, 2, 9, "z1w4", 6, micro=2),  # 4->2
    "z3w1": Run(3, 1, 9, "z1w2", 3),  # ZeRO 1->3, 2->1
    "z3w1_to_z1w2": Run(1, 2, 9, "z3w1", 6),  # ZeRO 3->1, 1->2
    "z3w1_to_z2w2": Run(2, 2, 9, "z3w1", 6),  # ZeRO 3->2, 1->2
    "z2w1": Run(2, 1, 9, "z1w2", 3),  # ZeRO 1->2, 2->1
    "z2w1_to_z3w2": Run(3, 2, 9, "z2w1", 6),  # ZeRO 2->3, 1->2 (a ZeRO-3 multi-rank tag after a change)
    "z0w2": Run(0, 2, 12, "z2w1", 6),  # ZeRO 2->0, 1->2
    "z0w2_to_z2w1": Run(2, 1, 12, "z0w2", 9),  # ZeRO 0->2, 2->1
    "z0w2_to_z0w1": Run(0, 1, 12, "z0w2", 9),  # ZeRO-0 2->1: DeepSpeed's own load (not partitioned)
    "z1w1_split": Run(1, 1, 9, "z1w1", 6, micro=2),  # same layout, micro 4 x 2 -> 2 x 4: DeepSpeed's own load
    "bf16_z1w2": Run(1, 2, 6, dtype="bfloat16"),
    "bf16_z3w1": Run(3, 1, 6, "bf16_z1w2", 3, dtype="bfloat16"),  # bf16, ZeRO 1->3, 2->1
    "bf16_to_fp32_z0w1": Run(0, 1, 6, "bf16_z1w2", 3),  # bf16 -> fp32, ZeRO 1->0, 2->1
}
RESUMES = [name for name, run in RUNS.items() if run.parent]


def trainer_args(run: Run, data_dir: Path, out: Path) -> list[str]:
    return ["--deepspeed_config", f"ds_configs/zero{run.stage}.json", "--data_dir", str(data_dir),
            "--out_dir", str(out), *MODEL, "--dtype", run.dtype, "--compile", "False",
            "--global_batch_size", "8", "--micro_batch_size", str(run.micro or 8 // run.ranks),
            "--max_iters", str(run.end), "--checkpoint_interval", str(SEGMENT), "--eval_interval", "1000",
            "--eval_iters", "1", "--log_interval", "1", "--warmup_iters", "2", "--lr_decay_iters", "20",
            "--learning_rate", "3e-3", *(["--init_from", "resume"] if run.parent else [])]


def run_trainer(ranks: int, args: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    """The ranks forked from the test's preloaded server (helpers.forked_train); output beside OUT."""
    out = Path(args[args.index("--out_dir") + 1])
    return forked_train(ranks, *args, log_dir=out.with_name(out.name + ".logs"), expect=expect)


def copy_run_at(src: Path, dst: Path, iter_num: int) -> None:
    """A copy of a run directory as it was when checkpoint `iter_num` was its newest."""
    shutil.copytree(src, dst)
    for tag in dst.glob("global_step*"):
        if int(tag.name.removeprefix("global_step")) > iter_num:
            shutil.rmtree(tag)
    (dst / "latest").write_text(f"global_step{iter_num}")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_token_bins(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Every run of RUNS, one after the other: parallel runs would make the CPU ranks' all-reduce spin."""
    root = tmp_path_factory.mktemp("elastic")
    for name, run in RUNS.items():
        if run.parent:
            copy_run_at(root / run.parent, root / name, run.start)
        run_trainer(run.ranks, trainer_args(run, data_dir, root / name))
    return {name: root / name for name in RUNS}


# --- the loss curve continues --------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", RESUMES)
def test_resumed_run_continues_the_curve(runs, name):
    run = RUNS[name]
    parent, resumed = losses(runs[run.parent]), losses(runs[name])
    window = range(run.start, run.start + SEGMENT)
    assert sorted(resumed) == list(range(run.end))
    rtol = BF16_RTOL if "bfloat16" in (run.dtype, RUNS[run.parent].dtype) else FP32_RTOL
    worst = max(abs(resumed[i] - parent[i]) / abs(parent[i]) for i in window)
    assert worst <= rtol, f"{name}: max relative loss gap {worst:.2e} over iterations {list(window)}"
    starts = [e for e in read_jsonl(runs[name] / "metrics.jsonl") if e.get("event") == "start"]
    assert starts[-1]["resumed_from"] == f"global_step{run.start}" and starts[-1]["iter"] == run.start


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in RESUMES if RUNS[n].dtype == "float32" == RUNS[RUNS[n].parent].dtype])
def test_resumed_state_matches_the_uninterrupted_state(runs, name):
    """AdamW's moments, step count and the weights SEGMENT iterations later agree with the run that
    went on uninterrupted; moments restarted from zero would be ~30% off (0.9^3 of them lost)."""
    run = RUNS[name]
    mine, my_step = consolidated(runs[name] / f"global_step{run.start + SEGMENT}")
    theirs, their_step = consolidated(runs[run.parent] / f"global_step{run.start + SEGMENT}")
    assert my_step == their_step == run.start + SEGMENT
    for key in ("fp32", *elastic.MOMENTS):  # AdamW runs: no Muon momentum
        assert relative_gap(theirs[key], mine[key]) < 1e-4, key


@pytest.mark.slow
def test_each_layout_change_is_logged_and_converted_once(runs):
    events = [e for e in read_jsonl(runs["z3w1_to_z2w2"] / "metrics.jsonl") if e.get("event") == "layout_change"]
    z1w2, z3w1, z2w2 = ({"world_size": w, "zero_stage": z, "dtype": "float32"} for w, z in ((2, 1), (1, 3), (2, 2)))
    assert [(e["iter"], e["from"], e["to"], e["converted"]) for e in events] == [(3, z1w2, z3w1, True),
                                                                                (6, z3w1, z2w2, True)]
    split = read_jsonl(runs["z1w1_split"] / "metrics.jsonl")
    last_start = max(i for i, e in enumerate(split) if e.get("event") == "start")
    assert not [e for e in split[last_start:] if e.get("event") in ("layout_change", "batch_change")]
    for name, tag in (("z1w1_split", "global_step6"), ("z0w2_to_z0w1", "global_step9")):  # DeepSpeed's own load
        assert not (runs[name] / tag / elastic.DIRNAME).exists(), name
    meta = json.loads((runs["z3w1_to_z2w2"] / "global_step6" / elastic.DIRNAME / "meta.json").read_text())
    assert meta["step"] == 6 and meta["source"] == z3w1


# --- the moments land exactly ---------------------------------------------------------------

@pytest.fixture
def one_rank(monkeypatch):
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def engine_state(eng) -> tuple[dict[str, dict[str, torch.Tensor]], set[int]]:
    """The engine's fp32 masters, moments (full size, by name) and step counts, read back from DeepSpeed."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = dict(eng.module.named_parameters())
    out = {key: {} for key in elastic.STATES}
    base = elastic._base_optimizer(eng.optimizer)
    if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params.values()):
        for name, p in params.items():
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
            out["fp32"][name] = safe_get_full_fp32_param(p).reshape(shape)
            for key in elastic.MOMENTS:
                out[key][name] = safe_get_full_optimizer_state(p, key).reshape(shape)
        masters = list(getattr(eng.optimizer, "fp32_partitioned_groups_flat", [])) or \
            [p for g in base.param_groups for p in g["params"]]
    else:  # ZeRO-0: an fp32 master per weight (the weight itself in fp32)
        name_of = {id(p): n for n, p in params.items()}
        if hasattr(eng.optimizer, "fp32_groups"):
            groups = zip(eng.optimizer.fp32_groups, eng.optimizer.fp16_groups, strict=True)
            pairs = [(hp, name_of[id(lp)]) for hps, lps in groups for hp, lp in zip(hps, lps, strict=True)]
        else:
            pairs = [(p, name_of[id(p)]) for g in base.param_groups for p in g["params"]]
        for master, name in pairs:
            out["fp32"][name] = master
            for key in elastic.MOMENTS:
                out[key][name] = base.state[master][key]
        masters = [m for m, _ in pairs]
    return out, {int(base.state[m]["step"]) for m in masters}


@pytest.mark.slow
@pytest.mark.parametrize("source, iter_num", [("z2w1_to_z3w2", 9), ("bf16_z1w2", 6)])
def test_moments_after_loading_equal_the_saved_ones(runs, one_rank, tmp_path, source, iter_num):
    """A ZeRO-3 two-rank tag and a bf16 ZeRO-1 one into every stage, fp32 and bf16: bit for bit."""
    import deepspeed

    from ds_gpt.model import GPT, GPTConfig

    tag_dir = tmp_path / f"global_step{iter_num}"
    shutil.copytree(runs[source] / tag_dir.name, tag_dir)
    marker = json.loads((tag_dir / "ds_gpt_complete.json").read_text())
    elastic.convert(tag_dir, marker)
    saved = {key: torch.load(tag_dir / elastic.DIRNAME / f"{key}.pt", weights_only=True) for key in elastic.STATES}
    for stage in (0, 1, 2, 3):
        for bf16 in (False, True):
            model = GPT(GPTConfig(**marker["model_args"]))
            config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": bf16},
                      "zero_optimization": {"stage": stage},
                      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
            groups = model.optimizer_param_groups(0.1)
            eng, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
            elastic.load_into(eng, tag_dir)
            got, steps = engine_state(eng)
            different = [(key, n) for key in elastic.STATES for n in saved[key]
                         if not torch.equal(got[key][n].detach().float().cpu(), saved[key][n])]
            assert not different and steps == {iter_num}, (stage, bf16, different[:3], steps)
            with deepspeed.zero.GatheredParameters(list(eng.module.parameters()), enabled=stage == 3):
                weights = {n: p.detach().clone() for n, p in eng.module.named_parameters()}
            assert all(torch.equal(w, saved["fp32"][n].to(w.dtype)) for n, w in weights.items()), (stage, bf16)


# --- the conversion: atomic, idempotent, redone for a new save ------------------------------

def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


KILL_AFTER_FIRST_STATE = """
import os, signal, sys
from pathlib import Path
import json
from ds_gpt import elastic
save = elastic._save_durably
def save_then_die(obj, path):
    save(obj, path)
    os.kill(os.getpid(), signal.SIGKILL)
elastic._save_durably = save_then_die
tag = Path(sys.argv[1])
elastic.convert(tag, json.loads((tag / "ds_gpt_complete.json").read_text()))
"""


@pytest.mark.slow
def test_a_killed_conversion_leaves_the_tag_intact_and_a_rerun_finishes_it(runs, tmp_path):
    out = tmp_path / "run"
    copy_run_at(runs["z2w1_to_z3w2"], out, 9)
    tag = out / "global_step9"
    assert not (tag / elastic.DIRNAME).exists()
    before = tree_digest(tag)
    proc = subprocess.run([PYTHON, "-c", KILL_AFTER_FIRST_STATE, str(tag)], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tag / elastic.DIRNAME).exists() and list(tag.glob(f".{elastic.DIRNAME}.tmp-*"))
    assert {k: v for k, v in tree_digest(tag).items() if not k.startswith(".")} == before
    marker = json.loads((tag / "ds_gpt_complete.json").read_text())
    meta = elastic.convert(tag, marker)
    assert not list(tag.glob(f".{elastic.DIRNAME}.tmp-*")) and meta["step"] == 9
    published = tree_digest(tag / elastic.DIRNAME)
    assert elastic.convert(tag, marker) == meta and tree_digest(tag / elastic.DIRNAME) == published  # done once
    # The tag saved anew (another marker): its old conversion is not trusted.
    assert elastic.converted(tag, {**marker, "pid": -1}) is None
    assert elastic.convert(tag, {**marker, "pid": -1})["fingerprint"] != meta["fingerprint"]


@pytest.mark.slow
def test_a_full_disk_during_a_conversion_is_one_error_and_leaves_the_tag_intact(runs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    copy_run_at(runs["z2w1_to_z3w2"], out, 9)
    tag = out / "global_step9"
    before = tree_digest(tag)

    def disk_full(obj, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(elastic, "_save_durably", disk_full)
    with pytest.raises(UserError, match="No space left on device.*the checkpoint itself is intact"):
        elastic.convert(tag, json.loads((tag / "ds_gpt_complete.json").read_text()))
    assert tree_digest(tag) == before and not list(tag.glob(f".{elastic.DIRNAME}*"))


# --- what may not change ---------------------------------------------------------------------

def error_line(proc: subprocess.CompletedProcess) -> str:
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if "ds_gpt.train: error:" in line]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    return lines[0]


@pytest.mark.slow
def test_refusals_and_an_allowed_batch_change(runs, data_dir, tmp_path):
    """Another global batch: exit 2 with one line, unless --allow_batch_change (then a batch_change
    event); another model shape: exit 2 naming it. Nothing in the run directory changes on a refusal."""
    out = tmp_path / "run"
    copy_run_at(runs["z1w1"], out, 9)
    before = tree_digest(out)
    args = trainer_args(Run(1, 1, 12, "z1w1", 9), data_dir, out)
    bigger = [*args, "--global_batch_size", "16", "--micro_batch_size", "16"]
    line = error_line(run_trainer(1, bigger, expect=2))
    assert "global batch of 8 sequences; this run's is 16" in line and "--allow_batch_change" in line
    line = error_line(run_trainer(1, [*args, "--n_layer", "3"], expect=2))
    assert "n_layer=2 there vs --n_layer=3" in line
    assert tree_digest(out) == before
    run_trainer(1, [*bigger, "--allow_batch_change", "True"])
    events = [e for e in read_jsonl(out / "metrics.jsonl") if e.get("event") == "batch_change"]
    assert [(e["iter"], e["from"], e["to"]) for e in events] == [(9, 8, 16)]
    assert sorted(losses(out)) == list(range(12))


def test_the_data_tokenizer_and_the_optimizer_may_not_change(tmp_path):
    """Checked on the tag's own record of the run (its client state), before anything is built; a tag
    whose marker records no tokenizer (saved before it did) is checked on its data directory."""
    tag = tmp_path / "out" / "global_step5"
    tag.mkdir(parents=True)
    old, new = tmp_path / "old", tmp_path / "new"
    for data, tokenizer in ((old, "gpt2"), (new, "cl100k_base")):
        data.mkdir()
        (data / "meta.json").write_text(json.dumps({"tokenizer": tokenizer}))
    config = {"batch": {"global_batch": 8}, "train": {"data_dir": str(old)}}
    torch.save({"module": {}, "iter_num": 5, "config": config}, tag / "mp_rank_00_model_states.pt")
    def check(global_batch=8, data=old, allow=False, optimizer="adamw"):
        elastic.check_resume(tag, {}, batch=BatchSizes(global_batch, 1, 1), data_dir=str(data),
                             allow_batch_change=allow, optimizer=optimizer)

    with pytest.raises(UserError, match=f"{old} tokenized with gpt2; --data_dir {new} is tokenized with cl100k_base"):
        check(data=new)
    check()
    with pytest.raises(UserError, match="global batch of 8 sequences; this run's is 4"):
        check(global_batch=4)
    check(global_batch=4, allow=True)
    with pytest.raises(UserError, match="was trained with adamw; this run's optimizer is muon"):
        check(optimizer="muon")  # AdamW's moments are no Muon momentum


def test_which_resumes_need_a_conversion():
    L = elastic.Layout
    assert not elastic.needs_conversion(L(2, 1, "float32"), L(2, 1, "float32"))
    assert not elastic.needs_conversion(L(2, 0, "bfloat16"), L(4, 0, "bfloat16"))  # ZeRO-0 is not partitioned
    assert elastic.needs_conversion(L(2, 1, "float32"), L(1, 1, "float32"))
    assert elastic.needs_conversion(L(2, 0, "float32"), L(2, 1, "float32"))
    assert elastic.needs_conversion(L(2, 0, "bfloat16"), L(2, 0, "float32"))


# --- sample, export, report: any layout, before and after a change ----------------------------

@pytest.mark.slow
def test_sample_export_and_report_on_a_changed_layout(runs, tmp_path, capsys):
    """z2w1_to_z3w2 holds a ZeRO-2 one-rank tag (6, before the change, converted) and a ZeRO-3
    two-rank one (9, after it): both sample, every export format reads the newest, and the report
    covers the whole curve."""
    from ds_gpt import export, report, sample
    from ds_gpt.checkpoint import load_fp32_state_dict

    out = runs["z2w1_to_z3w2"]
    for tag in ("global_step6", "global_step9"):
        assert sample.main(["--out_dir", str(out), "--tag", tag, "--start", "!", "--max_new_tokens", "4"]) == 0
    after, client = load_fp32_state_dict(out)
    assert client["iter_num"] == 9 and json.loads((out / "global_step9" / "ds_gpt_complete.json").read_text())[
        "zero_stage"] == 3
    mine, _ = consolidated(out / "global_step9")
    assert all(torch.equal(after[n], mine["fp32"][n]) for n in mine["fp32"])
    for fmt in ("nanogpt", "hf", "fp32"):
        assert export.main(["--out_dir", str(out), "--format", fmt, "--dest", str(tmp_path / fmt)]) == 0
    state = torch.load(tmp_path / "fp32" / "model.pt", weights_only=True)
    assert all(torch.equal(state[n], after[n]) for n in mine["fp32"])
    assert report.main([str(out)]) == 0 and (out / "report.md").is_file()
    capsys.readouterr()


# --- a full disk, a killed conversion: found on the next start ---------------------------------

def tiny_run_copy(tiny_run: Path, out: Path) -> Path:
    """The tiny run's newest tag (global_step4, ZeRO-1, one rank) as the only one in `out`."""
    shutil.copytree(tiny_run / "out" / "global_step4", out / "global_step4")
    (out / "latest").write_text("global_step4")
    return out / "global_step4"


@pytest.mark.slow
def test_a_full_disk_during_a_conversion_is_one_line_on_every_rank(tiny_run, tmp_path, mounts):
    """A real full filesystem: room for the tag, not for its layout-free form (torch's zip writer
    then raises a RuntimeError, not an OSError). Resumed on two ranks: every rank exits 2 with one line."""
    tag_kib = sum(p.stat().st_size for p in (tiny_run / "out" / "global_step4").iterdir()) // 1024
    out = mounts.tmpfs(tmp_path / "disk", f"{tag_kib + 400}k") / "out"
    tag = tiny_run_copy(tiny_run, out)
    before = fs_faults.snapshot(tag)
    proc = forked_train(2, *tiny_run_args(tiny_run, out, ranks=2), "--max_iters", "6", "--init_from", "resume",
                        log_dir=tmp_path / "logs", expect=2)
    assert proc.rank_codes == [2, 2] and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    for rank, log in enumerate(sorted((tmp_path / "logs").glob("rank*.log"))):
        lines = [line for line in log.read_text().splitlines() if "error:" in line]
        assert len(lines) == 1 and lines[0].startswith("ds_gpt.train: error: "), (rank, lines)
        assert "the checkpoint itself is intact" in lines[0] if rank == 0 else "rank 0 could not convert" in lines[0]
    assert fs_faults.snapshot(tag) == before and not list(tag.glob(f".{elastic.DIRNAME}*"))


@pytest.mark.slow
def test_a_killed_conversions_temp_dir_goes_on_the_next_start(tiny_run, tmp_path):
    """The next resume uses the saving layout (no conversion of its own would clean up)."""
    tag = tiny_run_copy(tiny_run, tmp_path / "out")
    stale = tag / f".{elastic.DIRNAME}.tmp-999999"
    stale.mkdir()
    (stale / "fp32.pt").write_bytes(b"\0" * 4096)  # what a conversion killed after its first state leaves
    forked_train(1, *tiny_run_args(tiny_run, tmp_path / "out"), "--max_iters", "4", "--init_from", "resume",
                 log_dir=tmp_path / "logs")
    assert not stale.exists() and not (tag / elastic.DIRNAME).exists()
