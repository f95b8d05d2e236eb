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


@pytest.fixture
def mounts():
    yield from fs_faults.mounted()


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
    assert stop.value.code == 2 and len(errors) == 1 and message in errors[0], errors


def test_plan_cli_bad_number_exit_2():
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.plan", "--gpus", "0"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["ds_gpt.plan: error: --gpus must be >= 1 (got 0)"]

