"""ds_gpt.prepare end to end on local files (the same datasets path as OpenWebText), its
output contract, re-runs, and its refusals of bad input."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from datasets import Dataset
from helpers import PYTHON, REPO_ROOT, write_token_bins

from ds_gpt import corpus, fileset, prepare, tokenizer
from ds_gpt.errors import UserError

DOCS = [
    "First document.\nIt has two lines.",
    "Ünïcödé: naïve café — 日本語 and emoji 🤖👍🏽",
    "A document that mentions <|endoftext|> as plain text.",
    "  indented\n\tand tabbed  ",
    "مرحبا بالعالم / Привет мир / Γειά σου",
    "Numbers 1234567890 and contractions: it's, we'll, they've.",
    "short",
    "The last one, with a trailing newline.\n",
]
OUTPUT = {"train.bin", "val.bin", "meta.json", fileset.LOCK_NAME}


@pytest.fixture(scope="module")
def reference(gpt2_ranks) -> tiktoken.Encoding:
    return tiktoken.get_encoding("r50k_base")  # tiktoken's own loader, from $TIKTOKEN_CACHE_DIR


def write_txt(folder: Path, docs: list[str]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return str(folder / "*.txt")


def run(tmp_path: Path, *argv: str) -> dict:
    out = Path(argv[argv.index("--out_dir") + 1])
    prepare.main([*argv, "--cache_dir", str(tmp_path / "hf")])
    return json.loads((out / "meta.json").read_text())


def nanogpt_order(docs: list[str], val_fraction: float, seed: int = 2357) -> tuple[list[str], list[str]]:
    """The documents of each split, in order, as nanoGPT's train_test_split call gives them."""
    split = Dataset.from_dict({"text": docs}).train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return list(split["train"]["text"]), list(split["test"]["text"])


def test_txt_round_trip_through_datasets_with_two_processes(tmp_path, reference):
    out = tmp_path / "out"
    meta = run(tmp_path, "--input", write_txt(tmp_path / "in", DOCS), "--out_dir", str(out),
               "--val_fraction", "0.25", "--num_proc", "2")
    train_docs, val_docs = nanogpt_order(DOCS, 0.25)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    # exact round trip, in split order
    joined = "".join(d + "<|endoftext|>" for d in train_docs + val_docs)
    assert tokenizer.decode(np.concatenate([train, val])) == joined
    assert train.tolist() == [t for d in train_docs for t in reference.encode_ordinary(d) + [50256]]
    assert val.tolist() == [t for d in val_docs for t in reference.encode_ordinary(d) + [50256]]
    # the meta.json contract
    assert set(p.name for p in out.iterdir()) == OUTPUT
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"], meta["eot_token"]) == ("gpt2", 50257, "uint16", 50256)
    assert (meta["seed"], meta["val_fraction"]) == (2357, 0.25)
    assert [s["path"] for s in meta["sources"]] == sorted(str(p) for p in (tmp_path / "in").iterdir())
    for name, ids, docs in (("train", train, train_docs), ("val", val, val_docs)):
        split = meta["splits"][name]
        assert (split["tokens"], split["documents"]) == (len(ids), len(docs)) == (len(ids), int((ids == 50256).sum()))
        assert split["sha256"] == hashlib.sha256((out / f"{name}.bin").read_bytes()).hexdigest()


