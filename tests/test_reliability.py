"""What a run survives, each shown with the real trainer in real processes.

Bad inputs at the command line, a crash between shard writes, a full disk while saving, a NaN
loss, SIGINT once and twice, a change of world size or ZeRO stage, a dead and a stalled rank.
Faults come from outside the trainer (a FIFO or /dev/full where a shard goes, signals, a
patched forward in tests/nan_injection.py): the production code has no test hooks.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    PYTHON,
    REPO_ROOT,
    TINY,
    forked_background_train,
    forked_train,
    losses,
    read_jsonl,
    write_token_bins,
)
from nan_injection import poison

pytestmark = pytest.mark.slow

MODEL = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32", "--vocab_size", "512",
         "--dtype", "float32", "--compile", "False"]
ERROR = "ds_gpt.train: error:"


# --- helpers -------------------------------------------------------------------------------

def single(*args: str, expect: int | None = 0, nan_at: set[int] | None = None) -> subprocess.CompletedProcess:
    """One rank, no launcher, forked (helpers.forked_train), with NaN losses on the training forwards
    numbered in `nan_at`; its output is the result's stdout, beside OUT in OUT.logs/."""
    out = Path(args[args.index("--out_dir") + 1])
    return forked_train(1, *args, log_dir=out.with_name(out.name + ".logs"), expect=expect,
                        prelude=functools.partial(poison, nan_at) if nan_at else None)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`: what 'nothing lost' compares, additions and removals included."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ERROR in line]


def complete(out: Path, iter_num: int) -> bool:
    return (out / f"global_step{iter_num}" / "ds_gpt_complete.json").is_file()


def tags(out: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("global_step")) for p in out.glob("global_step*"))


def weights(out: Path, iter_num: int) -> dict[str, torch.Tensor]:
    from ds_gpt.checkpoint import load_fp32_state_dict
    return load_fp32_state_dict(out, f"global_step{iter_num}")[0]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"weights differ: {different}"


def wait_for(condition, proc, what: str, timeout: float = 240) -> None:
    """Poll `condition` while `proc` (a Popen or helpers.Ranks) runs."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def train_losses_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(losses(out)) if path.exists() else 0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_token_bins(tmp_path_factory.mktemp("data"))


def two_rank_args(data_dir: Path, out: Path, stage: int = 1) -> list[str]:
    """2 ranks x micro 2 x accum 2 = 8 sequences per iteration, checkpoint every 5."""
    return ["--deepspeed_config", f"ds_configs/zero{stage}.json", "--data_dir", str(data_dir), "--out_dir", str(out),
            *TINY, "--gradient_accumulation_steps", "2", "--checkpoint_interval", "5"]


def one_rank_args(data_dir: Path, out: Path) -> list[str]:
    """1 rank x micro 4 x accum 1: one training forward per iteration (what nan_injection counts)."""
    return ["--data_dir", str(data_dir), "--out_dir", str(out), *TINY, "--micro_batch_size", "4",
            "--gradient_accumulation_steps", "1"]


# --- 1. the bad-input catalogue ------------------------------------------------------------

@pytest.fixture(scope="module")
def good_run(tmp_path_factory, data_dir) -> Path:
    """A finished one-process run with a complete checkpoint: what a bad start must leave alone."""
    out = tmp_path_factory.mktemp("good")
    single("--data_dir", str(data_dir), "--out_dir", str(out), *MODEL, "--micro_batch_size", "2",
           "--gradient_accumulation_steps", "1", "--max_iters", "2", "--checkpoint_interval", "2",
           "--eval_interval", "2", "--eval_iters", "1")
    assert complete(out, 2)
    return out


def _write_ds(tmp: Path, text: str) -> str:
    (tmp / "ds.json").write_text(text)
    return str(tmp / "ds.json")


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def _poke(path: Path, index: int, value: int) -> None:
    ids = np.fromfile(path, dtype=np.uint16)
    ids[index] = value
    ids.tofile(path)


# case -> (what it does to the copies of the data and run directories, extra args, expected message)
BAD_INPUTS = {
    "missing_bin": (lambda t, d, o: (d / "train.bin").unlink() or [], "train.bin not found"),
    "empty_bin": (lambda t, d, o: (d / "val.bin").write_bytes(b"") or [], "val.bin is empty"),
    "odd_sized_bin": (lambda t, d, o: _append(d / "train.bin", b"\0") or [], "train.bin has an odd size"),
    "token_id_over_vocab": (lambda t, d, o: _poke(d / "train.bin", 1234, 50256) or [],
                            "train.bin holds token id 50256 >= vocab_size 512"),
    "block_size_over_data": (lambda t, d, o: np.arange(20, dtype=np.uint16).tofile(d / "val.bin") or [],
                             "val.bin holds 20 tokens, too few for block_size 32"),
    "ds_config_invalid_json": (lambda t, d, o: ["--deepspeed_config", _write_ds(t, '{"train_batch_size": 8,}')],
                               "is not valid JSON"),
    "ds_config_unknown_key": (lambda t, d, o: ["--deepspeed_config", _write_ds(
        t, '{"train_batch_size": 8, "zero_optimisation": {"stage": 2}, "optimizer": {"params": {"lr": 1e-3}}}')],
                              "unknown key(s) zero_optimisation"),
    "inconsistent_batch": (lambda t, d, o: ["--micro_batch_size", "2", "--gradient_accumulation_steps", "2",
                                            "--global_batch_size", "6"], "batch sizes disagree"),
    "unknown_cli_key": (lambda t, d, o: ["--n_layr", "2"], "unrecognized arguments: --n_layr"),
    "wrong_type": (lambda t, d, o: ["--max_iters", "ten"], "--max_iters expects int, got 'ten'"),
    "resume_without_checkpoint": (lambda t, d, o: ["--init_from", "resume", "--out_dir", str(t / "empty_out")],
                                  "--init_from resume: no complete checkpoint"),
    "resume_other_shape": (lambda t, d, o: ["--init_from", "resume", "--n_layer", "4"],
                           "was made for another model: n_layer=2 there vs --n_layer=4"),
    "out_dir_not_writable": (lambda t, d, o: ["--out_dir", str(t / "a_file" / "out")], "is not writable"),
    "scratch_over_checkpoints": (lambda t, d, o: ["--init_from", "scratch"],
                                 "already holds checkpoints (newest global_step2) and --init_from scratch"),
}


def break_inputs(case: str, good_run: Path, data_dir: Path, tmp_path: Path) -> list[str]:
    """Copies of the data and of a good run with one thing broken; the trainer's arguments for them."""
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(data_dir, data)
    shutil.copytree(good_run, out)
    (tmp_path / "a_file").write_text("a regular file where a directory is expected\n")
    break_it, _ = BAD_INPUTS[case]
    extra = break_it(tmp_path, data, out)
    # --init_from auto, as a requeued job would run: it finds the good checkpoint, then the bad input.
    return ["--data_dir", str(data), "--out_dir", str(out), *MODEL, "--micro_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--init_from", "auto", *extra]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_while_building_the_run_and_nothing_is_lost(case, good_run, data_dir, tmp_path,
                                                                         monkeypatch):
    """Each bad input: a UserError naming it from the building part (before any process group), no file changed."""
    from ds_gpt.errors import UserError
    from ds_gpt.startup import build_run

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    argv = break_inputs(case, good_run, data_dir, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as raised:
        build_run(argv)
    assert BAD_INPUTS[case][1] in str(raised.value)
    assert snapshot(tmp_path) == before  # no file written, changed or removed
    assert not (tmp_path / "empty_out").exists()


def test_bad_input_through_the_command_is_one_line_and_exit_2(good_run, data_dir, tmp_path):
    """The command's contract for all the cases above: exit 2, one `error:` line, no traceback."""
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.train", *break_inputs("token_id_over_vocab", good_run, data_dir,
                                                                         tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and BAD_INPUTS["token_id_over_vocab"][1] in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout


# --- 2. a crash in the middle of a save ----------------------------------------------------

def test_crash_between_shard_writes_resumes_from_the_previous_checkpoint(data_dir, tmp_path):
    """SIGKILL while rank 0 has written global_step10 and rank 1 has not; resume picks global_step5.

    Rank 1's optimizer shard path is a FIFO: its open() blocks, as a write stalled on a full or
    slow filesystem would, so the kill lands between the two ranks' shard writes every time.
    """
    out = tmp_path / "run"
    partial = out / "global_step10"
    partial.mkdir(parents=True)
    os.mkfifo(partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    args = two_rank_args(data_dir, out)
    with forked_background_train(2, *args, "--max_iters", "1000", log_dir=tmp_path / "logs") as ranks:
        wait_for(lambda: (partial / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists(), ranks,
                 "rank 0 started writing global_step10")
        time.sleep(0.5)
        ranks.signal(signal.SIGKILL)
        ranks.wait()
    assert not complete(out, 10) and complete(out, 5)
    assert (out / "latest").read_text() == "global_step5"  # the pointer never named the partial tag
    before_crash = losses(out)
    assert sorted(before_crash) == list(range(10))
    # What the crash leaves: rank 1's shard missing; and DeepSpeed's own `latest`, which it writes
    # before every rank has finished, naming the partial tag.
    (partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (out / "latest").write_text("global_step10")

    proc = forked_train(2, *args, "--init_from", "resume", "--max_iters", "12", log_dir=tmp_path / "logs")
    assert "skipping incomplete checkpoint(s) global_step10" in proc.stdout
    start = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "start"][-1]
    assert (start["resumed_from"], start["iter"]) == ("global_step5", 5)
    resumed = losses(out)
    assert sorted(resumed) == list(range(12))
    assert [resumed[i] for i in range(5, 10)] == [before_crash[i] for i in range(5, 10)]  # bitwise
    assert (out / "latest").read_text() == "global_step12" and complete(out, 10) and complete(out, 12)
    assert weights(out, 10).keys() == weights(out, 12).keys()  # the rewritten tag loads


# --- 3. a full disk while saving -----------------------------------------------------------

def test_full_disk_on_one_rank_keeps_the_previous_checkpoint(data_dir, tmp_path):
    """Rank 1's shard of global_step10 is written to /dev/full: ENOSPC from the kernel, mid-save.

    Every rank must learn of it (no rank left waiting in a collective until --pg_timeout), the
    pointer must stay on global_step5, the partial tag must go, and a resume must work.
    """
    out = tmp_path / "run"
    (out / "global_step10").mkdir(parents=True)
    (out / "global_step10" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").symlink_to("/dev/full")
    args = two_rank_args(data_dir, out)
    # A rank left waiting in a collective would sit there for --pg_timeout (900 s) and outlast the
    # timeout here; no launcher stops the other rank when one exits: each must exit 2 on its own.
    proc = forked_train(2, *args, "--max_iters", "12", "--pg_timeout", "900", expect=2, timeout=400,
                        log_dir=tmp_path / "logs")
    assert proc.rank_codes == [2, 2]
    lines = error_lines(proc.stdout + proc.stderr)
    assert lines and all("saving checkpoint global_step10 failed on 1 rank(s)" in line for line in lines), lines
    assert any("rank 1: " in line for line in lines), lines  # the failing rank names its error
    assert all("global_step5 is intact" in line for line in lines), lines
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (out / "latest").read_text() == "global_step5" and complete(out, 5)
    assert not (out / "global_step10").exists()
    before = losses(out)

    forked_train(2, *args, "--init_from", "resume", "--max_iters", "7", log_dir=tmp_path / "logs")
    resumed = losses(out)
    assert [resumed[i] for i in (5, 6)] == [before[i] for i in (5, 6)]
    assert (out / "latest").read_text() == "global_step7"


# --- 4. a non-finite loss ------------------------------------------------------------------

def test_nan_loss_stops_with_exit_3_and_the_last_checkpoint_intact(data_dir, tmp_path):
    """--on_nan stop: a NaN at iteration 7 exits 3, logs the event, and global_step5 resumes exactly."""
    from ds_gpt.config import parse_args
    from ds_gpt.run_config import resolve

    out = tmp_path / "run"
    args = [*one_rank_args(data_dir, out), "--checkpoint_interval", "5", "--on_nan", "stop"]
    proc = single(*args, nan_at={8}, expect=3)  # one forward per iteration: the 8th is iteration 7
    assert "Traceback" not in proc.stdout
    records = read_jsonl(out / "metrics.jsonl")
    [event] = [r for r in records if r.get("event") == "nonfinite_loss"]
    expected_lr = resolve(parse_args(args), 1, cuda=False).lr_at(7)
    assert (event["iter"], event["action"], event["micro_batches"]) == (7, "stop", 1)
    assert event["lr"] == pytest.approx(expected_lr, rel=1e-12)
    assert tags(out) == [5] and (out / "latest").read_text() == "global_step5"
    assert all(p.stat().st_mtime <= event["time"] for p in (out / "global_step5").iterdir())  # untouched since
    stopped = losses(out)
    assert sorted(stopped) == list(range(7))

    single(*args, "--init_from", "resume", "--max_iters", "9")
    resumed = losses(out)
    assert [resumed[i] for i in (5, 6)] == [stopped[i] for i in (5, 6)]
    assert sorted(resumed) == list(range(9))


def test_nan_loss_skip_leaves_the_weights_unchanged_and_runs_to_the_end(data_dir, tmp_path):
    """--on_nan skip: iteration 7's NaN drops its step; the weights after it equal those before it."""
    out = tmp_path / "run"
    single(*one_rank_args(data_dir, out), "--max_iters", "10", "--checkpoint_interval", "1", "--keep_last", "100",
           "--on_nan", "skip", nan_at={8})
    [event] = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "nonfinite_loss"]
    assert (event["iter"], event["action"]) == (7, "skip")
    logged = losses(out)
    assert sorted(logged) == list(range(10)) and logged[7] is None  # no finite loss to report
    assert tags(out) == list(range(1, 11)) and (out / "latest").read_text() == "global_step10"
    assert_same_weights(weights(out, 7), weights(out, 8))
    changed = weights(out, 9)
    assert not torch.equal(changed["transformer.wte.weight"], weights(out, 8)["transformer.wte.weight"])


def test_nan_skip_stops_when_whole_batches_stay_non_finite(data_dir, tmp_path):
    """Two whole global batches in a row non-finite: the weights went bad, skipping cannot help: exit 3."""
    out = tmp_path / "run"
    # one training forward per iteration: forward 8 is iteration 7's, forward 9 iteration 8's
    single(*one_rank_args(data_dir, out), "--max_iters", "12", "--checkpoint_interval", "5", "--on_nan", "skip",
           nan_at={8, 9}, expect=3)
    events = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "nonfinite_loss"]
    assert [(e["iter"], e["action"]) for e in events] == [(7, "skip"), (8, "stop")]
    assert (out / "latest").read_text() == "global_step5"


# --- 5. SIGINT once, and twice -------------------------------------------------------------

def _sigint_run(data_dir: Path, out: Path, presses: int) -> tuple[int, str]:
    """A run with slow steps, interrupted `presses` times right after a step has started."""
    args = ["--data_dir", str(data_dir), "--out_dir", str(out), *MODEL, "--micro_batch_size", "256",
            "--gradient_accumulation_steps", "1", "--max_iters", "100000", "--checkpoint_interval", "2",
            "--eval_interval", "100000", "--eval_iters", "1"]
    with forked_background_train(1, *args, log_dir=out.with_name(out.name + ".logs")) as ranks:
        wait_for(lambda: complete(out, 2), ranks, "checkpoint 2")
        logged = train_losses_logged(out)
        wait_for(lambda: train_losses_logged(out) > logged, ranks, "the next step")
        ranks.signal(signal.SIGINT)
        if presses == 2:
            wait_for(lambda: "SIGINT received" in ranks.output(), ranks, "the first SIGINT's notice")
            ranks.signal(signal.SIGINT)
        ranks.wait(timeout=120)
    return ranks.returncode, ranks.output()


def test_one_sigint_checkpoints_and_exits_75(data_dir, tmp_path):
    code, stderr = _sigint_run(data_dir, tmp_path, presses=1)
    assert code == 75, stderr[-3000:]
    tag = (tmp_path / "latest").read_text()
    stopped_at = int(tag.removeprefix("global_step"))
    assert complete(tmp_path, stopped_at) and stopped_at == max(losses(tmp_path)) + 1 and stopped_at > 2


def test_a_second_sigint_exits_at_once_without_a_checkpoint(data_dir, tmp_path):
    code, stderr = _sigint_run(data_dir, tmp_path, presses=2)
    assert code == 130, stderr[-3000:]
    assert "second SIGINT" in stderr
    assert [n for n in tags(tmp_path) if complete(tmp_path, n)] == [2]  # nothing saved after the interrupt
    assert (tmp_path / "latest").read_text() == "global_step2"


# --- 6. another world size or ZeRO stage ---------------------------------------------------

@pytest.fixture(scope="module")
def zero1_two_ranks(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("zero1_w2")
    forked_train(2, *two_rank_args(data_dir, out), "--max_iters", "10", log_dir=out.with_name("zero1_w2.logs"))
    assert (out / "latest").read_text() == "global_step10"
    return out



def test_weights_from_two_rank_zero1_start_a_one_rank_zero3_run(zero1_two_ranks, data_dir, tmp_path):
    """--init_from weights:OUT: consolidated fp32 weights, fresh optimizer, any world size and stage.

    With lr 0 the new run's first step leaves the weights as loaded, so its checkpoint must
    hold exactly the source's weights, now written as ZeRO-3 shards by one rank.
    """
    out = tmp_path / "new"
    single("--deepspeed_config", "ds_configs/zero3.json", "--init_from", f"weights:{zero1_two_ranks}",
           *one_rank_args(data_dir, out), "--gradient_accumulation_steps", "2", "--learning_rate", "0",
           "--decay_lr", "False", "--max_iters", "1", "--checkpoint_interval", "1", "--eval_interval", "1")
    marker = json.loads((out / "global_step1" / "ds_gpt_complete.json").read_text())
    assert (marker["world_size"], marker["zero_stage"]) == (1, 3)
    assert_same_weights(weights(out, 1), weights(zero1_two_ranks, 10))
    # The same 8 eval windows (4 per batch either way) give the same val loss before any step.
    source_eval = [r for r in read_jsonl(zero1_two_ranks / "metrics.jsonl") if "val_loss" in r][-1]
    first_eval = [r for r in read_jsonl(out / "metrics.jsonl") if "val_loss" in r][0]
    assert first_eval["iter"] == 0 and first_eval["val_loss"] == pytest.approx(source_eval["val_loss"], rel=1e-5)


# --- 7. a dead or stalled rank -------------------------------------------------------------

def _peer_failure(data_dir: Path, out: Path, sig: int, pg_timeout: int) -> tuple[int, str, float]:
    """Two ranks started the way srun starts them (env:// variables, no launcher to stop the other
    rank when one dies); `sig` to rank 1. Rank 0's exit code, its output, and how long it took."""
    args = [*two_rank_args(data_dir, out), "--max_iters", "100000", "--checkpoint_interval", "100000",
            "--eval_interval", "100000", "--pg_timeout", str(pg_timeout)]
    with forked_background_train(2, *args, log_dir=out.with_name(out.name + ".logs")) as ranks:
        wait_for(lambda: train_losses_logged(out) >= 3, ranks, "three logged iterations")
        ranks.signal(sig, rank=1)
        t0 = time.time()
        rank0 = ranks.procs[0]
        rank0.join(timeout=pg_timeout + 90)
        elapsed = time.time() - t0
        return rank0.exitcode, ranks.logs[0].read_text(), elapsed


@pytest.mark.parametrize("sig, pg_timeout", [(signal.SIGKILL, 30), (signal.SIGSTOP, 6)], ids=["killed", "stopped"])
def test_a_dead_or_stalled_rank_makes_the_others_exit_4(data_dir, tmp_path, sig, pg_timeout):
    code, stderr, elapsed = _peer_failure(data_dir, tmp_path, sig, pg_timeout)
    assert code == 4, stderr[-3000:]
    lines = error_lines(stderr)
    assert len(lines) == 1 and "rank 0: a peer rank failed or a collective timed out" in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr
    # A stalled rank is noticed by the clock alone. A dead one is noticed at once when gloo sees
    # its connection close; a send already waiting on it when it died waits out the timeout.
    if sig == signal.SIGKILL and "Timed out waiting" not in lines[0]:
        assert elapsed < pg_timeout - 2, elapsed
    else:
        assert pg_timeout - 2 <= elapsed <= pg_timeout + 30, elapsed
