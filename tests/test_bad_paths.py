"""Every command x every path argument x three bad places, as one table.

Places:
  read-only     a read-only mount (EROFS for root too; chmod would not stop root)
  file-for-dir  a regular file where a directory belongs, or on the way to one (ENOTDIR)
  dir-for-file  a directory where a file belongs (EISDIR): the argument itself, or for a
                directory argument a file the command reads or writes inside it

Each run must end with exit 0 (the command could do its job: reading from a read-only place)
or exit 2 with exactly one `prog: error: ... (HINT: ...)` line and no traceback, and no file
may be lost or changed. The commands run in-process through run_cli, which is fast; one case
per command runs as a subprocess to prove the exit code and the single stderr line end to end.
`python -m ds_gpt.plan` takes no path: its bad numbers are tested at the end.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import fs_faults
import pytest
from helpers import PYTHON, REPO_ROOT, forked_train, two_step_args, write_token_bins

from ds_gpt import export, fileset, hostfile, plan, prepare, report, sample, tokenizer
from ds_gpt.bench.__main__ import main as bench_main
from ds_gpt.errors import run_cli

COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "prepare": ("ds_gpt.prepare", prepare.main),
    "sample": ("ds_gpt.sample", sample.main),
    "export": ("ds_gpt.export", export.main),
    "hostfile": ("ds_gpt.hostfile", lambda argv: hostfile.main(argv, environ={})),
    "report": ("ds_gpt.report", report.main),
    "bench": ("ds_gpt.bench", bench_main),
}
IGNORED = frozenset({fileset.LOCK_NAME})  # prepare's lock file: empty, created on first use


@dataclass
class Place:
    """What a case builds its arguments from."""

    work: Path  # the user's files: snapshotted before and after
    mounts: object
    run: Path | None = None  # a finished tiny training run (only for the cases that load one)

    def read_only(self, name: str, fill: Callable[[Path], None] | None = None) -> Path:
        return self.mounts.read_only(self.work / name, fill)

    @property
    def a_file(self) -> Path:
        return self.work / "a_file"


@dataclass
class Case:
    command: str
    argv: Callable[[Place], list[str]]
    code: int  # 0: the command did its job; 2: one error line
    needs_run: bool = False  # loads a real checkpoint: one trainer run per module, marked slow
    subprocess: bool = False  # the command's end-to-end case
    changes: Callable[[Place], set[Path]] = lambda p: set()  # files a successful run may replace or remove


# --- what the cases start from -------------------------------------------------------------

DOCS = {"a.txt": "First document, plain text.", "b.txt": "Second document, a little longer than the first."}


def write_docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


def old_set(out: Path, train_is_dir: bool = False) -> Path:
    """A published data set (train.bin, val.bin, meta.json) that a failed prepare must leave alone."""
    write_token_bins(out, n_train=300, n_val=100)
    (out / "meta.json").write_text(json.dumps({"dataset": "custom", "splits": {}}) + "\n")
    if train_is_dir:
        (out / "train.bin").unlink()
        (out / "train.bin").mkdir()
    return out


def ranks_into(folder: Path, as_dir: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / tokenizer.RANKS_CACHE_KEY
    if as_dir:
        target.mkdir()
    else:
        shutil.copy(tokenizer.default_cache_dir() / tokenizer.RANKS_CACHE_KEY, target)
    return folder


def run_copy(place: Place, into: Path, states_as_dir: bool = False) -> Path:
    shutil.copytree(place.run, into, dirs_exist_ok=True)
    if states_as_dir:
        for states in into.glob("global_step*/mp_rank_00_model_states.pt"):
            states.unlink()
            states.mkdir()
    return into


def metrics_run(out: Path, png_as_dir: bool = False) -> Path:
    """A run directory with metrics.jsonl and an old report.md (and report.png, or a directory there)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [{"iter": i, "loss": 5.0 - 0.1 * i, "lr": 1e-3, "dt_ms": 100.0, "tokens_per_s": 1e4, "mfu": 0.1}
             for i in range(6)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (out / "report.md").write_text("# the old report\n")
    if png_as_dir:
        (out / "report.png").mkdir()
    else:
        (out / "report.png").write_bytes(b"\x89PNG old")
    return out


def prepare_args(place: Place, **override: str) -> list[str]:
    args = {"--input": str(place.work / "in" / "*.txt"), "--out_dir": str(place.work / "out"),
            "--num_proc": "1", "--cache_dir": str(place.work.parent / "hf"), **override}
    return [x for kv in args.items() for x in kv]


def sample_args(out_dir: Path | str, start: str = "!") -> list[str]:
    return ["--out_dir", str(out_dir), "--start", start, "--max_new_tokens", "2", "--device", "cpu"]


def export_args(out_dir: Path | str, dest: Path | str, *extra: str) -> list[str]:
    return ["--out_dir", str(out_dir), "--format", "fp32", "--dest", str(dest), *extra]


def old_export(dest: Path) -> Path:
    """An earlier export with a directory where model.pt goes, and a file the new one lacks."""
    (dest / "model.pt").mkdir(parents=True)
    (dest / "notes.txt").write_text("from the old export\n")
    return dest


def hosts_file(folder: Path) -> None:
    (folder / "hosts").write_text("node1 slots=2\n")


LOADER = ["loader", "--batch", "2", "--block", "16", "--seconds", "0.05", "--rounds", "1"]

# --- the table -----------------------------------------------------------------------------

CASES: dict[str, Case] = {
    # prepare --out_dir: written
    "prepare --out_dir read-only": Case("prepare", lambda p: prepare_args(
        p, **{"--out_dir": str(p.read_only("ro", lambda d: old_set(d / "out")) / "out")}), 2, subprocess=True),
    "prepare --out_dir file-for-dir": Case("prepare", lambda p: prepare_args(p, **{"--out_dir": str(p.a_file)}), 2),
    "prepare --out_dir dir-for-file": Case("prepare", lambda p: prepare_args(
        p, **{"--out_dir": str(old_set(p.work / "out", train_is_dir=True))}), 2),
    # prepare --input: read
    "prepare --input read-only": Case("prepare", lambda p: prepare_args(
        p, **{"--input": str(p.read_only("ro", lambda d: write_docs(d)) / "*.txt")}), 0),
    "prepare --input file-for-dir": Case("prepare", lambda p: prepare_args(
        p, **{"--input": str(p.a_file / "a.txt")}), 2),
    "prepare --input dir-for-file": Case("prepare", lambda p: prepare_args(p, **{"--input": str(p.work / "in")}), 2),
    # prepare --cache_dir: written by datasets (its layout inside is datasets' own)
    "prepare --cache_dir read-only": Case("prepare", lambda p: prepare_args(
        p, **{"--cache_dir": str(p.read_only("ro") / "hf")}), 2),
    "prepare --cache_dir file-for-dir": Case("prepare", lambda p: prepare_args(p, **{"--cache_dir": str(p.a_file)}), 2),
    # prepare --tokenizer_cache: read
    "prepare --tokenizer_cache read-only": Case("prepare", lambda p: prepare_args(
        p, **{"--tokenizer_cache": str(p.read_only("ro", ranks_into))}), 0),
    "prepare --tokenizer_cache file-for-dir": Case("prepare", lambda p: prepare_args(
        p, **{"--tokenizer_cache": str(p.a_file)}), 2),
    "prepare --tokenizer_cache dir-for-file": Case("prepare", lambda p: prepare_args(
        p, **{"--tokenizer_cache": str(ranks_into(p.work / "ranks", as_dir=True))}), 2),
    # sample --out_dir: read
    "sample --out_dir read-only": Case("sample", lambda p: sample_args(
        p.read_only("ro", lambda d: run_copy(p, d))), 0, needs_run=True),
    "sample --out_dir file-for-dir": Case("sample", lambda p: sample_args(p.a_file), 2),
    "sample --out_dir dir-for-file": Case("sample", lambda p: sample_args(
        run_copy(p, p.work / "run", states_as_dir=True)), 2, needs_run=True),
    # sample --start FILE:...: read
    "sample --start read-only": Case("sample", lambda p: sample_args(
        p.run, "FILE:" + str(p.read_only("ro", lambda d: (d / "prompt.txt").write_text("!")) / "prompt.txt")),
        0, needs_run=True),
    "sample --start file-for-dir": Case("sample", lambda p: sample_args(p.a_file, f"FILE:{p.a_file}/prompt.txt"), 2),
    "sample --start dir-for-file": Case("sample", lambda p: sample_args(p.a_file, f"FILE:{p.work / 'in'}"), 2,
                                        subprocess=True),
    # export --out_dir: read
    "export --out_dir read-only": Case("export", lambda p: export_args(
        p.read_only("ro", lambda d: run_copy(p, d)), p.work / "exported"), 0, needs_run=True),
    "export --out_dir file-for-dir": Case("export", lambda p: export_args(p.a_file, p.work / "exported"), 2),
    "export --out_dir dir-for-file": Case("export", lambda p: export_args(
        run_copy(p, p.work / "run", states_as_dir=True), p.work / "exported"), 2, needs_run=True),
    # export --dest: written
    "export --dest read-only": Case("export", lambda p: export_args(p.work / "in", p.read_only("ro") / "exported"), 2),
    "export --dest file-for-dir": Case("export", lambda p: export_args(p.work / "in", p.a_file), 2, subprocess=True),
    "export --dest dir-for-file": Case(  # --force replaces the old export, a directory at model.pt included
        "export", lambda p: export_args(p.run, old_export(p.work / "exported"), "--force"), 0, needs_run=True,
        changes=lambda p: {p.work / "exported" / "notes.txt"}),
    # hostfile --out: written
    "hostfile --out read-only": Case("hostfile", lambda p: ["--nodelist", "n[1-2]", "--slots", "2", "--out",
                                                            str(p.read_only("ro") / "hosts")], 2),
    "hostfile --out file-for-dir": Case("hostfile", lambda p: ["--nodelist", "n1", "--slots", "2", "--out",
                                                               str(p.a_file / "hosts")], 2),
    "hostfile --out dir-for-file": Case("hostfile", lambda p: ["--nodelist", "n1", "--slots", "2", "--out",
                                                               str(p.work / "in")], 2, subprocess=True),
    # hostfile --check: read
    "hostfile --check read-only": Case("hostfile", lambda p: [
        "--check", str(p.read_only("ro", hosts_file) / "hosts")], 0),
    "hostfile --check file-for-dir": Case("hostfile", lambda p: ["--check", str(p.a_file / "hosts")], 2),
    "hostfile --check dir-for-file": Case("hostfile", lambda p: ["--check", str(p.work / "in")], 2),
    # report OUT_DIR: read (metrics.jsonl) and written (report.md, report.png)
    "report OUT_DIR read-only": Case("report", lambda p: [str(p.read_only("ro", metrics_run))], 2, subprocess=True),
    "report OUT_DIR file-for-dir": Case("report", lambda p: [str(p.a_file)], 2),
    "report OUT_DIR dir-for-file": Case("report", lambda p: [str(metrics_run(p.work / "run", png_as_dir=True))], 2),
    # bench loader --data_dir: read
    "bench --data_dir read-only": Case("bench", lambda p: [*LOADER, "--data_dir", str(p.read_only(
        "ro", lambda d: write_token_bins(d, n_train=4000, n_val=400)))], 0),
    "bench --data_dir file-for-dir": Case("bench", lambda p: [*LOADER, "--data_dir", str(p.a_file)], 2,
                                          subprocess=True),
    "bench --data_dir dir-for-file": Case("bench", lambda p: [*LOADER, "--data_dir", str(
        old_set(p.work / "data", train_is_dir=True))], 2),
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished 2-iteration run of a 1-layer model (vocab 512): what sample and export load."""
    tmp = tmp_path_factory.mktemp("trained")
    forked_train(1, *two_step_args(tmp), log_dir=tmp / "logs")
    return tmp / "out"


def run_in_process(command: str, argv: list[str], capsys) -> tuple[int, str]:
    prog, main = COMMANDS[command]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # any other exception escaping run_cli fails the test
        run_cli(lambda: main(argv), prog=prog)
    return stop.value.code, capsys.readouterr().err


def run_as_process(command: str, argv: list[str]) -> tuple[int, str]:
    prog, _ = COMMANDS[command]
    proc = subprocess.run([PYTHON, "-m", prog, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    if proc.returncode:  # the end-to-end promise: the error is the last line, after any progress output
        assert proc.stderr.strip().splitlines()[-1].startswith(f"{prog}: error: "), proc.stderr[-3000:]
    return proc.returncode, proc.stderr


def params():
    for name, case in CASES.items():
        marks = [pytest.mark.slow] if case.needs_run else []
        yield pytest.param(name, marks=marks, id=name.replace(" ", "_"))


@pytest.mark.parametrize("name", list(params()))
def test_bad_place(name, tmp_path, mounts, capsys, gpt2_ranks, request):
    case = CASES[name]
    work = tmp_path / "work"
    write_docs(work / "in")
    (work / "a_file").write_text("a regular file where a directory belongs\n")
    place = Place(work, mounts, request.getfixturevalue("trained_run") if case.needs_run else None)
    argv = case.argv(place)
    before = fs_faults.snapshot(work, IGNORED)

    if case.subprocess:
        code, stderr = run_as_process(case.command, argv)
    else:
        code, stderr = run_in_process(case.command, argv, capsys)

    prog = COMMANDS[case.command][0]
    errors = [line for line in stderr.splitlines() if f"{prog}: error:" in line]
    assert code == case.code, stderr[-3000:]
    if code == 2:
        assert len(errors) == 1 and "(HINT: " in errors[0], stderr[-3000:]
    else:
        assert not errors, stderr[-3000:]
    after = fs_faults.snapshot(work, IGNORED)
    changed = {Path(p) for p in before if after.get(p) != before[p]}
    assert changed <= case.changes(place), f"lost or changed: {sorted(map(str, changed))}"
    if code == 2:
        assert after == before, "a failed command left files behind"
    assert not list(work.rglob(".*.partial-*")) and not list(work.rglob(".*.tmp*"))  # no debris


# --- inputs that parse but have the wrong shape --------------------------------------------
#
# A TOML value, a DeepSpeed JSON setting, a meta.json, a checkpoint's completion marker, a
# metrics.jsonl line or a number that is well-formed text of the wrong kind. Each is checked once,
# where its knowledge is (config, run_config, stage, checkpoint, report, export, ops), and ends
# like a bad path: exit 2 with one line and a HINT, or exit 0 where the command can still do its
# job; never a traceback, and no file of the user's changed, out_dir included (the trainer
# refuses before it creates one).

SHAPE_COMMANDS = {**COMMANDS, "train": ("ds_gpt.train", lambda argv: train_main(argv)),
                  "ops": ("ds_gpt.ops", lambda argv: ops_main(argv))}


def train_main(argv: list[str]) -> int:
    from ds_gpt.train import main
    return main(argv)


def ops_main(argv: list[str]) -> int:
    from ds_gpt.ops import main
    return main(argv)


def trainer_args(work: Path, *extra: str) -> list[str]:
    data = work / "data"
    if not data.exists():
        write_token_bins(data, n_train=2000, n_val=500)
    return ["--data_dir", str(data), "--out_dir", str(work / "run"), "--n_layer", "1", "--n_head", "1",
            "--n_embd", "16", "--block_size", "32", "--vocab_size", "512", "--compile", "False", *extra]


def toml(work: Path, text: str) -> list[str]:
    (work / "c.toml").write_text(text + "\n")
    return trainer_args(work, "--config", str(work / "c.toml"))


def ds_json(work: Path, edit: Callable[[dict], None]) -> list[str]:
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero1.json").read_text())
    edit(ds)
    (work / "ds.json").write_text(json.dumps(ds))
    return trainer_args(work, "--deepspeed_config", str(work / "ds.json"))


def meta(work: Path, doc: dict) -> list[str]:
    args = trainer_args(work)
    (work / "data" / "meta.json").write_text(json.dumps({"dataset": "custom", "vocab_size": 512, **doc}))
    return args


MARKER = {"iter_num": 4, "model_args": {"block_size": 32, "vocab_size": 512, "n_layer": 1, "n_head": 1, "n_embd": 16,
                                        "bias": False, "dropout": 0.0},
          "world_size": 1, "zero_stage": 1, "dtype": "float32", "files": {"mp_rank_00_model_states.pt":
                                                                          {"bytes": 5, "sha256": "0" * 64}}}


def run_with_marker(work: Path, edit: Callable[[dict], None]) -> Path:
    """A run directory whose one checkpoint has a marker of the wrong shape (nothing is loaded past it)."""
    tag = work / "run" / "global_step4"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"12345")
    doc = json.loads(json.dumps(MARKER))
    edit(doc)
    (tag / "ds_gpt_complete.json").write_text(json.dumps(doc))
    return work / "run"


def evil_pickle(work: Path) -> Path:
    """A torch file whose unpickling would create `work/pwned`: loading it as data must refuse it."""
    import torch

    class Payload:
        def __reduce__(self):
            return (Path.touch, (work / "pwned",))

    torch.save({"model": {}, "model_args": {}, "payload": Payload()}, work / "ckpt.pt")
    return work / "ckpt.pt"


def report_run(work: Path, lines: list[str] = (), config: str | None = None) -> list[str]:
    out = metrics_run(work / "run")
    with open(out / "metrics.jsonl", "a") as fh:
        fh.writelines(line + "\n" for line in lines)
    if config is not None:
        (out / "config.json").write_text(config)
    return [str(out)]


def drop(*path: str) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


def put(value, *path: str) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


SHAPES: dict[str, tuple[str, Callable[[Path], list[str]], int, str]] = {
    # name: (command, argv from the work directory, exit code, what the error line must say)
    "toml list for an int": ("train", lambda w: toml(w, "n_layer = [1, 2]"), 2,
                             "n_layer must be an integer, not a list"),
    "toml table": ("train", lambda w: toml(w, "out_dir = {a = 1}"), 2, "out_dir must be a string, not a table"),
    "toml date": ("train", lambda w: toml(w, "dropout = 1979-05-27"), 2, "dropout must be a number, not a date"),
    "toml quoted int": ("train", lambda w: toml(w, 'n_layer = "3"'), 2, "n_layer must be an integer, not a quoted"),
    "pg_timeout past timedelta": ("train", lambda w: trainer_args(w, "--pg_timeout", str(10**17)), 2,
                                  "pg_timeout must be at most 604800 s"),
    "ds stage one": ("train", lambda w: ds_json(w, put("one", "zero_optimization", "stage")), 2,
                     'zero_optimization.stage must be one of 0, 1, 2, 3 (got "one")'),
    "ds stage 4": ("train", lambda w: ds_json(w, put(4, "zero_optimization", "stage")), 2,
                   "zero_optimization.stage must be one of 0, 1, 2, 3 (got 4)"),
    "ds zero_optimization null": ("train", lambda w: ds_json(w, put(None, "zero_optimization")), 2,
                                  "zero_optimization must be a JSON object (got null)"),
    "ds lr a string": ("train", lambda w: ds_json(w, put("6e-4", "optimizer", "params", "lr")), 2,
                       'optimizer.params.lr must be a number >= 0 (got "6e-4")'),
    "accumulation absurd": ("train", lambda w: trainer_args(w, "--gradient_accumulation_steps", "1000000000"), 2,
                            "a global batch of 12,000,000,000 sequences"),
    "meta vocab_size null": ("train", lambda w: meta(w, {"vocab_size": None}), 2,
                             "vocab_size must be a positive integer (got null)"),
    "meta splits a string": ("train", lambda w: meta(w, {"splits": "train,val"}), 2, "splits must be an object"),
    "meta split a string": ("train", lambda w: meta(w, {"splits": {"train": "all"}}), 2,
                            'splits.train must be an object (got "all")'),
    "nanogpt pickle runs no code": ("train", lambda w: trainer_args(w, "--init_from", f"nanogpt:{evil_pickle(w)}"), 2,
                                    "holds more than tensors and plain data (Unsupported global: GLOBAL getattr"),
    "marker without world_size": ("sample", lambda w: sample_args(run_with_marker(w, drop("world_size"))), 2,
                                  "no checkpoint in"),
    "marker files without bytes": ("export", lambda w: export_args(run_with_marker(
        w, drop("files", "mp_rank_00_model_states.pt", "bytes")), w / "exported", "--tag", "global_step4"), 2,
        "its files record lacks a size (bytes)"),
    "marker model_args a string": ("export", lambda w: export_args(run_with_marker(
        w, put("124M", "model_args")), w / "exported", "--tag", "global_step4"), 2, "its model_args is str"),
    "export hf_vocab_size -5": ("export", lambda w: export_args(w / "in", w / "exported", "--hf_vocab_size", "-5"), 2,
                                "--hf_vocab_size: must be a positive integer (got '-5')"),
    "report list and string lines": ("report", lambda w: report_run(w, ["[1, 2]", '"a string"', '{"iter": "x"}']),
                                     0, ""),
    "report config a list": ("report", lambda w: report_run(w, config="[1, 2]"), 0, ""),
    "report --out_dir": ("report", lambda w: ["--out_dir", *report_run(w)], 0, ""),
}
SHAPE_CHANGES = {"report": {"report.md", "report.png"}}  # what a successful report replaces


@pytest.mark.parametrize("name", list(SHAPES), ids=lambda name: name.replace(" ", "_"))
def test_wrong_shape(name, tmp_path, capsys):
    command, argv_of, code, message = SHAPES[name]
    work = tmp_path / "work"
    write_docs(work / "in")
    argv = argv_of(work)
    created_run = not (work / "run").exists()
    before = fs_faults.snapshot(work, IGNORED)
    prog, main = SHAPE_COMMANDS[command]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # any other exception escaping run_cli fails the test
        run_cli(lambda: main(argv), prog=prog)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if f"{prog}: error:" in line]
    assert stop.value.code == code, stderr[-3000:]
    if code == 2:
        assert len(errors) == 1 and message in errors[0] and "(HINT: " in errors[0], stderr[-3000:]
    else:
        assert not errors, stderr[-3000:]
    after = fs_faults.snapshot(work, IGNORED)
    changed = {Path(p).name for p in set(before) | set(after) if after.get(p) != before.get(p)}
    assert changed == (SHAPE_CHANGES.get(command, set()) if code == 0 else set()), changed
    assert not (created_run and (work / "run").exists()), "the trainer left an out_dir it created"
    assert not (work / "pwned").exists()  # nothing loaded ran code


def test_an_op_that_cannot_compile_is_one_line_naming_the_compiler(tmp_path, monkeypatch, capsys):
    """CXX pointing nowhere, and no build of the op yet: one line naming the compiler, not ninja's log."""
    from deepspeed.ops.op_builder.builder import OpBuilder
    from torch.utils import cpp_extension

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(OpBuilder, "_loaded_ops", {})  # this process may have loaded the built op already
    # torch remembers each JIT build's arguments (its directory included) per process, and a later load
    # with others builds a "_v1" op into the shared cache, after which every process rebuilds it:
    # the failed attempt must leave nothing behind for the tests that load the op in this process.
    monkeypatch.setattr(cpp_extension.JIT_EXTENSION_VERSIONER, "entries", {})
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: ops_main([]), prog="ds_gpt.ops")
    errors = [line for line in capsys.readouterr().err.splitlines() if "ds_gpt.ops: error:" in line]
    assert stop.value.code == 2 and len(errors) == 1, errors
    assert f"the C++ compiler {tmp_path / 'no-such-g++'} ($CXX) is not installed" in errors[0]
    assert "(HINT: unset CXX or point it at an installed g++" in errors[0]


# --- plan: numbers, not paths --------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0"], "--gpus must be >= 1 (got 0)"),
    (["--micro_batch", "0", "--block_size", "-1"], "--block_size must be >= 1 (got -1); --micro_batch must be >= 1"),
    (["--mfu", "nan"], "--mfu must be a finite number > 0 (got nan)"),
    (["--gpu_mem_gb", "inf"], "--gpu_mem_gb must be a finite number > 0 (got inf)"),
    (["--n_head", "0"], "--n_head must be >= 1"),
    (["--tokens_per_iter", "0"], "--tokens_per_iter must be >= 1"),
    (["--gpus", "two"], "argument --gpus: invalid int value: 'two'"),
])
def test_plan_bad_numbers_are_one_line(argv, message, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: plan.main(argv), prog="ds_gpt.plan")
    errors = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and len(errors) == 1 and message in errors[0] and "(HINT: " in errors[0], errors


