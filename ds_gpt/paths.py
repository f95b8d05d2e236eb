"""Where the project keeps its files: the repo root and the ignored cache dir.

The cache (tiktoken ranks, registry sdists, DeepSpeed's JIT-built ops, the CPU peak probe)
lives inside the checkout by default so that CI, `make` and every rank agree on it;
DS_GPT_CACHE moves it (e.g. to scratch space on a cluster).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    return Path(os.environ.get("DS_GPT_CACHE") or REPO_ROOT / ".cache")


def repo_path(path: str | os.PathLike) -> Path:
    """A path as given if it exists from the cwd, else relative to the repo root.

    Lets `python -m ds_gpt.train` find `ds_configs/zero1.json` from any directory.
    """
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    candidate = REPO_ROOT / p
    return candidate if candidate.exists() else p
