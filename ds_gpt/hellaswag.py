"""HellaSwag's validation set, tokenized once as lm-evaluation-harness 0.4.13 tokenizes its `hellaswag` task.

    python -m ds_gpt.prepare --dataset hellaswag                          # the Hub's Rowan/hellaswag (internet once)
    python -m ds_gpt.prepare --dataset hellaswag --data_files hellaswag_val.jsonl   # a local copy

Output in data/hellaswag/ (beside data/openwebtext/, where the trainer looks by default):
    hellaswag_val.npz  numeric arrays only (np.load(allow_pickle=False) reads it; nothing in it runs):
                       the contexts' and the endings' ids with their offsets, each ending's length in
                       characters and each item's label (HellaSwagSet below)
    meta.json          items, tokens, the npz's bytes and sha256, the source, the tokenizer

The text is the harness's: the query is `activity_label: ctx_a Ctx_b`, query and endings go
through its `preprocess`, each ending is scored after one space, whitespace that ends a query
moves to the front of the ending, and the ending's ids are the tail of the ids of query +
ending (not the ids of the ending alone). `preprocess` is copied, not imported, because the
harness is an optional extra; tests/test_eval_harness.py checks the copy against the harness.

Both schemas read: the Hub's (label a string) and the original jsonl's (label an int); a
.parquet copy of the Hub's files works too. The set is published with its meta.json as one unit
(ds_gpt/fileset.py), and a re-run whose source matches meta.json does nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ds_gpt import corpus, fileset
from ds_gpt.errors import UserError, cause_chain, os_error
from ds_gpt.tokenizer import RANKS_SHA256, get_encoding

HUB_DATASET = "Rowan/hellaswag"  # the harness's own dataset_path
HUB_SPLIT = "validation"
VALIDATION_ITEMS = 10042
SET_FILE = "hellaswag_val.npz"
META_FILE = "meta.json"
FORMAT = 1  # bump when the bytes written for the same inputs change
FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # load_dataset's builder per suffix
PREPARE_HINT = "python -m ds_gpt.prepare --dataset hellaswag (or --data_files FILE.jsonl for a local copy)"


# -----------------------------------------------------------------------------
# the harness's text (lm_eval/tasks/hellaswag/utils.py) and tokenization (lm_eval/api/model.py)

def preprocess(text: str) -> str:
    """The harness's clean-up; the brackets are artifacts of HellaSwag's WikiHow half."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def query_and_choices(doc: dict) -> tuple[str, list[str]]:
    """The harness's doc_to_text and doc_to_choice for one item."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return preprocess(doc["activity_label"] + ": " + ctx), [preprocess(e) for e in doc["endings"]]


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's `_encode_pair` for a causal model: trailing whitespace of the context moves to
    the continuation, and the continuation's ids are the tail of the whole string's ids."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids):]


# -----------------------------------------------------------------------------
# the tokenized set

ARRAYS = ("contexts", "context_at", "endings", "ending_at", "ending_chars", "label")


@dataclass
class HellaSwagSet:
    contexts: np.ndarray  # uint16: every item's context ids, one after another
    context_at: np.ndarray  # int64 [items + 1]: item i's context is contexts[context_at[i]:context_at[i + 1]]
    endings: np.ndarray  # uint16: every ending's ids, four per item
    ending_at: np.ndarray  # int64 [4 * items + 1]: ending k of item i starts at ending_at[4 * i + k]
    ending_chars: np.ndarray  # int32 [items, 4]: each ending's length in characters, acc_norm's divisor
    label: np.ndarray  # int8 [items]: the right ending

    def __len__(self) -> int:
        return len(self.label)

    def rows(self, item: int) -> list[tuple[np.ndarray, int]]:
        """The item's four scored sequences: (context + ending ids, the ending's length in ids)."""
        context = self.contexts[self.context_at[item]:self.context_at[item + 1]]
        return [(np.concatenate([context, ending]), len(ending))
                for ending in (self.endings[self.ending_at[k]:self.ending_at[k + 1]]
                               for k in range(4 * item, 4 * item + 4))]


def tokenize(docs, encode=None) -> HellaSwagSet:
    """Items in either schema (mappings with FIELDS) -> the set, with the harness's ids."""
    encode = encode or get_encoding().encode_ordinary
    contexts: list[int] = []
    endings: list[int] = []
    context_at, ending_at, chars, labels = [0], [0], [], []
    for n, doc in enumerate(docs):
        missing = [f for f in FIELDS if doc.get(f) is None]
        if missing:
            raise UserError(f"HellaSwag item {n} has no {', '.join(missing)}",
                            hint=f"items need {', '.join(FIELDS)} (the Hub's or the original jsonl's schema)")
        query, choices = query_and_choices(doc)
        try:
            label = int(doc["label"])  # a string in the Hub's schema, an int in the original jsonl
        except ValueError:
            label = -1
        if len(choices) != 4 or not 0 <= label < 4:
            raise UserError(f"HellaSwag item {n} has {len(choices)} endings and label {doc['label']!r}",
                            hint="each item has 4 endings and a label 0-3")
        for choice in choices:
            context_ids, ending_ids = encode_pair(encode, query, " " + choice)  # " ": the harness's target delimiter
            endings += ending_ids
            ending_at.append(len(endings))
        contexts += context_ids  # the same for every ending: it is the query's ids alone
        context_at.append(len(contexts))
        chars.append([len(c) for c in choices])
        labels.append(label)
    if not labels:
        raise UserError("the HellaSwag source holds no items", hint=PREPARE_HINT)
    return HellaSwagSet(np.asarray(contexts, dtype=np.uint16), np.asarray(context_at, dtype=np.int64),
                        np.asarray(endings, dtype=np.uint16), np.asarray(ending_at, dtype=np.int64),
                        np.asarray(chars, dtype=np.int32).reshape(-1, 4), np.asarray(labels, dtype=np.int8))