def test_jsonl_and_parquet_records_give_the_same_bins(tmp_path, reference):
    records = [{"id": i, "body": d} for i, d in enumerate(DOCS)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    a = run(tmp_path, "--input", str(tmp_path / "c.jsonl"), "--text_field", "body",
            "--out_dir", str(tmp_path / "a"), "--val_fraction", "0.2", "--num_proc", "1")
    b = run(tmp_path, "--input", str(tmp_path / "c.parquet"), "--text_field", "body",
            "--out_dir", str(tmp_path / "b"), "--val_fraction", "0.2", "--num_proc", "2")
    assert a["splits"] == b["splits"]
    train_docs, _ = nanogpt_order(DOCS, 0.2)
    expected = [t for d in train_docs for t in reference.encode_ordinary(d) + [50256]]
    assert np.fromfile(tmp_path / "b" / "train.bin", dtype=np.uint16).tolist() == expected


def test_rerun_with_same_inputs_is_a_no_op(tmp_path, capsys):
    pattern, out = write_txt(tmp_path / "in", DOCS), tmp_path / "out"
    argv = ("--input", pattern, "--out_dir", str(out), "--val_fraction", "0.25", "--num_proc", "1")
    first = run(tmp_path, *argv)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert run(tmp_path, *argv) == first
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # a changed input, or a changed option, is not a no-op
    (tmp_path / "in" / "doc000.txt").write_text(DOCS[0] + " More text.")
    changed = run(tmp_path, *argv)
    assert changed["splits"] != first["splits"]
    reseeded = run(tmp_path, *argv[:-2], "--seed", "1", "--num_proc", "1")
    assert reseeded["seed"] == 1 and reseeded["splits"] != changed["splits"]


def test_stale_partial_files_of_a_killed_run_are_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".train.bin.partial-999999").write_bytes(b"\0" * 64)
    run(tmp_path, "--input", write_txt(tmp_path / "in", DOCS), "--out_dir", str(out), "--num_proc", "1")
    assert set(p.name for p in out.iterdir()) == OUTPUT


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, the error's message must match). Each writes its own input files."""
    (tmp / "empty").mkdir()
    (tmp / "empty" / "a.txt").write_text("")
    (tmp / "empty" / "b.txt").write_text("")
    (tmp / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    (tmp / "latin1").mkdir()
    (tmp / "latin1" / "a.txt").write_text("fine")
    (tmp / "latin1" / "b.txt").write_bytes("café".encode("latin-1"))
    (tmp / "latin1.jsonl").write_bytes('{"text": "café"}\n'.encode("latin-1"))
    (tmp / "one.txt").write_text("a single document")
    (tmp / "nofield.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    (tmp / "afile").write_text("not a directory")
    return {
        "missing file": (["--input", str(tmp / "nope.txt")], "no file matches"),
        "empty files": (["--input", str(tmp / "empty" / "*.txt")], "empty"),
        "empty records": (["--input", str(tmp / "blank.jsonl")], "empty"),
        "non-UTF-8 txt": (["--input", str(tmp / "latin1" / "*.txt")], r"b\.txt is not UTF-8 .*offset 3"),
        "non-UTF-8 jsonl": (["--input", str(tmp / "latin1.jsonl")], "latin1.jsonl is not UTF-8"),
        "too small": (["--input", str(tmp / "one.txt")], "cannot be split"),
        "missing field": (["--input", str(tmp / "nofield.jsonl")], "no field 'text'"),
        "unwritable out_dir": (["--input", str(tmp / "one.txt"), "--out_dir", str(tmp / "afile" / "out")],
                               "cannot write"),
    }


@pytest.mark.parametrize("case", ["missing file", "empty files", "empty records", "non-UTF-8 txt",
                                  "non-UTF-8 jsonl", "too small", "missing field", "unwritable out_dir"])
def test_bad_input_is_one_clear_error_and_leaves_nothing(tmp_path, case):
    argv, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "afile" / "out" if "--out_dir" in argv else tmp_path / "out"
    if "--out_dir" not in argv:
        argv += ["--out_dir", str(out)]
    with pytest.raises(UserError, match=message):
        prepare.main([*argv, "--num_proc", "1", "--cache_dir", str(tmp_path / "hf")])
    assert not out.exists()


def test_failed_run_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    good = run(tmp_path, "--input", write_txt(tmp_path / "in", DOCS), "--out_dir", str(out), "--num_proc", "1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(UserError, match="cannot be split"):  # fails inside, after taking out_dir
        run(tmp_path, "--input", str(tmp_path / "one.txt"), "--out_dir", str(out), "--num_proc", "1")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert json.loads(before["meta.json"]) == good


def test_cli_error_is_one_line_with_exit_code_2(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.prepare", "--input", str(tmp_path / "nope.txt"),
                           "--out_dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"ds_gpt.prepare: error: no file matches --input {tmp_path / 'nope.txt'} "
        "(HINT: check the path; quote a glob ('DIR/*.txt'))"]


@pytest.mark.parametrize("n,fraction,seed", [(2, 0.0005, 2357), (42, 0.0005, 2357), (1000, 0.1, 1), (7, 0.5, 3)])
def test_split_is_datasets_train_test_split(n, fraction, seed):
    train, val = corpus.split_indices(n, fraction, seed)
    ref = Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=fraction, seed=seed, shuffle=True)
    assert train.tolist() == list(ref["train"]["i"]) and val.tolist() == list(ref["test"]["i"])


def test_token_writer_appends_and_hashes(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 50257, size=k, dtype=np.uint16) for k in (0, 5, 1, 23, 7, 7, 40)]
    path = tmp_path / "x.bin"
    writer = prepare.TokenWriter(path)
    for c in chunks:
        writer.write(c)
    tokens, sha = writer.close()
    data = np.concatenate(chunks)
    assert tokens == len(data) == path.stat().st_size // 2
    assert np.array_equal(np.fromfile(path, dtype=np.uint16), data)
    assert sha == hashlib.sha256(data.tobytes()).hexdigest()


def test_batches_cover_every_document_once_in_order():
    nbytes = np.array([5, 0, 100, 3, 3, 3, 50, 1, 1, 80])
    idx = np.array([9, 2, 0, 1, 7, 3, 8, 4, 6, 5])
    batches = prepare.make_batches(idx, nbytes, batch_bytes=60, min_batches=3)
    assert len(batches) >= 3 and all(len(b) for b in batches)
    assert np.concatenate(batches).tolist() == idx.tolist()


def test_shakespeare_corpus(shakespeare_data):
    meta = json.loads((shakespeare_data / "meta.json").read_text())
    assert meta["dataset"] == "shakespeare" and meta["sources"][0]["sha256"] == corpus.SHAKESPEARE_SHA256
    splits = meta["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 42
    assert splits["val"]["documents"] == 1  # ceil(42 * 0.0005): nanoGPT's rule
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == 1_566_001
    for name, split in splits.items():
        data = (shakespeare_data / f"{name}.bin").read_bytes()
        assert hashlib.sha256(data).hexdigest() == split["sha256"]


def default_sigint() -> None:
    """Ctrl-C as in a terminal: a suite started in the background (`make test &`, some CI runners)
    passes SIGINT on ignored, and Python leaves an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_interrupted_run_leaves_the_previous_output(tmp_path, gpt2_ranks):
    out = tmp_path / "out"
    run(tmp_path, "--input", write_txt(tmp_path / "small", DOCS), "--out_dir", str(out), "--num_proc", "1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    big = tmp_path / "big"  # ~6 M tokens: seconds of encoding and writing on one process, room to interrupt
    big.mkdir()
    for k in range(4):
        for play in corpus.shakespeare_files():
            shutil.copy(play, big / f"{k}_{play.name}")
    proc = subprocess.Popen([PYTHON, "-m", "ds_gpt.prepare", "--input", str(big / "*.txt"), "--out_dir", str(out),
                             "--num_proc", "1", "--cache_dir", str(tmp_path / "hf")],
                            stderr=subprocess.DEVNULL, cwd=REPO_ROOT, preexec_fn=default_sigint)
    # Writing has started once its staged files exist (watched directly: reading its progress bars
    # from a pipe can fall seconds behind on a loaded machine, and the run may finish first).
    while not list(out.glob(".*.partial-*")) and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --- a full disk, and publishing the three files as one unit -------------------------------

def test_full_filesystem_is_one_error_and_keeps_the_previous_set(tmp_path, mounts, gpt2_ranks):
    """ENOSPC, not SIGBUS: writing through a memmap of a sparse file on a full disk kills the process."""
    disk = mounts.tmpfs(tmp_path / "disk", "256k")
    out = disk / "out"
    run(tmp_path, "--input", write_txt(tmp_path / "small", DOCS), "--out_dir", str(out), "--num_proc", "1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta", "epsilon"], size=250_000)
    big = write_txt(tmp_path / "big", [" ".join(words[i::2]) for i in range(2)])  # ~1.5 MB of text
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.prepare", "--input", big, "--out_dir", str(out), "--num_proc", "1",
                           "--cache_dir", str(tmp_path / "hf")], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [proc.stderr.strip().splitlines()[-1]] and "No space left on device" in errors[0]
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no partial file, the old set whole
    assert shutil.disk_usage(disk).used < 64 * 1024  # the space is given back


def staged_new_set(tmp_path: Path, out: Path, argv: list[str]) -> dict[str, bytes]:
    """Another corpus's set, prepared elsewhere with `argv` and staged in `out` as prepare stages it.
    Returns the bytes of each file; the staged paths are fileset.staged_path(out, name)."""
    run(tmp_path, *argv, "--out_dir", str(tmp_path / "elsewhere"))
    for name in prepare.FILES:
        shutil.copy(tmp_path / "elsewhere" / name, fileset.staged_path(out, name))
    return {name: (tmp_path / "elsewhere" / name).read_bytes() for name in prepare.FILES}


def without_time(files: dict[str, bytes]) -> dict:
    """A set's files with meta.json's `created` left out: a prepare that encodes the same corpus
    again writes the same bytes, but may do it a second later."""
    meta = json.loads(files["meta.json"])
    meta.pop("created")
    return {**files, "meta.json": meta}


PUBLISH_STEPS = 1 + len(prepare.FILES) + 1  # the commit, one rename per file, the journal's removal


@pytest.mark.parametrize("reader", ["trainer", "prepare"])
@pytest.mark.parametrize("done", range(PUBLISH_STEPS))
def test_a_publish_killed_after_any_step_leaves_the_old_or_the_new_set(tmp_path, reader, done, capsys):
    """Stop the publish after `done` steps, as a kill would; whoever reads next sees one whole set."""
    from ds_gpt.data import check_data_dir

    out = tmp_path / "out"
    run(tmp_path, "--input", write_txt(tmp_path / "old", DOCS), "--out_dir", str(out),
        "--val_fraction", "0.25", "--num_proc", "1")
    old = {name: (out / name).read_bytes() for name in prepare.FILES}
    new_argv = ["--input", write_txt(tmp_path / "new", DOCS[::-1] + ["one more"]), "--val_fraction", "0.4",
                "--num_proc", "1"]
    new = staged_new_set(tmp_path, out, new_argv)
    assert all(len(new[n]) != len(old[n]) for n in prepare.FILES)  # a mix would show in the sizes
    staged = {name: fileset.staged_path(out, name) for name in prepare.FILES}
    expected = {name: fileset.file_digest(path) for name, path in staged.items()}
    for step in fileset.publish_steps(out, staged, expected)[:done]:
        step()
    capsys.readouterr()
    if reader == "trainer":
        check_data_dir(out, block_size=2, vocab_size=50304)
    else:
        run(tmp_path, *new_argv, "--out_dir", str(out))
    seen = {name: (out / name).read_bytes() for name in prepare.FILES}
    assert without_time(seen) == without_time(new if done or reader == "prepare" else old)
    assert not fileset.pending(out)
    if reader == "prepare":  # a committed set is finished, not encoded again
        assert ("up to date" in capsys.readouterr().out) == (done > 0)
        assert not list(out.glob(".*.partial-*"))


def test_files_that_disagree_with_meta_json_are_refused_with_the_command(tmp_path):
    """A set whose sizes are not meta.json's (a copy cut short, a .bin from another run)."""
    from ds_gpt.data import check_data_dir

    out = tmp_path / "out"
    run(tmp_path, "--input", write_txt(tmp_path / "old", DOCS), "--out_dir", str(out), "--val_fraction", "0.25",
        "--num_proc", "1")
    with open(out / "train.bin", "ab") as f:
        f.write(np.array([1, 2], dtype=np.uint16).tobytes())
    refusal = rf"train\.bin holds .* but meta\.json says .*HINT: .*ds_gpt\.prepare .* --out_dir {out}"
    with pytest.raises(UserError, match=refusal):
        check_data_dir(out, block_size=2, vocab_size=50304)


def test_an_unfinished_publish_on_a_read_only_mount_names_the_fix(tmp_path, mounts):
    from ds_gpt.data import check_data_dir

    def killed_after_commit(disk: Path) -> None:
        out = disk / "out"
        write_token_bins(out, n_train=100, n_val=50)
        staged = {name: fileset.staged_path(out, name) for name in ("train.bin", "val.bin")}
        for name, path in staged.items():
            path.write_bytes((out / name).read_bytes()[:40])
        fileset.publish_steps(out, staged, {n: fileset.file_digest(p) for n, p in staged.items()})[0]()

    out = mounts.read_only(tmp_path / "disk", killed_after_commit) / "out"
    assert fileset.pending(out)
    with pytest.raises(UserError, match="unfinished publish .* cannot be finished here: Read-only file system"):
        check_data_dir(out, block_size=2, vocab_size=512)


# --- the console and the edges of the command ----------------------------------------------

def refusal(tmp_path: Path, *argv: str) -> str:
    """prepare's one error line for `argv`. With several workers it runs as its own process, as
    users run it: datasets forks its pool, and a fork of this test process, whose torch has thread
    pools running, can leave a worker deadlocked."""
    argv = (*argv, "--cache_dir", str(tmp_path / "hf"))
    if argv[argv.index("--num_proc") + 1] == "1":
        with pytest.raises(UserError) as err:
            prepare.main(list(argv))
        return str(err.value)
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.prepare", *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr.removeprefix("ds_gpt.prepare: error: ")


@pytest.mark.parametrize("num_proc", ["1", pytest.param("2", marks=pytest.mark.slow)])  # 2: a pool, ~3 s
def test_jsonl_files_with_other_fields_name_the_file_and_the_field(tmp_path, num_proc):
    (tmp_path / "a.jsonl").write_text('{"text": "one", "id": 1}\n{"text": "two", "id": 2}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "three", "id": 3}\n{"body": "four", "id": 4}\n')
    (tmp_path / "c.jsonl").write_text('{"text": "five", "url": "x"}\n')
    out = ("--out_dir", str(tmp_path / "out"), "--num_proc", num_proc)
    assert re.search(r"b\.jsonl, line 2: no field 'text' \(its fields: body, id\)",
                     refusal(tmp_path, "--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), *out))
    assert re.search(r"c\.jsonl, line 1: fields text, url differ from .*a\.jsonl's \(id, text\)",
                     refusal(tmp_path, "--input", str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl"), *out))


def test_num_proc_is_capped_at_the_cpus_and_a_failed_fork_is_not_the_out_dirs_fault(tmp_path, monkeypatch, capsys):
    cpus = len(os.sched_getaffinity(0))
    assert prepare.parse_args(["--dataset", "shakespeare", "--num_proc", str(cpus + 5)]).num_proc == cpus
    assert "capped" in capsys.readouterr().out

    def no_fork():
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(UserError, match=r"could not start the worker processes that read the corpus: "
                                        r"Resource temporarily unavailable \(HINT: lower --num_proc"):
        run(tmp_path, "--input", write_txt(tmp_path / "in", DOCS), "--out_dir", str(tmp_path / "out"),
            "--num_proc", "2")  # datasets' own pool
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "c.parquet")
    with pytest.raises(UserError, match=r"could not start 2 worker processes: Resource temporarily unavailable"
                                        r" \(HINT: lower --num_proc"):
        run(tmp_path, "--dataset", "fineweb-edu", "--data_files", str(tmp_path / "c.parquet"), "--val_tokens", "9",
            "--out_dir", str(tmp_path / "out"), "--num_proc", "2")  # the streamed prepare's pool
    assert not (tmp_path / "out").exists()


def test_a_split_whose_only_text_lands_in_val_warns(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text('{"text": ""}\n{"text": "the only document with text"}\n')
    seed = next(s for s in range(10) if corpus.split_indices(2, 0.0005, s)[1].tolist() == [1])
    meta = run(tmp_path, "--input", str(tmp_path / "c.jsonl"), "--out_dir", str(tmp_path / "out"),
               "--seed", str(seed), "--num_proc", "1")
    assert meta["splits"]["train"]["tokens"] == 1  # one <|endoftext|>
    assert "warning: every document with text landed in val" in capsys.readouterr().err


def test_a_writer_removes_killed_writers_staged_files_only_under_the_lock(tmp_path, monkeypatch, capsys):
    """fileset.writing, which the corpus and the HellaSwag set publish under: with the lock, what a
    killed writer staged goes; where the filesystem offers no locks it stays (another writer may
    be staging it now) and stderr says not to run two writers; a directory it created and that
    holds nothing new is removed when the writer fails."""
    root = tmp_path / "data"
    root.mkdir()
    stale = fileset.staged_path(root, "train.bin").with_name(".train.bin.partial-999999")
    stale.write_bytes(b"killed")
    with fileset.writing(root):
        pass
    assert not stale.exists()

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    stale.write_bytes(b"another writer's")
    monkeypatch.setattr(fileset.fcntl, "flock", no_locks)
    with fileset.writing(root):
        pass
    assert stale.read_bytes() == b"another writer's"
    assert "offers no file locks: do not run two writers into it at once" in capsys.readouterr().err
    monkeypatch.undo()
    created = tmp_path / "new"
    with pytest.raises(RuntimeError), fileset.writing(created):
        raise RuntimeError("failed before publishing")
    assert not created.exists()
