"""Checkpoints that a crash, a full disk or a pre-emption cannot corrupt.

Layout in OUT/: one DeepSpeed checkpoint per tag `global_step{N}/`, and the pointer file `latest`
naming the newest complete one (the name DeepSpeed's loader and zero_to_fp32 look for).

DeepSpeed's save writes shards under their final names and writes `latest` before every rank
has finished, so a crash can leave `latest` naming a half-written tag. We save with
save_latest=False, wait for every rank, and only then mark the tag complete and move the
pointer (temp file, fsync, os.replace). Old tags are pruned only after that.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ds_gpt import atomic
from ds_gpt.errors import UserError

POINTER = "latest"
MARKER = "ds_gpt_complete.json"
TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(iter_num: int) -> str:
    return f"global_step{iter_num}"


def iter_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class CheckpointInfo:
    tag: str
    iter_num: int
    marker: dict  # model_args, world_size, zero_stage, dtype as written at save time


def read_marker(out_dir: Path, tag: str) -> dict | None:
    try:
        return json.loads((out_dir / tag / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def complete_checkpoints(out_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints in OUT, oldest first."""
    found = []
    if out_dir.is_dir():
        for entry in out_dir.iterdir():
            n = iter_of(entry.name)
            marker = read_marker(out_dir, entry.name) if n is not None else None
            if marker is not None:
                found.append(CheckpointInfo(entry.name, n, marker))
    return sorted(found, key=lambda c: c.iter_num)


def partial_tags(out_dir: Path) -> list[str]:
    """Tag directories no completion marker vouches for: a crash mid-save, or one in progress."""
    if not out_dir.is_dir():
        return []
    return [e.name for e in out_dir.iterdir() if iter_of(e.name) is not None and read_marker(out_dir, e.name) is None]


def find_latest(out_dir: Path) -> CheckpointInfo | None:
    """The checkpoint to resume from: the pointer's, if complete, else the newest complete one."""
    pointer = out_dir / POINTER
    if pointer.exists():
        tag = pointer.read_text().strip()
        marker = read_marker(out_dir, tag)
        if marker is not None and iter_of(tag) is not None:
            return CheckpointInfo(tag, iter_of(tag), marker)
        warnings.warn(f"{pointer} names {tag!r}, which is not a complete checkpoint; looking for an older one")
    complete = complete_checkpoints(out_dir)
    newest = complete[-1] if complete else None
    skipped = [t for t in partial_tags(out_dir) if newest is None or iter_of(t) > newest.iter_num]
    if skipped:
        warnings.warn(f"skipping incomplete checkpoint(s) {', '.join(sorted(skipped))} in {out_dir}")
    return newest


def tags_to_prune(iters: list[int], keep_last: int, milestones: set[int], milestone_every: int) -> list[int]:
    """Which complete checkpoints retention drops: all but the newest `keep_last` and milestones."""
    newest = sorted(iters)[-keep_last:]
    keep = set(newest) | {i for i in iters if i in milestones or (milestone_every and i > 0 and i % milestone_every == 0)}
    return sorted(i for i in iters if i not in keep)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_failed(err: BaseException) -> bool:
    """Did `err` come from writing a file (a full disk, a quota, an I/O error), not from a collective?

    Plain writes raise OSError; torch.save's zip writer, which DeepSpeed uses for every shard,
    turns ENOSPC into a RuntimeError ("unexpected pos ..."), recognised by where it was raised.
    """
    if isinstance(err, OSError):
        return True
    return isinstance(err, RuntimeError) and any(
        Path(frame.f_code.co_filename).parts[-2:] == ("torch", "serialization.py")
        for frame, _ in traceback.walk_tb(err.__traceback__))


