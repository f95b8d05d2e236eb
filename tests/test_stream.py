"""Streamed prepare (fineweb-edu, openwebtext --streaming) on local shards in the Hub's schema,
which take the same datasets streaming path as the Hub; and the choice of the Hub revision."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import fs_faults
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from helpers import PYTHON, REPO_ROOT

from ds_gpt import hub, prepare, stream
from ds_gpt.errors import UserError

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were café naïve 日本語 🤖 — it's we'll").split()


def documents(n: int, seed: int = 0, words: tuple[int, int] = (5, 120)) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"Document {i}. " + " ".join(rng.choice(WORDS, size=rng.integers(*words))) + ("\n" if i % 3 else "")
            for i in range(n)]


def write_shards(folder: Path, docs: list[str], n_shards: int = 3, kind: str = "parquet") -> str:
    """`docs` in n_shards files with the Hub dataset's fields (fineweb-edu's, in part)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(np.array_split(np.arange(len(docs)), n_shards)):
        rows = [{"text": docs[i], "id": f"<urn:{i}>", "url": f"https://example.org/{i}", "score": 3.1}
                for i in part]
        path = folder / f"train-{k:05d}-of-{n_shards:05d}.{kind}"
        if kind == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=50)
        else:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(folder / f"*.{kind}")


def expected_split(docs: list[str], enc: tiktoken.Encoding, val_tokens: int, max_tokens: int | None = None):
    """The contract, written independently: val = leading whole documents until >= val_tokens,
    train = the rest (whole documents until >= max_tokens)."""
    encoded = [enc.encode_ordinary(d) + [50256] for d in docs]
    val, train, i = [], [], 0
    while i < len(encoded) and len(val) < val_tokens:
        val += encoded[i]
        i += 1
    while i < len(encoded) and (max_tokens is None or len(train) < max_tokens):
        train += encoded[i]
        i += 1
    return train, val


@pytest.fixture(scope="module")
def reference(gpt2_ranks) -> tiktoken.Encoding:
    return tiktoken.get_encoding("r50k_base")


def bins(out: Path) -> tuple[list[int], list[int]]:
    return tuple(np.fromfile(out / f"{s}.bin", dtype=np.uint16).tolist() for s in ("train", "val"))


def test_streamed_shards_give_tiktoken_ids_with_a_leading_val_slice(tmp_path, reference, capsys, monkeypatch):
    docs = documents(300)
    out = tmp_path / "out"
    monkeypatch.setattr(stream, "DOCS_PER_BATCH", 16)  # 19 batches, several in flight on 2 workers
    prepare.main(["--dataset", "fineweb-edu", "--data_files", write_shards(tmp_path / "pq", docs),
                  "--out_dir", str(out), "--val_tokens", "2000", "--num_proc", "2"])
    train, val = expected_split(docs, reference, 2000)
    assert bins(out) == (train, val)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["streaming"], meta["val_tokens"], meta["max_tokens"]) == (True, 2000, None)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".prepare.lock"]
    err = capsys.readouterr().err
    assert "tokenizing" in err and "Downloading" not in err and "Generating" not in err  # a local corpus: our bar only
    # the same records as JSON Lines take the same path and give the same bins; --max_tokens cuts train
    prepare.main(["--dataset", "fineweb-edu", "--data_files", write_shards(tmp_path / "jl", docs, kind="jsonl"),
                  "--out_dir", str(tmp_path / "cut"), "--val_tokens", "2000", "--max_tokens", "5000",
                  "--num_proc", "1"])
    assert bins(tmp_path / "cut") == expected_split(docs, reference, 2000, max_tokens=5000)


