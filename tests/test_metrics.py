"""metrics.jsonl: one JSON object per line, also across a restart after a line was cut short."""
from __future__ import annotations

import errno
import json

import pytest

from ds_gpt.errors import UserError, write_hint
from ds_gpt.metrics import MetricsLogger


def test_a_resumed_run_does_not_glue_its_first_event_to_a_cut_line(tmp_path):
    first = MetricsLogger(tmp_path, enabled=True)
    first.log({"iter": 7, "loss": 3.5})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"time": 1, "iter": 8, "lo')  # the run died mid-line
    resumed = MetricsLogger(tmp_path, enabled=True)
    resumed.log({"event": "start", "iter": 8, "resumed_from": "global_step8"})
    resumed.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and lines[1] == '{"time": 1, "iter": 8, "lo'
    assert json.loads(lines[2])["resumed_from"] == "global_step8"


def test_values_json_cannot_hold_are_written_as_null(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log({"iter": 0, "loss": float("nan"), "lr": float("inf"), "mfu": 0.25})
    logger.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert (record["loss"], record["lr"], record["mfu"]) == (None, None, 0.25)


def test_only_the_writing_rank_touches_the_file(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=False)
    logger.log({"iter": 0, "loss": 1.0})
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_directory_where_metrics_jsonl_belongs_is_not_a_full_disk(tmp_path):
    """EISDIR names the directory in the way; only a full disk or quota asks for free space."""
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(UserError) as err:
        MetricsLogger(tmp_path, True)
    assert err.value.hint == f"{tmp_path / 'metrics.jsonl'} is a directory where a file belongs: move it away, " \
                             "or pick another --out_dir"
    assert write_hint(OSError(errno.ENOSPC, "No space left on device"), "free space") == "free space"
    assert write_hint(RuntimeError("unexpected pos 64"), "free space") == "free space"  # torch's zip writer


def test_the_run_directory_docs_name_every_scalar_and_event():
    """docs/training.md's TensorBoard list and metrics.jsonl table keep up with what the code writes."""
    import re

    from helpers import REPO_ROOT

    from ds_gpt.metrics import TB_TAGS

    docs = (REPO_ROOT / "docs" / "training.md").read_text()
    tb_row = next(line for line in docs.splitlines() if line.startswith("| `OUT/tb/train/`"))
    assert [tag for tag in TB_TAGS.values() if f"`{tag}`" not in tb_row] == []
    source = "".join(p.read_text() for p in (REPO_ROOT / "ds_gpt").glob("*.py"))
    events = set(re.findall(r'"event": "([a-z_]+)"', source))
    assert {"memory", "start", "stopped"} <= events
    assert sorted(e for e in events if f'`"event": "{e}"`' not in docs) == []
    training_row = next(line for line in docs.splitlines() if line.startswith("| training |"))
    assert "`hfu`" in training_row and "`mfu`" in training_row


def test_a_tensorboard_thread_write_error_is_left_to_the_main_thread(tmp_path, monkeypatch, capsys):
    """Its OSError comes back in the main thread as the run's one error line: the thread prints nothing.
    Other threads' errors still print."""
    import threading

    from ds_gpt import metrics

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    metrics._leave_tensorboard_write_errors_to_the_main_thread()

    def failing_thread(module: str) -> None:
        cls = type("Writer", (threading.Thread,), {"__module__": module,
                                                   "run": lambda self: (_ for _ in ()).throw(OSError(28, "full"))})
        thread = cls()
        thread.start()
        thread.join()

    failing_thread("tensorboard.summary.writer.event_file_writer")
    assert capsys.readouterr().err == ""
    failing_thread("somewhere.else")
    assert "OSError: [Errno 28] full" in capsys.readouterr().err
