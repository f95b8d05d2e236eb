"""--wandb_log offline: the same scalars as metrics.jsonl, one W&B run across a resume, no secret written."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from helpers import forked_train, read_jsonl, write_token_bins

pytest.importorskip("wandb", reason="the wandb extra (make setup EXTRAS=wandb)")
SECRET = "sekrit-api-key-0123456789abcdef0123456789"


def wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: a ':W&B' header, then LevelDB's log format (32 KiB blocks of
    checksum, length, type, data). wandb ships no reader of its own files any more."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            records.append(pending)
            pending = b""
    return records


def offline_runs(out: Path) -> list[tuple[str, list[dict]]]:
    """(run id, history rows) of each offline run under OUT/wandb, oldest first."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for run_dir in sorted((out / "wandb").glob("offline-run-*")):
        run_id, rows = None, []
        for raw in wandb_records(next(run_dir.glob("run-*.wandb"))):
            record = pb.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
        runs.append((run_id, rows))
    return runs


@pytest.mark.slow
def test_offline_wandb_run_matches_metrics_and_survives_a_resume(tmp_path):
    from ds_gpt import file_modes
    from ds_gpt.metrics import TB_TAGS

    out = tmp_path / "out"
    env = {**os.environ, "WANDB_API_KEY": SECRET}
    env.pop("WANDB_MODE", None)  # offline is the default: compute nodes have no internet
    args = ["--data_dir", str(write_token_bins(tmp_path / "data")), "--out_dir", str(out),
            "--n_layer", "1", "--n_head", "1", "--n_embd", "16", "--block_size", "32", "--vocab_size", "512",
            "--dtype", "float32", "--compile", "False", "--micro_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--eval_interval", "2", "--eval_iters", "1", "--checkpoint_interval", "2", "--wandb_log", "True"]
    for max_iters, init_from in (("3", "scratch"), ("5", "resume")):  # resumes from 2: iteration 2 logged twice
        forked_train(1, *args, "--max_iters", max_iters, "--init_from", init_from, env=env, log_dir=tmp_path / "logs")

    run_id = (out / "wandb_run_id").read_text().strip()
    runs = offline_runs(out)
    assert [r[0] for r in runs] == [run_id, run_id]  # the resumed job continued the same W&B run
    logged = [{k: v for k, v in row.items() if not k.startswith("_")} for _, rows in runs for row in rows]
    expected = [{**{TB_TAGS[k]: v for k, v in line.items() if k in TB_TAGS}, "iter": line["iter"]}
                for line in read_jsonl(out / "metrics.jsonl") if "event" not in line]
    assert logged == expected and len(expected) >= 8
    leaked = [str(p) for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked
    # W&B's files stay the owner's whatever the umask; the run's own files follow it (docs/training.md)
    assert (out / "wandb").stat().st_mode & 0o777 == 0o700
    assert (out / "wandb_run_id").stat().st_mode & 0o777 == 0o600
    assert (out / "metrics.jsonl").stat().st_mode & 0o777 == 0o666 & ~file_modes.umask()