# -----------------------------------------------------------------------------
# the source: the Hub's validation split, or local files in either schema

def source_of(data_files: list[str] | None) -> dict:
    """What meta.json records of the source, and what a no-op re-run compares."""
    if not data_files:
        return {"hub": HUB_DATASET, "split": HUB_SPLIT}
    return {"files": [{"path": f, **fileset.file_digest(Path(f))} for f in data_files]}


def local_files(patterns: list[str]) -> tuple[list[str], str]:
    """--data_files: every glob must match files, all .jsonl/.json or all .parquet. Returns the
    files and their load_dataset builder."""
    files, builder = corpus.local_files(patterns, "--data_files", BUILDERS)
    return list(files), builder


def load_items(data_files: list[str] | None, builder: str | None = None, cache_dir: str | None = None):
    """The items as a datasets.Dataset: the Hub's split, or the local files (read by `builder`,
    from local_files) through the same loader."""
    import datasets

    try:
        if data_files:
            return datasets.load_dataset(builder, data_files=data_files, split="train", cache_dir=cache_dir)
        return datasets.load_dataset(HUB_DATASET, split=HUB_SPLIT, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - connection, Hub and parse errors all mean "this source cannot be read"
        chain = cause_chain(err)
        if (os_err := next((e for e in chain if isinstance(e, OSError) and e.filename), None)) is not None:
            raise os_error(os_err) from None  # a read-only or full cache dir, an unreadable file
        cause = chain[-1]
        first_line = str(cause).splitlines()[0] if str(cause) else ""
        if data_files:
            raise UserError(f"could not read --data_files {', '.join(data_files)}: {type(cause).__name__}: "
                            f"{first_line}", hint="one item per record, with " + ", ".join(FIELDS)) from None
        raise UserError(f"could not load {HUB_DATASET} from the Hugging Face Hub: {type(cause).__name__}: {first_line}",
                        hint="run prepare once where the Hub is reachable, or pass a local copy with --data_files "
                             "FILE.jsonl") from None


# -----------------------------------------------------------------------------
# publishing and reading the set

def wanted_meta(source: dict) -> dict:
    """The meta.json fields that decide whether a re-run has anything to do."""
    return {"format": FORMAT, "dataset": "hellaswag", "tokenizer": "gpt2", "tokenizer_sha256": RANKS_SHA256,
            "source": source}


def up_to_date(out_dir: Path, wanted: dict) -> bool:
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
        return (not fileset.pending(out_dir) and all(meta.get(k) == v for k, v in wanted.items())
                and fileset.file_digest(out_dir / SET_FILE) == {"bytes": meta["bytes"], "sha256": meta["sha256"]})
    except (OSError, ValueError, KeyError, TypeError):
        return False


def publish(out_dir: Path, hs: HellaSwagSet, wanted: dict) -> dict:
    """Write the set and its meta.json under hidden names, then publish both as one unit. Returns the meta."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **{name: getattr(hs, name) for name in ARRAYS})
    data = buffer.getvalue()
    meta = {**wanted, "items": len(hs), "tokens": int(len(hs.contexts) + len(hs.endings)), "file": SET_FILE,
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    contents = {SET_FILE: data, META_FILE: fileset.meta_json(meta)}
    staged = {name: fileset.staged_path(out_dir, name) for name in contents}
    with fileset.writing(out_dir):
        try:
            expected = {name: fileset.write_synced(staged[name], body) for name, body in contents.items()}
            fileset.publish(out_dir, staged, expected)
        finally:
            if not fileset.pending(out_dir):  # once committed, the staged files are the set: keep them
                for path in staged.values():
                    path.unlink(missing_ok=True)
    return meta


def prepare(out_dir: Path, data_files: list[str] | None = None, cache_dir: str | None = None) -> dict | None:
    """`prepare --dataset hellaswag`: the set in out_dir; None when it was already up to date."""
    files, builder = local_files(data_files) if data_files else (None, None)
    get_encoding()  # no ranks: fail now, not after the download
    wanted = wanted_meta(source_of(files))
    if up_to_date(out_dir, wanted):
        print(f"{out_dir}: up to date (meta.json matches the source); nothing to do")
        return None
    items = load_items(files, builder, cache_dir)
    try:
        meta = publish(out_dir, tokenize(items), wanted)
    except OSError as err:  # the previous set is intact
        raise os_error(err, doing=f"writing --out_dir {out_dir} failed") from None
    note = "" if files or meta["items"] == VALIDATION_ITEMS else f" (the validation split has {VALIDATION_ITEMS:,})"
    print(f"wrote {out_dir / SET_FILE}: {meta['items']:,} items{note}, {meta['tokens']:,} tokens")
    return meta


def exists(root: str | os.PathLike) -> bool:
    """Does `root` hold a published set (or one a killed prepare committed)?"""
    root = Path(root)
    return (root / META_FILE).is_file() or fileset.pending(root)


def load(root: str | os.PathLike) -> HellaSwagSet:
    """The set in `root`, checked against its meta.json's sha256; a UserError naming the fix otherwise."""
    root = Path(root)
    fileset.recover(root, hint=f"{PREPARE_HINT} --out_dir {root}")
    try:
        meta = json.loads((root / META_FILE).read_text())
        if meta.get("dataset") != "hellaswag" or meta.get("format") != FORMAT:
            raise ValueError("not a HellaSwag set of this format")
        if fileset.file_digest(root / SET_FILE) != {"bytes": meta["bytes"], "sha256": meta["sha256"]}:
            raise ValueError(f"{SET_FILE} does not match the sha256 in {META_FILE}")
        with np.load(root / SET_FILE, allow_pickle=False) as npz:
            hs = HellaSwagSet(**{name: npz[name] for name in ARRAYS})
        if not (len(hs.context_at) == len(hs) + 1 and len(hs.ending_at) == 4 * len(hs) + 1 == 4 * len(hs.ending_chars)
                + 1 and hs.context_at[-1] == len(hs.contexts) and hs.ending_at[-1] == len(hs.endings)):
            raise ValueError("its arrays do not fit together")
    except FileNotFoundError as err:
        raise UserError(f"no HellaSwag set in {root} ({Path(err.filename).name} is missing)",
                        hint=f"{PREPARE_HINT} --out_dir {root}") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"the HellaSwag set in {root} is damaged or stale: {err}",
                        hint=f"{PREPARE_HINT} --out_dir {root}") from None
    return hs
