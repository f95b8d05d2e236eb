"""The report against GPT-2 124M (ds_gpt.yardsticks): which lines, and where a run first reached each."""
from __future__ import annotations

import json
from pathlib import Path

from ds_gpt import report, yardsticks


def write_lines(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def owt_run(tmp_path: Path) -> Path:
    """An OpenWebText run with evals and HellaSwag at 0, 1000, 2000, 3000 (491,520 tokens/iter), its
    checkpoint of 2000 scored again by --eval_only, and an --eval_only of GPT-2 under it."""
    data = tmp_path / "data" / "owt"
    write_lines(data / "meta.json", [{"dataset": "openwebtext"}])
    out = tmp_path / "run"
    per_iter = 491_520
    losses = {0: 10.9, 1000: 3.4, 2000: 3.05, 3000: 2.84}
    hs = {0: (0.25, 0.24), 1000: (0.27, 0.28), 2000: (0.29, 0.30), 3000: (0.30, 0.3120)}
    records = [{"event": "start", "iter": 0, "init_from": "scratch"}]
    for it in losses:
        records += [{"iter": it, "loss": losses[it], "lr": 6e-4, "tokens": it * per_iter, "dt_ms": 100.0},
                    {"iter": it, "train_loss": losses[it], "val_loss": losses[it], "tokens": it * per_iter},
                    {"event": "hellaswag", "iter": it, "tokens": it * per_iter, "items": 10042,
                     "acc": hs[it][0], "acc_norm": hs[it][1]}]
    records.append({"event": "hellaswag", "iter": 2000, "tokens": 2000 * per_iter, "items": 10042, "acc": 0.2,
                    "acc_norm": 0.2, "eval_only": True, "init_from": "resume"})  # the run's own checkpoint
    # scored again by --eval_only --init_from resume, a little worse: a point of the curve, and the later line wins
    write_lines(out / "metrics.jsonl", records)
    (out / "config.json").write_text(json.dumps({"train": {"data_dir": str(data)}}))
    write_lines(out / "gpt2-eval" / "metrics.jsonl", [
        {"iter": 0, "train_loss": 3.11, "val_loss": 3.121, "tokens": 0},
        {"event": "hellaswag", "iter": 0, "tokens": 0, "items": 10042, "acc": 0.2891, "acc_norm": 0.3115,
         "eval_only": True, "init_from": "gpt2"}])
    return out


def test_first_iteration_and_tokens_at_each_yardstick(tmp_path):
    out = owt_run(tmp_path)
    report.write_report(out)
    md = (out / "report.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert rows["val loss: GPT-2 124M on OWT (nanoGPT)"].endswith("| 3.12 | 2.8400 | iter 2,000, 983,040,000 tokens |")
    assert rows["val loss: nanoGPT's 124M run (~2.85)"].endswith("| 2.85 | 2.8400 | iter 3,000, 1,474,560,000 tokens |")
    assert rows["val loss: gpt2, measured"].endswith("| 3.12 | 2.8400 | iter 2,000, 983,040,000 tokens |")
    # HellaSwag: acc 0.29 at 2000 was replaced by the resume's 0.2, so acc 0.2892 is first reached at 3000
    assert rows["HellaSwag acc: GPT-2 124M, harness (published)"].endswith("| 0.2892 | 0.3000 | iter 3,000, "
                                                                           "1,474,560,000 tokens |")
    assert rows["HellaSwag acc_norm: GPT-2 124M, harness (published)"].endswith("| 0.3114 | 0.3120 | iter 3,000, "
                                                                                "1,474,560,000 tokens |")
    assert rows["HellaSwag acc_norm: gpt2, measured"].endswith("| 0.3115 | 0.3120 | iter 3,000, 1,474,560,000 tokens |")
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_owt_lines_only_for_an_owt_run_and_no_hellaswag_said_so(tmp_path):
    out = tmp_path / "run"
    write_lines(out / "metrics.jsonl", [{"iter": 0, "loss": 5.0, "lr": 1e-3, "tokens": 0, "dt_ms": 1.0},
                                        {"iter": 0, "train_loss": 5.0, "val_loss": 5.0, "tokens": 0}])
    (out / "config.json").write_text(json.dumps({"train": {"data_dir": str(tmp_path / "shakespeare")}}))
    assert [y.metric for y in yardsticks.for_run(out, json.loads((out / "config.json").read_text()))] == [
        "acc", "acc_norm"]
    report.write_report(out)
    md = (out / "report.md").read_text()
    assert "OWT" not in md and "No HellaSwag scores in this run" in md and "| n/a | not yet |" in md