def test_openwebtext_streaming_reads_the_same_way_and_reruns_are_no_ops(tmp_path, reference, capsys):
    docs = documents(40, seed=1)
    argv = ["--dataset", "openwebtext", "--streaming", "--data_files", write_shards(tmp_path / "pq", docs, 2),
            "--out_dir", str(tmp_path / "out"), "--val_tokens", "300", "--num_proc", "1"]
    prepare.main(argv)
    assert bins(tmp_path / "out") == expected_split(docs, reference, 300)
    capsys.readouterr()
    published = fs_faults.snapshot(tmp_path / "out")
    prepare.main(argv)
    assert "up to date" in capsys.readouterr().out and fs_faults.snapshot(tmp_path / "out") == published
    with pytest.raises(UserError, match="ended inside the validation slice"):  # no train: refused, not published
        prepare.main([*argv[:-6], "--out_dir", str(tmp_path / "small"), "--val_tokens", "10000000"])
    assert not (tmp_path / "small" / "train.bin").exists()
    # without --streaming: the cached path and nanoGPT's random split, on the same files
    cached = ["--dataset", "openwebtext", "--data_files", argv[4], "--out_dir", str(tmp_path / "cached"),
              "--val_fraction", "0.1", "--num_proc", "1", "--cache_dir", str(tmp_path / "hf")]
    prepare.main(cached)
    meta = json.loads((tmp_path / "cached" / "meta.json").read_text())
    assert (meta["seed"], meta["splits"]["val"]["documents"], "streaming" in meta) == (2357, 4, False)
    with pytest.raises(UserError, match="--max_tokens applies to a streamed prepare"):
        prepare.main([*cached, "--max_tokens", "10"])
    # a record without text, met while streaming: the file and the line
    write_shards(tmp_path / "jl", docs, 2, kind="jsonl")
    with (tmp_path / "jl" / "train-00001-of-00002.jsonl").open("a") as f:
        f.write('{"id": "x"}\n')
    with pytest.raises(UserError, match=r"train-00001-of-00002\.jsonl, line 21: no field 'text'"):
        prepare.main(["--dataset", "openwebtext", "--streaming", "--data_files", str(tmp_path / "jl" / "*.jsonl"),
                      "--out_dir", str(tmp_path / "bad"), "--val_tokens", "300", "--num_proc", "1"])


def test_only_a_bounded_number_of_batches_is_read_ahead(gpt2_ranks):
    """Backpressure: Pool.imap would pull the whole stream into memory while the workers encode."""
    read = []

    def source():
        for i in range(200):
            read.append(i)
            yield [f"batch {i}"], {"i": i}

    pool = stream.start_pool(2, stream._init_encoder, (None,))
    try:
        for k, (position, ids) in enumerate(stream.encode_in_order(source(), pool, in_flight=4)):
            assert position == {"i": k} and len(read) <= k + 4
            assert ids[-1] == 50256
    finally:
        pool.terminate()
    assert len(read) == 200


