"""DeepSpeed's JIT-compiled ops: the ninja that builds them, and the CPU op compiled at set-up.

    python -m ds_gpt.ops      # what `make setup` runs; a second run only loads the build

torch builds and loads an op by running `ninja` from PATH. The pip `ninja` that DeepSpeed
depends on sits next to this interpreter, which is not on PATH when the venv is not activated
(`.venv/bin/deepspeed ...`, `srun .venv/bin/python ...`). The run then fails to load its ops
("ninja not being installed"), or uses a system ninja of another version, which records builds
differently, so that the cache recompiles whenever runs alternate between the two.
`put_venv_ninja_first` is called before anything loads an op.

On CPU, DeepSpeed's communication backend compiles its shared-memory all-reduce
(deepspeed_shm_comm) into $TORCH_EXTENSIONS_DIR the first time a process starts it: about 40 s
on 2 cores, during which the first training run's ranks wait on torch's build lock and
print nothing. Compiling it here keeps that out of the first run (and out of a job's time
limit). DeepSpeed's CPU Adam (cpu_adam), which ZeRO-Offload configs step with, is compiled
here too: about 3 minutes on 2 cores, which would otherwise fall silently on the first offload
run. Its build uses -march=native: nodes of different CPU types need caches of their own
(TORCH_EXTENSIONS_DIR). A CUDA build of torch (a GPU install) needs no CPU op: there this command builds nothing
and DeepSpeed compiles fused Adam at the first GPU run, which has the environment that build needs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from ds_gpt import atomic, build_locks
from ds_gpt.errors import UserError, run_cli

OP = "deepspeed_shm_comm"
# Written into the extensions directory once both ops have loaded: what they were loaded with
# and each build's size and mtime. A later `make setup` that finds all of it unchanged (and no
# build lock) has nothing to check and skips importing torch and DeepSpeed: 4 s per `make`.
RECEIPT = ".ds_gpt-ops.json"


def put_venv_ninja_first() -> None:
    """Put this interpreter's scripts directory first on PATH when it holds the `ninja` that
    PATH would not find first. Processes started from here (ranks, compilers) inherit it."""
    scripts = Path(sysconfig.get_path("scripts"))
    if not (scripts / "ninja").is_file():
        return
    found = shutil.which("ninja")
    if found is None or not os.path.samefile(found, scripts / "ninja"):
        entries = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry]
        os.environ["PATH"] = os.pathsep.join([str(scripts), *entries])


def compiler() -> tuple[str, str | None]:
    """The C++ compiler torch builds ops with ($CXX, else c++), and where PATH finds it (None: nowhere)."""
    cxx = os.environ.get("CXX") or "c++"
    return cxx, shutil.which(cxx)


def build_failure(err: BaseException, name: str, root: Path) -> UserError:
    """One line for an op that did not compile: the compiler when it is missing, else the build's last words."""
    cxx, found = compiler()
    if found is None:
        source = "$CXX" if os.environ.get("CXX") else "the default"
        return UserError(f"compiling DeepSpeed's {name} op under {root} failed: the C++ compiler {cxx} ({source}) "
                         "is not installed or not on PATH",
                         hint="unset CXX or point it at an installed g++ (with OpenMP), then run "
                              "python -m ds_gpt.ops once to build the op before a run")
    lines = [line for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    # ninja's summary is the last line; the compiler's own error is the line before "ninja: build stopped".
    cause = next((line for line in reversed(lines) if "error" in line.lower() and "ninja" not in line), lines[-1])
    return UserError(f"compiling DeepSpeed's {name} op under {root} with {found} failed: {cause.strip()[:300]}",
                     hint="install a C++ compiler with OpenMP (g++; CPU runs need this op), then run "
                          "python -m ds_gpt.ops once to build it")


@contextlib.contextmanager
def build_errors_reported() -> Iterator[None]:
    """Around DeepSpeed's calls that build ops on first use: a failed build becomes one line (UserError)."""
    try:
        yield
    except (RuntimeError, OSError) as err:
        match = re.search(r"Error building extension '([^']+)'", str(err))
        if match is None:
            raise
        raise build_failure(err, match.group(1), build_locks.extension_root()) from None


def _build(name: str, build, root: Path):
    try:
        return build()
    except (RuntimeError, OSError) as err:  # torch's "Error building extension", a missing compiler
        raise build_failure(err, name, root) from err


def _loaded_with(root: Path) -> dict:
    """What a load of the ops depends on, read without importing torch (receipt: RECEIPT)."""
    from importlib.metadata import version

    builds = {}
    for so in sorted(root.glob("*/*.so")):
        stat = so.stat()  # once: size and mtime of the same file
        builds[str(so.relative_to(root))] = [stat.st_size, stat.st_mtime_ns]
    return {"torch": version("torch"), "deepspeed": version("deepspeed"), "venv": os.path.realpath(sys.prefix),
            "cxx": os.environ.get("CXX", ""), "builds": builds}


def already_loaded(root: Path) -> bool:
    """True when the receipt matches the venv and builds as they are now, and no build holds a lock."""
    try:
        receipt = json.loads((root / RECEIPT).read_text())
    except (OSError, ValueError):
        return False
    return receipt == _loaded_with(root) and bool(receipt["builds"]) and not build_locks.build_locks(root)


def write_receipt(root: Path) -> None:
    atomic.write_text(root / RECEIPT, json.dumps(_loaded_with(root)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds_gpt.ops", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    given_root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if given_root and already_loaded(Path(given_root)):
        print(f"ds_gpt.ops: {OP} and cpu_adam ready under {given_root} (loaded before; builds unchanged)")
        return 0
    # Imported here, not at the top: deepspeed takes seconds to import, and --help should not.
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op
    from deepspeed.ops.op_builder import CPUAdamBuilder

    put_venv_ninja_first()
    accelerator = get_accelerator().device_name()
    if torch.version.cuda is not None or accelerator != "cpu":
        # A CUDA torch is a GPU install (on a login node DeepSpeed still reports "cpu"): its runs
        # never load the CPU op, so compiling it would only cost time and need a compiler here.
        print(f"ds_gpt.ops: torch {torch.__version__}, accelerator {accelerator}: nothing to build; "
              f"DeepSpeed compiles what GPU runs need at the first run")
        return 0
    root = build_locks.extension_root()
    print(f"ds_gpt.ops: DeepSpeed's CPU ops ({OP}, cpu_adam) under {root}: loaded when built, else compiled "
          f"now, once for this cache (about 4 minutes on 2 cores; each compile says so)", flush=True)
    t0 = time.perf_counter()
    watcher = build_locks.watch()  # a build killed earlier must not leave this command waiting forever
    try:
        # DeepSpeed's own entry points: the same builders, flags and cache directory as a run's.
        op = _build(OP, build_shm_op, root)
        _build("cpu_adam", lambda: CPUAdamBuilder().load(verbose=False), root)
    finally:
        watcher.stop()
    if op is None:
        print("ds_gpt.ops: DeepSpeed has no shared-memory all-reduce for this CPU; nothing to build")
    else:
        write_receipt(root)
        print(f"ds_gpt.ops: {OP} and cpu_adam ready under {root} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.ops")
