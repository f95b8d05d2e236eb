"""A disk that fills between checkpoints: one error line, exit 2, the checkpoint and metrics.jsonl intact."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from helpers import forked_background_train, forked_train, write_token_bins

from ds_gpt.checkpoint import find_latest


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs: room for the run and its first checkpoint, and little else."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path) -> None:
    """Take every free byte, as another job writing to the same scratch space would."""
    with open(mnt / "filler", "wb", buffering=0) as fh:
        for chunk in (1 << 20, 4096, 1):  # down to the last byte
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError:
                pass


@pytest.mark.slow
def test_a_disk_that_fills_between_checkpoints_ends_the_run_cleanly(tmp_path, small_disk):
    """metrics.jsonl and TensorBoard both write every iteration; whichever meets the full disk first ends the run."""
    out = small_disk / "run"
    ds_config = "ds_configs/zero1.json"
    args = ["--deepspeed_config", ds_config, "--data_dir",
            str(write_token_bins(tmp_path / "data")), "--out_dir", str(out), "--n_layer", "1", "--n_head", "1",
            "--n_embd", "16", "--block_size", "32", "--vocab_size", "512", "--dtype", "float32", "--compile", "False",
            "--micro_batch_size", "2", "--gradient_accumulation_steps", "1", "--eval_interval", "100000",
            "--eval_iters", "1"]
    logs = tmp_path / "logs"  # off the small disk
    forked_train(1, *args, "--max_iters", "3", log_dir=logs / "first")
    # Resumed with no checkpoint due for a long while: only metrics and TensorBoard write now.
    with forked_background_train(1, *args, "--init_from", "resume", "--max_iters", "100000",
                                 "--checkpoint_interval", "100000", log_dir=logs / "resumed") as run:
        deadline = time.time() + 240
        while sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line) < 5:
            assert run.poll() is None and time.time() < deadline, run.output()
            time.sleep(0.05)
        fill(small_disk)
        run.wait(timeout=240)
    output = run.output()
    assert run.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("ds_gpt.train: error: "), output[-3000:]
    assert "No space left on device" in errors[0]
    for line in (out / "metrics.jsonl").read_text().splitlines():  # every line whole
        json.loads(line)
    (small_disk / "filler").unlink()
    assert find_latest(out).iter_num == 3  # the last complete checkpoint verifies


def test_a_metrics_line_that_cannot_be_written_is_one_user_error(tmp_path):
    from ds_gpt.errors import UserError
    from ds_gpt.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    logger = MetricsLogger(tmp_path, enabled=True)
    with pytest.raises(UserError, match="cannot write .*metrics.jsonl: No space left on device"):
        logger.log({"iter": 0, "loss": 1.0})
    logger.close()
