"""A HINT that suggests flags, followed literally, leads to a command that runs.

Each case makes a command refuse its input, takes the flags out of its HINT exactly as printed
(`flags_in`), adds them to the same command line, and checks that the command then runs. Trainer
cases run their ranks forked (tests/helpers.py); the other commands run their main() in-process.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, forked_train, read_jsonl, write_token_bins

from ds_gpt.errors import UserError

WORDS_AFTER_A_FLAG = {"to", "or", "and", "for", "if", "when", "with", "then", "that"}


def hint_of(text: str) -> str:
    match = re.search(r"\(HINT: (.*)\)\s*$", text.strip().splitlines()[-1])
    assert match, f"no HINT on the error line: {text.strip().splitlines()[-1]}"
    return match.group(1)


def flags_in(hint: str) -> list[str]:
    """The first run of `--flag [value]` words in a hint, as a user would copy them."""
    words = hint.replace(",", " ").split()
    start = next(i for i, w in enumerate(words) if w.startswith("--"))
    flags: list[str] = []
    for word in words[start:]:
        if word.startswith("--"):
            flags.append(word)
        elif flags and flags[-1].startswith("--") and word not in WORDS_AFTER_A_FLAG and not word.startswith("("):
            flags.append(word)
        else:
            break
    return flags


def test_flags_in_reads_the_first_suggestion():
    assert flags_in("pass --micro_batch_size 2 --gradient_accumulation_steps 2 --global_batch_size 4 to keep it, "
                    "or --allow_batch_change") == ["--micro_batch_size", "2", "--gradient_accumulation_steps", "2",
                                                   "--global_batch_size", "4"]
    assert flags_in("continue it with --init_from resume (or auto), or pass a new --out_dir") == [
        "--init_from", "resume"]
    assert flags_in("pick a new --dest, or add --force to replace it") == ["--dest"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[list[str], Path]:
    """A finished 2-rank run (micro 2, no accumulation: a global batch of 4) and its options."""
    tmp = tmp_path_factory.mktemp("hints")
    args = ["--deepspeed_config", "ds_configs/zero1.json", "--data_dir", str(write_token_bins(tmp / "data")),
            "--out_dir", str(tmp / "out"), *TINY, "--max_iters", "4", "--checkpoint_interval", "4",
            "--gradient_accumulation_steps", "1"]
    forked_train(2, *args, log_dir=tmp / "first")
    return args, tmp


def own_copy(two_rank_run, tmp_path: Path) -> tuple[list[str], Path]:
    """The finished run copied for one test (which trains on), and its options pointing at the copy."""
    args, tmp = two_rank_run
    out = tmp_path / "out"
    shutil.copytree(tmp / "out", out)
    args = list(args)
    args[args.index("--out_dir") + 1] = str(out)
    return args, out


def continued_from_4_to_6(out: Path) -> bool:
    """The last start in metrics.jsonl resumed at iteration 4, and iterations 4 and 5 trained after it."""
    records = read_jsonl(out / "metrics.jsonl")
    last = max(i for i, r in enumerate(records) if r.get("event") == "start")
    trained = {r["iter"] for r in records[last:] if "loss" in r and "event" not in r}
    return records[last]["iter"] == 4 and trained == {4, 5}


def test_batch_change_hint_resumes_on_another_world_size(two_rank_run, tmp_path):
    """One rank cannot keep a global batch of 4 with micro 2 and no accumulation; the HINT's
    flags (all three batch sizes, so no TOML or JSON value contradicts them) can."""
    args, out = own_copy(two_rank_run, tmp_path)
    resume = [*args, "--init_from", "resume", "--max_iters", "6"]
    refused = forked_train(1, *resume, log_dir=tmp_path / "refused", expect=2)
    flags = flags_in(hint_of(refused.stdout))
    assert "--allow_batch_change" not in flags
    forked_train(1, *resume, *flags, log_dir=tmp_path / "followed")
    assert continued_from_4_to_6(out)


def test_new_run_over_checkpoints_hint_continues_the_run(two_rank_run, tmp_path):
    args, out = own_copy(two_rank_run, tmp_path)
    refused = forked_train(2, *args, "--init_from", "scratch", log_dir=tmp_path / "over", expect=2)
    forked_train(2, *args, *flags_in(hint_of(refused.stdout)), "--max_iters", "6", log_dir=tmp_path / "continued")
    assert continued_from_4_to_6(out)


@pytest.mark.slow  # a real trainer start, ~3 s
def test_resume_without_checkpoint_hint_starts_the_run(tmp_path):
    args = ["--deepspeed_config", "ds_configs/zero1.json", "--data_dir", str(write_token_bins(tmp_path / "data")),
            "--out_dir", str(tmp_path / "out"), *TINY, "--max_iters", "2", "--init_from", "resume"]
    refused = forked_train(1, *args, log_dir=tmp_path / "refused", expect=2)
    forked_train(1, *args, *flags_in(hint_of(refused.stdout)), log_dir=tmp_path / "followed")
    assert (tmp_path / "out" / "metrics.jsonl").is_file()


def test_export_and_sample_hints(two_rank_run, tmp_path, capsys):
    from ds_gpt import export, sample
    args, _ = two_rank_run
    out_dir = args[args.index("--out_dir") + 1]
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "old.txt").write_text("x")
    command = ["--out_dir", out_dir, "--format", "fp32", "--dest", str(dest)]
    with pytest.raises(UserError) as refused:
        export.main(command)
    assert flags_in(refused.value.hint) == ["--dest"]  # a new path: nothing literal to copy
    assert "--force" in refused.value.hint
    assert export.main([*command, "--force"]) == 0
    assert (dest / "model.pt").is_file()

    if not torch.cuda.is_available():  # the --device hint is for a machine without CUDA
        command = ["--out_dir", out_dir, "--max_new_tokens", "2", "--device", "cuda"]
        with pytest.raises(UserError) as refused:
            sample.main(command)
        assert sample.main([*command, *flags_in(refused.value.hint)]) == 0
