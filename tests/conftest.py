"""Shared test fixtures. Add fixtures by appending; keep each one small and documented."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import REPO_ROOT, TINY_RUN_TOKENIZER, tiny_run_args, write_token_bins

from ds_gpt.ops import put_venv_ninja_first

# One cache for every test process and rank: JIT-built DeepSpeed ops, tiktoken ranks, corpora.
os.environ.setdefault("DS_GPT_CACHE", str(REPO_ROOT / ".cache"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(os.environ["DS_GPT_CACHE"]) / "torch_extensions"))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(os.environ["DS_GPT_CACHE"]) / "tiktoken"))
# Two test workers share the machine's cores (pytest.ini: -n 2): each process they start gets
# one OpenMP thread, as the trainer gives each of several ranks on a node its share (engine.py),
# so that the workers' threads do not spin against each other.
# Set before anything here imports torch, which reads it then.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests that start DeepSpeed in-process (not through the trainer) load its ops too: with the
# same ninja as every run (see ds_gpt.ops), or each switch between two ninjas recompiles them.
put_venv_ninja_first()


@pytest.fixture(scope="session", autouse=True)
def set_up_op_builds_stay_as_built():
    """No test may rebuild the set-up's DeepSpeed ops in the shared cache: a rebuild costs every
    process that loads the op next about 30 s (tests that need a build use a private directory)."""
    def builds() -> dict[str, int]:
        return {str(so): so.stat().st_mtime_ns for so in Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("*/*.so")}

    before = builds()
    yield
    after = builds()
    rebuilt = sorted(so for so in before.keys() | after.keys() if after.get(so) != before.get(so))
    assert not rebuilt, f"the suite rebuilt DeepSpeed ops in the shared cache: {rebuilt}"


@pytest.fixture
def token_bins(tmp_path: Path) -> Path:
    """A fresh synthetic corpus directory (train.bin, val.bin; no meta.json, like nanoGPT's)."""
    return write_token_bins(tmp_path / "data")


@pytest.fixture(scope="session")
def gpt2_ranks() -> Path:
    """The offline GPT-2 ranks (`python -m ds_gpt.assets`: instant when already provisioned)."""
    from ds_gpt.assets import ensure_gpt2_ranks
    return ensure_gpt2_ranks()


@pytest.fixture(scope="session")
def gpt2_files() -> list[Path]:
    """GPT-2's vocab.bpe and encoder.json in the tiktoken cache (`python -m ds_gpt.assets`)."""
    from ds_gpt.assets import ensure_gpt2_files
    return ensure_gpt2_files()


@pytest.fixture(scope="session")
def shakespeare_data() -> Path:
    """<cache>/test-data/shakespeare as `make demo` prepares data/shakespeare (train.bin, val.bin,
    meta.json; 1.57 M tokens). Built once; later sessions reuse it (prepare's re-run is a no-op).
    Both commands run in this process (their main()): no interpreter start-ups for two no-ops."""
    from ds_gpt import assets, prepare

    out = Path(os.environ["DS_GPT_CACHE"]) / "test-data" / "shakespeare"
    assert assets.main([]) == 0
    assert prepare.main(["--dataset", "shakespeare", "--out_dir", str(out), "--cache_dir",
                         str(out.parent / "hf-datasets")]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One real trainer run, shared read-only (copy it before changing anything): one forked rank,
    ZeRO-1 fp32, a 2-layer d=64 model, 4 iterations, eval and checkpoint every 2 (global_step2 and
    global_step4 kept). RUN/data holds its bins and a meta.json naming a tokenizer (TINY_RUN_TOKENIZER);
    RUN/out is the run directory."""
    import json

    from helpers import forked_train

    root = tmp_path_factory.mktemp("tiny_run")
    data = write_token_bins(root / "data")
    (data / "meta.json").write_text(json.dumps({**TINY_RUN_TOKENIZER, "vocab_size": 512}))
    forked_train(1, *tiny_run_args(root, root / "out"), "--max_iters", "4", log_dir=root / "logs")
    return root



@pytest.fixture
def mounts():
    """tmpfs mounts for the test (fs_faults.Mounts: small real filesystems), all unmounted when it ends."""
    import fs_faults

    yield from fs_faults.mounted()


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """The trainer's main() installs its graceful-stop handlers (and ignores SIGTERM once a stop is
    decided) for the rest of its process, which is right for a rank; an in-process test would leave
    them to the tests after it, whose forked pool workers then outlive Pool.terminate() and whose
    subprocesses inherit an ignored SIGTERM. Each test gets back the handlers it started with."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


# The tests that must run one after another in one worker (pytest.ini starts two, pytest-xdist):
# the cluster tests share one local SLURM cluster (its set-up is not safe to run twice at once),
# and the docs pages run in reading order in one shared copy of the repository.
SERIAL = ("tests/cluster/", "tests/test_docs.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's load-by-scope scheduling, with SERIAL as one scope and every other test its own.
    (Its `loadgroup` marks do not reach the scheduler under pytest 9, whose node ids ignore them.)"""
    from xdist.scheduler import LoadScopeScheduling

    class OneSerialScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "serial" if nodeid.startswith(SERIAL) else nodeid

    return OneSerialScope(config, log)
