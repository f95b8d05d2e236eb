"""Shared test fixtures. Add fixtures by appending; keep each one small and documented."""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ds_gpt.ops import OP, put_venv_ninja_first

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
VENV_BIN = Path(PYTHON).parent  # the venv's deepspeed, torchrun, mpirun and ninja

# One cache for every test process and rank: JIT-built DeepSpeed ops, tiktoken ranks, corpora.
os.environ.setdefault("DS_GPT_CACHE", str(REPO_ROOT / ".cache"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(os.environ["DS_GPT_CACHE"]) / "torch_extensions"))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(os.environ["DS_GPT_CACHE"]) / "tiktoken"))
# Tests that start DeepSpeed in-process (not through the trainer) load its ops too: with the
# same ninja as every run (see ds_gpt.ops), or each switch between two ninjas recompiles them.
put_venv_ninja_first()


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


@pytest.fixture
def token_bins(tmp_path: Path) -> Path:
    """A fresh synthetic corpus directory (train.bin, val.bin; no meta.json, like nanoGPT's)."""
    return write_token_bins(tmp_path / "data")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _run_or_fail(*args: str) -> None:
    import subprocess
    proc = subprocess.run([PYTHON, *args], capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode:
        pytest.fail(f"python {' '.join(args)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="session")
def gpt2_ranks() -> Path:
    """The offline GPT-2 ranks (`python -m ds_gpt.assets`: instant when already provisioned)."""
    from ds_gpt.assets import ensure_gpt2_ranks
    return ensure_gpt2_ranks()


@pytest.fixture(scope="session")
def shakespeare_data() -> Path:
    """<cache>/test-data/shakespeare as `make demo` prepares data/shakespeare (train.bin, val.bin,
    meta.json; 1.57 M tokens). Built once; later sessions reuse it (prepare's re-run is a no-op)."""
    out = Path(os.environ["DS_GPT_CACHE"]) / "test-data" / "shakespeare"
    _run_or_fail("-m", "ds_gpt.assets")
    _run_or_fail("-m", "ds_gpt.prepare", "--dataset", "shakespeare", "--out_dir", str(out),
                 "--cache_dir", str(out.parent / "hf-datasets"))
    return out


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
