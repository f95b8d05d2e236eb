"""What the tests share: paths, small corpora, free ports, the trainer as users launch it.

One module, imported by the test files (`from helpers import ...`); fixtures live in conftest.py.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ds_gpt.ops import OP

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
VENV_BIN = Path(PYTHON).parent  # the venv's deepspeed, torchrun, mpirun and ninja


def write_token_bins(data_dir: Path, n_train: int = 20_000, n_val: int = 4_000,
                     vocab: int = 512, seed: int = 0) -> Path:
    """Write a small synthetic corpus as flat uint16 train.bin/val.bin (nanoGPT's format).

    The ids follow a learnable pattern (a noisy +1 sequence) so a tiny model's loss drops fast.
    """
    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("val", n_val)):
        start = rng.integers(0, vocab, size=n)
        ids = (np.cumsum(np.ones(n, dtype=np.int64)) + start[0]) % vocab
        noise = rng.random(n) < 0.1
        ids[noise] = rng.integers(0, vocab, size=int(noise.sum()))
        ids.astype(np.uint16).tofile(data_dir / f"{name}.bin")
    return data_dir


def copy_of_the_op_build(extensions: Path) -> Path:
    """A private $TORCH_EXTENSIONS_DIR with a copy of the suite's builds of DeepSpeed's CPU ops (the
    all-reduce and CPU Adam), timestamps kept so torch finds them up to date; empty where there is
    none yet (the process under test then builds it). Returns the all-reduce op's build directory."""
    for op in (OP, "cpu_adam"):
        built = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / op
        if built.is_dir():
            shutil.copytree(built, extensions / op)
    (extensions / OP).mkdir(parents=True, exist_ok=True)
    return extensions / OP


def two_step_args(tmp_path: Path) -> list[str]:
    """The trainer's options for a 1-layer model, 2 iterations on TMP/data (written here), into TMP/out."""
    data = write_token_bins(tmp_path / "data")
    return ["--deepspeed_config", "ds_configs/zero1.json", "--data_dir", str(data), "--out_dir", str(tmp_path / "out"),
            "--n_layer", "1", "--n_head", "1", "--n_embd", "16", "--block_size", "32", "--vocab_size", "512",
            "--dtype", "float32", "--compile", "False", "--micro_batch_size", "2", "--gradient_accumulation_steps",
            "1", "--max_iters", "2", "--eval_iters", "1"]


def two_step_run(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The trainer as one rank with no launcher (`python -m ds_gpt.train`, forked: see
    forked_train) and exactly the environment `env`, with `two_step_args`; for tests of what
    happens around DeepSpeed's start-up (its op build, PATH). Output, rank 0's, as stdout."""
    return forked_train(1, *two_step_args(tmp_path), log_dir=tmp_path / "logs", expect=None, env=env)


TINY_RUN_TOKENIZER = {"tokenizer": "gpt2", "tokenizer_sha256": "0123456789abcdef" * 4}  # the tiny_run fixture's data


def tiny_run_args(root: Path, out: Path, zero_stage: int = 1, ranks: int = 1) -> list[str]:
    """The tiny_run fixture's options (no --max_iters, no --init_from), into `out`, on ROOT/data; its
    global batch of 2 over `ranks` (1 or 2)."""
    return ["--deepspeed_config", f"ds_configs/zero{zero_stage}.json", "--data_dir", str(root / "data"),
            "--out_dir", str(out), "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32",
            "--vocab_size", "512", "--dtype", "float32", "--compile", "False", "--micro_batch_size", str(2 // ranks),
            "--gradient_accumulation_steps", "1", "--eval_interval", "2", "--eval_iters", "2", "--log_interval", "1",
            "--checkpoint_interval", "2", "--keep_last", "2", "--learning_rate", "3e-3", "--warmup_iters", "1"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def consolidated(tag_dir: Path) -> tuple[dict, int]:
    """A tag's fp32 masters and optimizer state, full size by parameter name ({key: {name: tensor}}, the
    keys of ds_gpt.elastic.STATES), read from any layout by elastic.SavedTag; and AdamW's step count."""
    from ds_gpt import elastic

    saved = elastic.SavedTag(tag_dir, json.loads((tag_dir / "ds_gpt_complete.json").read_text())["model_args"])
    return {key: saved.tensors(key) for key in elastic.STATES}, saved.step()


def relative_gap(a: dict, b: dict) -> float:
    """max over tensors of |a - b| / |a| (Frobenius norms)."""
    return max(float((a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-30)) for n in a)


def free_port() -> int:
    """A port for a run's rendezvous, below the kernel's ephemeral range: a port the kernel hands
    out for bind(0) can be taken again by gloo's own outgoing connections before the launcher binds it."""
    low, _ = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


# --- the trainer, launched as users launch it ----------------------------------------------

DEEPSPEED = str(VENV_BIN / "deepspeed")
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32", "--vocab_size", "512",
        "--dtype", "float32", "--compile", "False", "--micro_batch_size", "2", "--eval_interval", "10",
        "--eval_iters", "2", "--log_interval", "1", "--checkpoint_interval", "10", "--warmup_iters", "2",
        "--lr_decay_iters", "20", "--learning_rate", "3e-3", "--max_iters", "20"]