def save(engine, out_dir: Path, iter_num: int, client_state: dict, marker: dict, *, rank: int,
         all_reduce_sum, barrier, keep_last: int, milestones: set[int], milestone_every: int) -> str:
    """Save on every rank; the tag becomes visible only once all ranks have written it.

    `all_reduce_sum`/`barrier` come from ds_gpt.engine (passed in so this module stays testable).
    A failed write on any rank (full disk, quota) leaves the previous checkpoint as the
    pointer's target and the partial tag removed, and every rank raises the same UserError.
    """
    tag = tag_for(iter_num)
    if rank == 0:  # re-saving into an existing tag: a crash mid-way must not leave it marked complete
        (out_dir / tag / MARKER).unlink(missing_ok=True)
    error, shards_saved = None, False
    try:
        engine.save_checkpoint(str(out_dir), tag=tag, client_state=client_state, save_latest=False)
        shards_saved = True
        # per-rank RNG: DeepSpeed's client_state is written by rank 0 only
        torch.save(rng_state(), out_dir / tag / f"rng_rank{rank}.pt")
    except Exception as err:
        if not write_failed(err):
            raise
        error = err
        if not shards_saved:
            # DeepSpeed's save ends in a barrier, after its last write, which the ranks whose writes
            # succeeded are waiting in: join it, or they wait there until --pg_timeout and never
            # hear of the failure. (Its other collectives come before the first write.)
            barrier()
    failed = all_reduce_sum([1.0 if error else 0.0])[0]
    if failed:
        if rank == 0:
            shutil.rmtree(out_dir / tag, ignore_errors=True)
        barrier()  # the partial tag is gone before any rank exits (a launcher then kills the rest)
        previous = find_latest(out_dir)
        cause = f"rank {rank}: {str(error).strip().splitlines()[0]}" if error else "see the failing rank's error"
        free_gb = shutil.disk_usage(out_dir).free / 2**30
        raise UserError(f"saving checkpoint {tag} failed on {int(failed)} rank(s): {cause}; {free_gb:.1f} GiB free "
                        f"under {out_dir}; {'the previous checkpoint ' + previous.tag + ' is intact' if previous else 'no earlier checkpoint exists'}",
                        hint="free disk space under --out_dir and resume with --init_from resume")
    barrier()
    if rank == 0:
        atomic.write_text(out_dir / tag / MARKER, json.dumps({"iter_num": iter_num, **marker}, indent=1))
        atomic.write_text(out_dir / POINTER, tag)
        complete = [c.iter_num for c in complete_checkpoints(out_dir)]
        for n in tags_to_prune(complete, keep_last, milestones, milestone_every):
            shutil.rmtree(out_dir / tag_for(n), ignore_errors=True)
        for name in partial_tags(out_dir):  # left by earlier crashes
            if iter_of(name) < iter_num:
                shutil.rmtree(out_dir / name, ignore_errors=True)
    barrier()
    return tag


def load(engine, out_dir: Path, info: CheckpointInfo, *, rank: int) -> dict:
    """Restore weights, optimizer and this rank's RNG; return the client state."""
    _, client_state = engine.load_checkpoint(str(out_dir), tag=info.tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
    if client_state is None:
        raise UserError(f"{out_dir / info.tag} could not be loaded", hint="check the run's log; resume from an older tag")
    rng_path = out_dir / info.tag / f"rng_rank{rank}.pt"
    if rng_path.exists():
        set_rng_state(torch.load(rng_path, weights_only=False))
    return client_state


def check_resumable(info: CheckpointInfo, world_size: int, zero_stage: int) -> None:
    """Refuse, before building anything, a resume DeepSpeed would fail at."""
    saved = info.marker
    if saved["world_size"] != world_size or saved["zero_stage"] != zero_stage:
        raise UserError(
            f"checkpoint {info.tag} was written by {saved['world_size']} rank(s) at ZeRO-{saved['zero_stage']}; this run has "
            f"{world_size} rank(s) at ZeRO-{zero_stage}, and DeepSpeed cannot load ZeRO optimizer shards across that change",
            hint=f"relaunch with the same ranks and stage, or start from its weights with a fresh optimizer: "
                 f"--init_from weights:{info.marker.get('out_dir', 'OUT')}/{info.tag} --out_dir NEW_OUT")


def resolve_tag(out_dir: Path, tag: str | None) -> str:
    if tag is None:
        info = find_latest(out_dir)
        if info is None:
            raise UserError(f"no complete checkpoint in {out_dir}", hint="train first, or pass --out_dir of a run")
        return info.tag
    if not (out_dir / tag).is_dir():
        raise UserError(f"no checkpoint {tag} in {out_dir}", hint=f"ls {out_dir} lists the global_step* tags")
    return tag


def load_fp32_state_dict(out_dir: str | Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Consolidated fp32 weights of any ZeRO stage, plus the client state, on CPU, with no launcher.

    ZeRO 1-3 keep fp32 master weights in per-rank optimizer shards; DeepSpeed's zero_to_fp32
    gathers them. ZeRO-0 in fp32 keeps the full weights in the model-states file itself.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out_dir = Path(out_dir)
    tag = resolve_tag(out_dir, tag)
    # ZeRO-3 prefixes the model-states file with the data-parallel rank; rank 0's carries the client state.
    states_file = next((p for p in (out_dir / tag / "mp_rank_00_model_states.pt",
                                    out_dir / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt") if p.exists()), None)
    if states_file is None:
        raise UserError(f"{out_dir / tag} has no model-states file: not a complete DeepSpeed checkpoint")
    states = torch.load(states_file, map_location="cpu", weights_only=False)
    skip = {"module", "optimizer", "lr_scheduler", "buffer_names", "param_shapes", "frozen_param_shapes",
            "frozen_param_fragments", "shared_params", "ds_config", "ds_version", "csr_tensor_module_names",
            "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "data_sampler",
            "random_ltd", "sparse_tensor_module_names"}
    client_state = {k: v for k, v in states.items() if k not in skip}
    has_zero_shards = any((out_dir / tag).glob("*zero_pp_rank_*optim_states.pt"))
    if has_zero_shards:
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(out_dir), tag=tag)
    else:
        state_dict = {k: v.float() for k, v in states["module"].items()}
    return {k: v.float() for k, v in state_dict.items()}, client_state
