"""What the tests share: paths, small corpora, free ports, the trainer as users launch it.

One module, imported by the test files (`from helpers import ...`); fixtures live in conftest.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
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


def two_step_single_process_run(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m ds_gpt.train` as one plain process (no launcher): a 1-layer model, 2 iterations on
    TMP/data, into TMP/out; for tests of what happens around DeepSpeed's start-up."""
    data = write_token_bins(tmp_path / "data")
    return subprocess.run(
        [PYTHON, "-m", "ds_gpt.train", "--deepspeed_config", "ds_configs/zero1.json", "--data_dir", str(data),
         "--out_dir", str(tmp_path / "out"), "--n_layer", "1", "--n_head", "1", "--n_embd", "16", "--block_size", "32",
         "--vocab_size", "512", "--dtype", "float32", "--compile", "False", "--micro_batch_size", "2",
         "--gradient_accumulation_steps", "1", "--max_iters", "2", "--eval_iters", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, env=env)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