def run_prepare_script(argv: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    """prepare in a fresh interpreter, after `prelude` (which may set module constants); its
    stderr ends with the peak RSS (VmHWM: ru_maxrss would count the forking test process)."""
    code = "\n".join(["import sys", "from ds_gpt import stream", textwrap.dedent(prelude),
                       "from ds_gpt import prepare", "from ds_gpt.errors import run_cli", "try:",
                       f"    run_cli(lambda: prepare.main({argv!r}), prog='ds_gpt.prepare')", "finally:",
                       "    hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')]",
                       "    print('peak_rss_kb', hwm[0].split()[1], file=sys.stderr)"])
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


@pytest.mark.slow  # an interpreter of its own to kill, and three prepares
def test_a_prepare_killed_mid_shard_resumes_from_its_last_checkpoint(tmp_path, reference, monkeypatch, capsys):
    docs = documents(400, seed=2)
    shards = write_shards(tmp_path / "pq", docs, 4)
    out = tmp_path / "out"
    argv = ["--dataset", "fineweb-edu", "--data_files", shards, "--out_dir", str(out), "--val_tokens", "1500",
            "--num_proc", "1"]
    old = ["--dataset", "fineweb-edu", "--data_files", shards, "--out_dir", str(out), "--val_tokens", "100",
           "--max_tokens", "100", "--num_proc", "1"]
    prepare.main(old)  # a published set, which the killed run must leave as it is
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    # small batches and shards; SIGKILL once the 10th batch is written (and flushed, so the file
    # holds more than the checkpoint counts): after a few checkpoints, part-way through a shard
    killed = run_prepare_script(argv, """
        stream.DOCS_PER_BATCH, stream.SHARD_TOKENS = 16, 3000
        import os, signal
        writes, write = [0], stream.TokenWriter.write
        def dying_write(self, ids):
            write(self, ids)
            writes[0] += 1
            if writes[0] == 20:  # two writes per batch: val's, then train's
                self.file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        stream.TokenWriter.write = dying_write
        """)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoint = json.loads((out / stream.CHECKPOINT).read_text())
    done = sum(s["tokens"] for s in checkpoint["splits"].values())
    written = sum((out / name).stat().st_size // 2 for name in stream.STAGED.values())
    assert 0 < done < written  # killed after a checkpoint, with more written since
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before
    monkeypatch.setattr(stream, "DOCS_PER_BATCH", 16)
    monkeypatch.setattr(stream, "SHARD_TOKENS", 3000)
    written, write = [0], stream.TokenWriter.write
    monkeypatch.setattr(stream.TokenWriter, "write", lambda self, ids: written.__setitem__(0, written[0] + len(ids))
                        or write(self, ids))
    capsys.readouterr()
    prepare.main(argv)
    assert f"resuming from the checkpoint at {done:,} tokens" in capsys.readouterr().out
    assert bins(out) == expected_split(docs, reference, 1500)
    total = sum(len(ids) for ids in bins(out))
    assert written[0] == total - done  # only what the checkpoint did not hold was encoded again
    assert not (out / stream.CHECKPOINT).exists() and not (out / stream.STAGED["train"]).exists()


@pytest.mark.slow
def test_memory_stays_bounded_on_a_corpus_larger_than_the_bound(tmp_path):
    """The bound scaled down to be cheap: batches of 16 documents (~8 KB) instead of 512, and a
    ~20 MB corpus in 16 shards. The process's RSS is sampled after every batch: from a quarter of
    the way in to the end it may grow by less than half the text read meanwhile (a prepare that
    kept the text, or read the stream without backpressure, grows by more than all of it; one
    that does neither still grows by a few MB as the parquet reader and the allocator settle,
    ~2.4 MB once on the CI machine against a 10 MB corpus, hence the larger corpus), and its
    peak (VmHWM, with the publish) stays under 2 GB."""
    docs = documents(48_000, seed=3, words=(60, 140))
    size = sum(len(d.encode()) for d in docs)
    proc = run_prepare_script(["--dataset", "fineweb-edu", "--data_files", write_shards(tmp_path / "in", docs, 16),
                               "--out_dir", str(tmp_path / "out"), "--val_tokens", "100", "--num_proc", "1"], """
        stream.DOCS_PER_BATCH = 16
        import os
        samples, update = [], stream.Progress.update
        def sampled_update(self, docs, tokens):
            update(self, docs, tokens)
            samples.append(int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        stream.Progress.update = sampled_update
        import atexit
        atexit.register(lambda: print("rss_samples", samples, file=sys.stderr))
        """)
    assert proc.returncode == 0, proc.stderr
    samples = json.loads(proc.stderr.split("rss_samples", 1)[1].split("\n", 1)[0])
    assert len(samples) == 48_000 // 16 and size > 20e6
    quarter = len(samples) // 4
    assert max(samples[quarter:]) - samples[quarter] < 0.75 * size / 2, (samples[quarter], max(samples))
    assert int(proc.stderr.rsplit("peak_rss_kb", 1)[1].split()[0]) < 2 << 20


@pytest.mark.parametrize("case", ["no script", "script and parquet", "converted", "partial", "nothing"])
def test_the_hub_revision_is_chosen_from_the_listings(case):
    repo = "Skylion007/openwebtext"
    script_only = hub.Listing("a" * 40, ("README.md", "openwebtext.py", "subsets/urlsf_subset00.tar"))
    main, converted = {
        "no script": (hub.Listing("b" * 40, ("README.md", "data/train-00000-of-00093.parquet")), None),
        "script and parquet": (hub.Listing("c" * 40, ("openwebtext.py", "data/train-00001-of-00002.parquet",
                                                      "data/train-00000-of-00002.parquet")), None),
        "converted": (script_only, hub.Listing("d" * 40, ("plain_text/train/0001.parquet",
                                                          "plain_text/train/0000.parquet", ".gitattributes"))),
        "partial": (script_only, hub.Listing("e" * 40, ("plain_text/partial-train/0000.parquet",))),
        "nothing": (script_only, None),
    }[case]
    if case in ("partial", "nothing"):
        with pytest.raises(UserError, match="openwebtext.py, which datasets 5 refuses" +
                           (".*first 5 GB" if case == "partial" else ".*no parquet copy")) as err:
            hub.choose(repo, None, main, converted)
        assert "--data_files" in err.value.hint
        return
    choice = hub.choose(repo, None, main, converted)
    if case == "no script":
        assert (choice.builder, choice.revision, choice.data_files) == (repo, "b" * 40, ())
    elif case == "script and parquet":
        assert choice.builder == "parquet" and choice.data_files == tuple(
            f"hf://datasets/{repo}@{'c' * 40}/data/train-0000{k}-of-00002.parquet" for k in (0, 1))
    else:
        assert choice.data_files == tuple(f"hf://datasets/{repo}@{'d' * 40}/plain_text/train/000{k}.parquet"
                                          for k in (0, 1))


def test_an_unreachable_hub_is_one_line_with_a_hint(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.prepare", "--dataset", "openwebtext", "--out_dir",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ds_gpt.prepare: error: cannot list Skylion007/openwebtext")
    assert "(HINT: run it where the Hub is reachable (a login node), or pass a local copy" in lines[0]
    assert not (tmp_path / "out").exists()