@pytest.mark.parametrize("argv, message, hint, followed", [
    # the node count the GPU's usual node implies is not named as if --nodes had been given
    (["--gpus", "7"], "--gpus 7 do not split evenly over the 2 nodes of up to 4 GPUs they need (the usual a100 node)",
     "e.g. --nodes 7 --gpus_per_node 1", ["--gpus", "7", "--nodes", "7", "--gpus_per_node", "1",
                                          "--tokens_per_iter", "516096"]),
    (["--gpus", "6", "--nodes", "4"], "--gpus 6 do not split evenly over --nodes 4", "--nodes 3",
     ["--gpus", "6", "--nodes", "3", "--tokens_per_iter", "516096"]),
    (["--gpus", "6"], "tokens_per_iter 491520 is not a multiple", "--tokens_per_iter 516096",
     ["--gpus", "6", "--tokens_per_iter", "516096"]),
    (["--zero_stage", "1", "--offload", "optimizer"], "optimizer offload needs ZeRO-2 or 3",
     "--offload optimizer with --zero_stage 2", ["--zero_stage", "2", "--offload", "optimizer"]),
])
def test_plan_errors_carry_a_hint_that_works(argv, message, hint, followed, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: plan.main(argv), prog="ds_gpt.plan")
    errors = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    assert "--nodes 2" not in errors[0] and hint in errors[0].split("(HINT: ")[1], errors
    assert plan.main(followed) == 0  # the hint, followed


def test_plan_cli_bad_number_exit_2():
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.plan", "--gpus", "0"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["ds_gpt.plan: error: --gpus must be >= 1 (got 0) (HINT: counts are 1 or more; "
                                        "--mfu is a fraction such as 0.39 (python -m ds_gpt.plan --help shows every "
                                        "default))"]

