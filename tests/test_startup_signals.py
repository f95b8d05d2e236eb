"""A signal at any moment of start-up: every rank stops before the first step with exit 75,
saves nothing (the previous checkpoint stands) and releases the run lock.

The signal comes from inside the rank, at a chosen moment: a prelude (helpers.forked_train)
wraps one start-up step so that the rank signals itself when that step begins, as SLURM would
mid-step; the step itself runs unchanged. Forked ranks: the launcher is not under test here.
"""
from __future__ import annotations

import functools
import importlib
import os
import shutil
import signal
from pathlib import Path

import pytest
from helpers import TINY, forked_train, read_jsonl, write_token_bins

from ds_gpt.run_lock import LOCK_FILE

pytestmark = pytest.mark.slow


def signal_during(module: str, name: str, sig: int, rank: str | None = None, then_fail: bool = False) -> None:
    """From now on, `module.name` sends `sig` to this rank (only to RANK `rank`, if given) as it starts,
    then runs; with `then_fail` it fails instead, as a step whose compiler the signal killed."""
    mod = importlib.import_module(module)
    original = getattr(mod, name)

    def step(*args, **kwargs):
        if rank is None or os.environ.get("RANK") == rank:
            os.kill(os.getpid(), sig)
            if then_fail:
                raise RuntimeError("Error building extension 'deepspeed_shm_comm': c++ was killed by signal 15")
        return original(*args, **kwargs)

    setattr(mod, name, step)


def run(out: Path, data: Path, nproc: int, prelude=None, expect: int = 0) -> str:
    args = ["--deepspeed_config", "ds_configs/zero1.json", "--data_dir", str(data), "--out_dir", str(out), *TINY,
            "--max_iters", "2", "--checkpoint_interval", "2", "--init_from", "auto"]
    return forked_train(nproc, *args, log_dir=out.with_name(out.name + ".logs"), prelude=prelude, expect=expect).stdout


def assert_stopped_before_the_first_step(out: Path, output: str, tags: list[str]) -> None:
    assert "stopped before the first step" in output and "Traceback" not in output, output[-3000:]
    assert not (out / LOCK_FILE).exists()
    assert sorted(p.name for p in out.glob("global_step*")) == tags  # nothing new saved
    train_lines = [e for e in read_jsonl(out / "metrics.jsonl") if "loss" in e and "event" not in e] \
        if (out / "metrics.jsonl").exists() else []
    assert [e["iter"] for e in train_lines] == ([0, 1] if tags else [])


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> tuple[Path, Path]:
    """(data, out): one rank trained 2 iterations and saved global_step2."""
    where = tmp_path_factory.mktemp("checkpointed")
    data, out = write_token_bins(where / "data"), where / "out"
    run(out, data, 1)
    assert (out / "latest").read_text() == "global_step2"
    return data, out


def test_sigterm_to_one_rank_while_the_engine_builds_stops_every_rank(tmp_path):
    out = tmp_path / "out"
    output = run(out, write_token_bins(tmp_path / "data"), 2, expect=75,
                 prelude=functools.partial(signal_during, "ds_gpt.engine", "build_engine", signal.SIGTERM, rank="1"))
    assert "SIGTERM received: stopping once start-up is done" in output
    assert_stopped_before_the_first_step(out, output, tags=[])


def test_sigusr1_while_a_checkpoint_loads_leaves_it_the_newest(checkpointed, tmp_path):
    data, first = checkpointed
    out = tmp_path / "out"
    shutil.copytree(first, out)
    output = run(out, data, 1, expect=75,
                 prelude=functools.partial(signal_during, "ds_gpt.train", "load", signal.SIGUSR1))
    assert_stopped_before_the_first_step(out, output, tags=["global_step2"])
    assert (out / "latest").read_text() == "global_step2"


def test_a_start_up_step_that_the_signal_broke_ends_in_75_too(tmp_path):
    """SIGTERM to the job's processes also kills a rank's compiler: the op build fails, the rank exits 75."""
    out = tmp_path / "out"
    output = run(out, write_token_bins(tmp_path / "data"), 1, expect=75,
                 prelude=functools.partial(signal_during, "ds_gpt.engine", "init_distributed", signal.SIGTERM,
                                           then_fail=True))
    assert "SIGTERM during start-up, which then failed (RuntimeError: Error building extension" in output
    assert "Traceback" not in output and not (out / LOCK_FILE).exists()
    assert not list(out.glob("global_step*")) and not (out / "metrics.jsonl").exists()
