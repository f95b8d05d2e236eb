"""ds_gpt.tokenizer against the reference run's test vector and tiktoken's own GPT-2 encodings."""
from __future__ import annotations

import os
import shutil
import socket

import numpy as np
import pytest
import tiktoken

from ds_gpt import tokenizer
from ds_gpt.errors import UserError

SEED_IDS = [8585, 262, 1772, 25, 25334, 8120, 17, 43959, 44947, 318]
SEED_TEXT = "About the author: OBACK2KENYA is"
MIXED = [
    "Hello, world! It's 2024; we'll see 1234567 items.",
    "naïve café résumé — “quotes” ‘single’ … Ünïcödé",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🤖🧪 family 👨‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "עברית ومرحبا بالعالم Ελληνικά Русский текст",
    "combining e\u0301 a\u0308, zero\u200bwidth, nbsp\u00a0here",
    "  leading spaces\n\n\ttabs\t\tand\r\nCRLF   trailing   ",
    "code: def f(x):\n    return x**2  # <|endoftext|> is plain text here",
    "",
]


@pytest.fixture(scope="module")
def reference(gpt2_ranks) -> tiktoken.Encoding:
    """tiktoken's own r50k_base (GPT-2's ranks, regex and specials), loaded by tiktoken's code
    from $TIKTOKEN_CACHE_DIR, where `make setup` put the file."""
    assert os.path.samefile(gpt2_ranks.parent, os.environ["TIKTOKEN_CACHE_DIR"])
    return tiktoken.get_encoding("r50k_base")


def test_seed_vector(gpt2_ranks):
    assert tokenizer.decode(SEED_IDS) == SEED_TEXT
    assert tokenizer.encode(SEED_TEXT) == SEED_IDS
    assert tokenizer.decode(np.array(SEED_IDS, dtype=np.uint16)) == SEED_TEXT


def test_constants(gpt2_ranks):
    enc = tokenizer.get_encoding()
    assert (enc.n_vocab, enc.eot_token) == (tokenizer.VOCAB_SIZE, tokenizer.EOT_TOKEN) == (50257, 50256)
    assert enc.name == "gpt2"


def test_same_tokens_as_tiktoken_on_mixed_unicode(reference):
    ours = tokenizer.get_encoding()
    for text in MIXED:
        assert ours.encode_ordinary(text) == reference.encode_ordinary(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    big = "\n".join(MIXED) * 50
    assert ours.encode_ordinary(big) == reference.encode_ordinary(big)


def test_plain_tiktoken_gpt2_loads_offline(gpt2_files, monkeypatch):
    """nanoGPT's `tiktoken.get_encoding("gpt2")` reads the provisioned vocab.bpe and encoder.json
    with the network unreachable, and gives our tokens."""
    def unreachable(*args, **kwargs):
        raise OSError("network unreachable")
    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    assert os.path.samefile(gpt2_files[0].parent, os.environ["TIKTOKEN_CACHE_DIR"])
    gpt2 = tiktoken.get_encoding("gpt2")
    text = "\n".join(MIXED)
    assert tokenizer.encode(text) == gpt2.encode_ordinary(text) and gpt2.decode(SEED_IDS) == SEED_TEXT


def test_encode_documents_is_encode_ordinary_plus_eot(reference):
    docs = MIXED + ["lone surrogate \ud800 survives", "<|endoftext|>"]
    expected = [t for d in docs for t in reference.encode_ordinary(d) + [50256]]
    ids = tokenizer.encode_documents(docs)
    assert ids.dtype == np.uint16
    assert ids.tolist() == expected
    assert tokenizer.encode_documents([]).size == 0


def test_explicit_cache_dir_is_honoured(gpt2_ranks, tmp_path):
    shutil.copy(gpt2_ranks, tmp_path / tokenizer.RANKS_CACHE_KEY)
    enc = tokenizer.get_encoding(tmp_path)
    assert enc.decode(SEED_IDS) == SEED_TEXT


def test_missing_ranks_name_the_setup_command(tmp_path):
    with pytest.raises(UserError, match="not found") as info:
        tokenizer.get_encoding(tmp_path / "empty")
    assert "make setup" in str(info.value)


def test_corrupt_ranks_are_refused(gpt2_ranks, tmp_path):
    (tmp_path / tokenizer.RANKS_CACHE_KEY).write_bytes(gpt2_ranks.read_bytes()[:-10])
    with pytest.raises(UserError, match="corrupt"):
        tokenizer.get_encoding(tmp_path)