def train_cmd(nproc: int, *args: str) -> list[str]:
    """The user's command: the deepspeed launcher with N local ranks (CPU processes here)."""
    return [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()), "ds_gpt/train.py", *args]


def train(nproc: int, *args: str, expect: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(nproc, *args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@contextlib.contextmanager
def background_train(nproc: int, *args: str, **popen):
    """A training job in its own session, killed with its ranks if the test fails early."""
    proc = subprocess.Popen(train_cmd(nproc, *args), cwd=REPO_ROOT, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def losses(out_dir: Path) -> dict[int, float]:
    """Per-iteration training loss; after a restart the latest record of an iteration wins."""
    return {r["iter"]: r["loss"] for r in read_jsonl(out_dir / "metrics.jsonl") if "loss" in r and "event" not in r}


# --- the trainer's ranks, forked from a preloaded server --------------------------------------
#
# A run through the launcher spends ~13 s on this 2-core machine before its first step: the
# launcher and its per-node agent each import DeepSpeed, then every rank imports torch, DeepSpeed
# and (inside deepspeed.initialize: the optimizer, ZeRO's optimizer check) torch._dynamo and
# inductor. A 20-iteration test run trains for 1 s. Where the launcher is not what a test is
# about (loss parity, resume exactness, checkpoints, the elastic matrix), its ranks are instead
# forked from one server that imported all that once per session (multiprocessing's forkserver,
# which never runs a torch op, so no thread pool is forked): each rank is a real process running
# the trainer's own entry point with the environment torchrun would give it, over gloo as
# always. Tests of the launcher itself, signals through it, exit codes and the cluster keep
# `train()` and `background_train()` above.

FORKSERVER_PRELOAD = ["torch", "torch._dynamo", "torch._inductor.compile_fx", "deepspeed",
                      "deepspeed.runtime.zero.muon.muon_optimizer", "ds_gpt.train", "ds_gpt.startup",
                      "ds_gpt.engine", "ds_gpt.checkpoint", "ds_gpt.elastic"]
_forkserver: multiprocessing.context.BaseContext | None = None


def _context() -> multiprocessing.context.BaseContext:
    global _forkserver
    if _forkserver is None:
        _forkserver = multiprocessing.get_context("forkserver")
        _forkserver.set_forkserver_preload(FORKSERVER_PRELOAD)
    return _forkserver


def _run_rank(args: list[str], env: dict[str, str], log: str, prelude: Callable[[], None] | None,
              entry: Callable[[], None] | None) -> None:
    """A forked rank: `python ds_gpt/train.py ARGS` in its own session, output to `log`; `prelude`
    (a picklable callable, e.g. tests/nan_injection.py's fault) runs first. With `entry` (a
    script's main(), reading sys.argv), the rank runs that instead of the trainer."""
    os.setsid()  # like start_new_session: a kill of the run reaches the rank's own children too
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO_ROOT)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if "OMP_NUM_THREADS" in env:  # the server loaded torch before this environment existed
        import torch
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = ["ds_gpt/train.py" if entry is None else entry.__module__, *args]
    if prelude is not None:
        prelude()
    if entry is not None:
        entry()
        return
    from ds_gpt.errors import run_cli
    from ds_gpt.train import guarded_main
    run_cli(guarded_main, prog="ds_gpt.train", skip_teardown=True)


class Ranks:
    """One run's ranks forked from the server, with the part of Popen's interface the tests use.

    One rank runs as `python -m ds_gpt.train` would (no rank variables); several get RANK,
    LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as torchrun sets them.
    The run's exit code is the first non-zero rank's, in rank order (0 when all are 0).
    """

    def __init__(self, nproc: int, args: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 prelude: Callable[[], None] | None = None, entry: Callable[[], None] | None = None):
        self.port = port = str(free_port())
        base = {**(os.environ if env is None else env), "MASTER_PORT": port}  # `env` replaces, as in Popen
        self.logs = [log_dir / f"rank{rank}.log" for rank in range(nproc)]
        self.procs = []
        for rank, log in enumerate(self.logs):
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("")
            rank_env = base if nproc == 1 else {
                **base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1"}
            proc = _context().Process(target=_run_rank, args=(args, rank_env, str(log), prelude, entry))
            proc.start()
            self.procs.append(proc)
        self.pids = [proc.pid for proc in self.procs]
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if any(proc.exitcode is None for proc in self.procs):
            return None
        codes = [proc.exitcode for proc in self.procs]
        self.returncode = next((code for code in codes if code), 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        for proc in self.procs:
            proc.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self.poll() is None:
            raise subprocess.TimeoutExpired("forked ranks", timeout)
        return self.returncode

    def signal(self, sig: int, rank: int | None = None) -> None:
        """`sig` to one rank's session, or to every rank's (as a kill of the launcher's group would)."""
        for pid in self.pids if rank is None else [self.pids[rank]]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)

    def output(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs)


def forked_train(nproc: int, *args: str, log_dir: Path, expect: int | None = 0, timeout: int = 300,
                 **ranks_kw) -> subprocess.CompletedProcess:
    """The trainer's ranks forked from the preloaded server; rank outputs (in order) as stdout."""
    with forked_background_train(nproc, *args, log_dir=log_dir, **ranks_kw) as ranks:
        ranks.wait(timeout)
    output = ranks.output()
    assert expect is None or ranks.returncode == expect, f"exit {ranks.returncode}, not {expect}:\n{output[-6000:]}"
    result = subprocess.CompletedProcess(["forked ds_gpt/train.py", *args], ranks.returncode, output, "")
    result.rank_codes = [proc.exitcode for proc in ranks.procs]  # every rank's own exit code
    result.master_port = ranks.port
    return result


@contextlib.contextmanager
def forked_background_train(nproc: int, *args: str, log_dir: Path, **ranks_kw):
    """Forked ranks that run while the test acts; killed, with their children, if it fails early."""
    ranks = Ranks(nproc, list(args), log_dir, **ranks_kw)
    try:
        yield ranks
    finally:
        if ranks.poll() is None:
            ranks.signal(signal.SIGCONT)
            ranks.signal(signal.SIGKILL)
            ranks.wait()


def forked_script(nproc: int, entry: Callable[[], None], *args: str, log_dir: Path, timeout: int = 600,
                  env: dict[str, str] | None = None) -> str:
    """A test script's main() (module-level, reading sys.argv) in `nproc` forked ranks, as
    `deepspeed --num_gpus N script.py ARGS` or, for one, `python script.py ARGS` would run it;
    it must exit 0. Returns the ranks' output."""
    with forked_background_train(nproc, *args, log_dir=log_dir, env=env, entry=entry) as ranks:
        ranks.wait(timeout)
    assert ranks.returncode == 0, f"{entry.__module__} exited {ranks.returncode}:\n{ranks.output()[-6000:]}"
    return ranks.output()
