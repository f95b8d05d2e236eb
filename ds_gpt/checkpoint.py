"""Checkpoints that a crash, a full disk, a damaged file or a pre-emption cannot corrupt.

Layout in OUT/: one DeepSpeed checkpoint per tag `global_step{N}/`, and the pointer file `latest`
naming the newest complete one (the name DeepSpeed's loader and zero_to_fp32 look for).

DeepSpeed's save writes shards under their final names and writes `latest` before every rank
has finished, so a crash can leave `latest` naming a half-written tag. We save with
save_latest=False, wait for every rank, record every file of the tag with its size and sha256
in the completion marker (written last, by rename), and only then move the pointer. Old tags
are pruned only after that.

Resume takes the newest tag whose marker vouches for it and whose files still match it: a
truncated, missing or altered file (a dying node, a bad disk) makes it fall back to the next
older tag, with one warning naming the file. The pointer is not trusted for this: a kill
between the marker and the pointer leaves a newer complete tag that the pointer does not name.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ds_gpt import atomic, elastic, safe_load
from ds_gpt.collectives import Collectives
from ds_gpt.config import is_count
from ds_gpt.errors import UserError, maybe_full, write_hint
from ds_gpt.fileset import file_digest

if TYPE_CHECKING:
    from ds_gpt.run_config import RunConfig

POINTER = "latest"
MARKER = "ds_gpt_complete.json"
TAG_RE = re.compile(r"^global_step(\d+)$")
MARKER_KEYS = ("iter_num", "model_args", "world_size", "zero_stage", "dtype")
RESUME_HINT = "free disk space under --out_dir and resume with --init_from resume"


def tag_for(iter_num: int) -> str:
    return f"global_step{iter_num}"


def iter_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class CheckpointInfo:
    tag: str
    iter_num: int
    marker: dict  # model_args, world_size, zero_stage, dtype, files as written at save time


@dataclass
class TrainState:
    """The loop's counters, saved in every checkpoint's client state."""

    iter_num: int = 0
    best_val_loss: float = float("inf")
    tokens_seen: int = 0  # carried, not recomputed: the batch size may change across a resume

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, client: dict, tokens_per_iter: int) -> None:
        self.iter_num, self.best_val_loss = int(client["iter_num"]), float(client["best_val_loss"])
        # checkpoints written before the count was carried: the batch size has not changed since
        self.tokens_seen = int(client.get("tokens_seen", self.iter_num * tokens_per_iter))


# -----------------------------------------------------------------------------
# finding a checkpoint to trust


def read_marker(out_dir: Path, tag: str) -> dict | None:
    """The tag's completion marker, or None when there is none or it is not one of ours."""
    try:
        marker = json.loads((out_dir / tag / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or any(k not in marker for k in ("iter_num", "model_args")):
        return None
    return marker


def tag_files(tag_dir: Path) -> list[str]:
    """Every file of a tag but the marker, as paths relative to the tag, sorted."""
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != MARKER)


def marker_problem(marker: dict) -> str | None:
    """What in a completion marker is not of the shape a save writes (what resume, sample and export
    read from it), or None. Checked here once, so no reader meets a string where a number belongs."""
    args = marker.get("model_args")
    if not isinstance(args, dict):
        return f"its model_args is {type(args).__name__}, not an object"
    bad = [k for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd") if not is_count(args.get(k))]
    if bad:
        return f"its model_args lack a positive {', '.join(bad)}"
    if not is_count(marker.get("world_size")):
        return f"its world_size is {json.dumps(marker.get('world_size'))}, not a positive integer"
    if marker.get("zero_stage") not in (0, 1, 2, 3) or isinstance(marker.get("zero_stage"), bool):
        return f"its zero_stage is {json.dumps(marker.get('zero_stage'))}, not 0-3"
    files = marker.get("files")
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(f, dict) and is_count(f.get("bytes"), 0) and isinstance(f.get("sha256"), str)
            for f in files.values())):
        return "its files record lacks a size (bytes) or a sha256 for some file"
    return None


def damage(out_dir: Path, info: CheckpointInfo) -> str | None:
    """What is wrong with the tag's marker or its files against the marker's record, or None if they match.

    Sizes first (cheap), then checksums. Markers written before files were recorded vouch only
    for completeness.
    """
    problem = marker_problem(info.marker)
    if problem is not None:
        return f"its completion marker {out_dir / info.tag / MARKER} is malformed: {problem}"
    files = info.marker.get("files")
    if files is None:
        return None
    tag_dir = out_dir / info.tag
    for name, want in files.items():
        path = tag_dir / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if size != want["bytes"]:
            return f"{path} has {size} bytes, {want['bytes']} were saved"
    for name, want in files.items():
        try:
            if file_digest(tag_dir / name)["sha256"] != want["sha256"]:
                return f"{tag_dir / name} does not match its checksum"
        except OSError as err:
            return f"{tag_dir / name} cannot be read ({err.strerror})"
    return None


def complete_checkpoints(out_dir: Path) -> list[CheckpointInfo]:
    """Checkpoints in OUT whose completion marker is there, oldest first (files not verified)."""
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


def find_latest(out_dir: Path, warn: Callable[[str], None] = print_warning) -> CheckpointInfo | None:
    """The checkpoint to resume from: the newest complete tag whose files verify, pointer or not."""
    pointer = out_dir / POINTER
    try:
        pointer.read_text()
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as err:
        warn(f"{pointer} is unreadable ({getattr(err, 'strerror', None) or type(err).__name__}); "
             "choosing the newest checkpoint that verifies")
    complete = complete_checkpoints(out_dir)
    newest = complete[-1].iter_num if complete else -1
    skipped = sorted(t for t in partial_tags(out_dir) if iter_of(t) > newest)
    if skipped:
        warn(f"skipping incomplete checkpoint(s) {', '.join(skipped)} in {out_dir}")
    for info in reversed(complete):
        problem = damage(out_dir, info)
        if problem is None:
            return info
        warn(f"skipping checkpoint {info.tag}: {problem}")
    if complete:
        raise UserError(f"no checkpoint in {out_dir} verifies: every tag has a damaged or missing file",
                        hint="restore the run directory from a copy, or start afresh with a new --out_dir")
    return None


def tags_to_prune(iters: list[int], keep_last: int, milestones: set[int], milestone_every: int) -> list[int]:
    """Which complete checkpoints retention drops: all but the newest `keep_last` and milestones."""
    newest = sorted(iters)[-keep_last:]
    forever = {i for i in iters if i in milestones or (milestone_every and i > 0 and i % milestone_every == 0)}
    keep = set(newest) | forever
    return sorted(i for i in iters if i not in keep)


# -----------------------------------------------------------------------------
# saving


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves the run's checkpoints and decides when: every `interval` iterations, on a stop, at the end.

    Built once per run. `client_state()` returns what DeepSpeed stores beside the weights (rank 0's
    copy; RNG is saved per rank); `marker` is what resume checks before building anything.
    """

    def __init__(self, engine, out_dir: Path, *, rank: int, world_size: int, collectives: Collectives,
                 interval: int, keep_last: int, milestones: set[int], milestone_every: int,
                 client_state: Callable[[], dict], marker: dict, saved_at: int | None = None):
        self.engine, self.out_dir, self.rank, self.world_size = engine, Path(out_dir), rank, world_size
        self.comm = collectives
        self.interval, self.keep_last = interval, keep_last
        self.milestones, self.milestone_every = milestones, milestone_every
        self.client_state, self.marker = client_state, marker
        self.saved_at = saved_at  # the iteration whose state is on disk (the resumed one, at first)

    def maybe_save(self, iter_num: int) -> str | None:
        """Save if `iter_num` is on the interval, trained (not the first) and not on disk already.

        The loop calls it after the iteration's eval, so the checkpoint's best_val_loss counts it.
        """
        if iter_num % self.interval == 0 and iter_num > 0 and iter_num != self.saved_at:
            return self.save(iter_num)
        return None

    def save_final(self, iter_num: int) -> str | None:
        """Save the end of the run unless that state is on disk already."""
        return None if self.saved_at == iter_num else self.save(iter_num)

    def save(self, iter_num: int) -> str:
        """Save on every rank; the tag becomes visible only once all ranks have written it.

        A failed write on any rank (full disk, quota) leaves the previous checkpoint as the
        newest complete one and the partial tag removed, and every rank raises the same UserError.
        """
        tag, out_dir, rank = tag_for(iter_num), self.out_dir, self.rank
        if rank == 0:  # re-saving into an existing tag: a crash mid-way must not leave it marked complete
            (out_dir / tag / MARKER).unlink(missing_ok=True)
        error, shards_saved = None, False
        try:
            self.engine.save_checkpoint(str(out_dir), tag=tag, client_state=self.client_state(), save_latest=False)
            shards_saved = True
            # per-rank RNG: DeepSpeed's client_state is written by rank 0 only
            torch.save(rng_state(), out_dir / tag / f"rng_rank{rank}.pt")
        except Exception as err:
            if not atomic.write_failed(err):
                raise
            error = err
            if not shards_saved:
                # DeepSpeed's save ends in a barrier, after its last write, which the ranks whose writes
                # succeeded are waiting in: join it, or they wait there until --pg_timeout and never
                # hear of the failure. (Its other collectives come before the first write.)
                self.comm.barrier()
        self._raise_if_any_failed(tag, error)
        files = self._record_files(tag)
        error = None
        if rank == 0:
            try:
                marker = {"iter_num": iter_num, **self.marker, "files": files}
                atomic.write_text(out_dir / tag / MARKER, json.dumps(marker, indent=1))
                atomic.write_text(out_dir / POINTER, tag)
            except OSError as err:
                shutil.rmtree(out_dir / tag, ignore_errors=True)
                error = err
        self._raise_if_any_failed(tag, error)
        if rank == 0:
            self._prune(iter_num)
        self.comm.barrier()
        self.saved_at = iter_num
        return tag

    def _record_files(self, tag: str) -> dict:
        """Sizes and sha256 of every file of the tag, each rank hashing its share."""
        self.comm.barrier()
        names = tag_files(self.out_dir / tag)
        mine = {name: file_digest(self.out_dir / tag / name) for name in names[self.rank::self.world_size]}
        return {k: v for part in self.comm.all_gather_object(mine) for k, v in sorted(part.items())}

    def _raise_if_any_failed(self, tag: str, error: BaseException | None) -> None:
        failed = self.comm.all_reduce_sum([1.0 if error else 0.0])[0]
        if not failed:
            return
        if self.rank == 0:
            shutil.rmtree(self.out_dir / tag, ignore_errors=True)
        self.comm.barrier()  # the partial tag is gone before any rank exits (a launcher then kills the rest)
        previous = complete_checkpoints(self.out_dir)
        cause = f"rank {self.rank}: {str(error).strip().splitlines()[0]}" if error else "see the failing rank's error"
        kept = f"the previous checkpoint {previous[-1].tag} is intact" if previous else "no earlier checkpoint exists"
        hint = RESUME_HINT if error is None else write_hint(error, RESUME_HINT)
        if error is None or maybe_full(error):  # a full disk, or this rank cannot tell: how much room there is
            kept = f"{shutil.disk_usage(self.out_dir).free / 2**30:.1f} GiB free under {self.out_dir}; {kept}"
        raise UserError(f"saving checkpoint {tag} failed on {int(failed)} rank(s): {cause}; {kept}", hint=hint)

    def _prune(self, iter_num: int) -> None:
        complete = [c.iter_num for c in complete_checkpoints(self.out_dir)]
        for n in tags_to_prune(complete, self.keep_last, self.milestones, self.milestone_every):
            shutil.rmtree(self.out_dir / tag_for(n), ignore_errors=True)
        for name in partial_tags(self.out_dir):  # left by earlier crashes
            if iter_of(name) < iter_num:
                shutil.rmtree(self.out_dir / name, ignore_errors=True)


# -----------------------------------------------------------------------------
# loading


def load(engine, out_dir: Path, info: CheckpointInfo, *, rank: int) -> dict:
    """Restore weights, optimizer and this rank's RNG, on any layout; return the client state.

    The layout that wrote the tag (and any world size, for ZeRO-0) loads through DeepSpeed's own
    load_checkpoint; another world size, ZeRO stage or precision through ds_gpt.elastic.
    """
    if rank == 0:  # left by a killed conversion; this resume may not convert and remove them itself
        elastic.remove_stale_conversions(out_dir)
    saved, new = elastic.Layout.of_marker(info.marker), elastic.Layout.of_engine(engine)
    if elastic.needs_conversion(saved, new):
        client_state = elastic.resume(engine, out_dir / info.tag, info.marker, rank=rank)
    else:
        _, client_state = engine.load_checkpoint(str(out_dir), tag=info.tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
        # A tag saved with torch's AdamW and loaded into DeepSpeed's CPU Adam (offload switched on)
        # brings torch's parameter groups, without the keys CPU Adam steps with (bias_correction).
        optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for group in getattr(optimizer, "param_groups", []):
            for key, value in getattr(optimizer, "defaults", {}).items():
                group.setdefault(key, value)
    if client_state is None:
        raise UserError(f"{out_dir / info.tag} could not be loaded",
                        hint="check the run's log; resume from an older tag")
    rng_path = out_dir / info.tag / f"rng_rank{rank}.pt"
    if rng_path.exists():  # a rank the saving run did not have keeps its seeded state
        set_rng_state(safe_load.load(rng_path))
    return client_state


def check_resumable(info: CheckpointInfo, run: RunConfig) -> None:
    """Refuse, before building anything, a resume that would not continue the saved run.

    World size, ZeRO stage, precision and the split of the global batch may change (ds_gpt.elastic
    carries the state across); the global batch only with --allow_batch_change; the data's
    tokenizer never; the model's shape is the checkpoint's (run_config.adopt_model_args).
    """
    elastic.check_resume(Path(run.train.out_dir) / info.tag, info.marker, batch=run.batch, optimizer=run.optimizer,
                         data_dir=run.train.data_dir, allow_batch_change=run.train.allow_batch_change)


def resolve_tag(out_dir: Path, tag: str | None) -> str:
    if tag is None:
        info = find_latest(out_dir)
        if info is None:
            raise UserError(f"no complete checkpoint in {out_dir}", hint="train first, or pass --out_dir of a run")
        return info.tag
    marker = read_marker(out_dir, tag) if iter_of(tag) is not None else None
    if marker is None:
        raise UserError(f"no complete checkpoint {tag} in {out_dir}", hint=f"ls {out_dir} lists the global_step* tags")
    problem = damage(out_dir, CheckpointInfo(tag, iter_of(tag), marker))
    if problem is not None:
        raise UserError(f"checkpoint {tag} is damaged: {problem}", hint="pick an older tag, or leave the tag out "
                        "to take the newest one that verifies")
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
    states = safe_load.load(states_file)
    skip = {"module", "optimizer", "lr_scheduler", "buffer_names", "param_shapes", "frozen_param_shapes",
            "frozen_param_fragments", "shared_params", "ds_config", "ds_version", "csr_tensor_module_names",
            "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "data_sampler",
            "random_ltd", "sparse_tensor_module_names"}
    client_state = {k: v for k, v in states.items() if k not in skip}
    has_zero_shards = any((out_dir / tag).glob("*zero_pp_rank_*optim_states.pt"))
    if has_zero_shards:
        with elastic.zero_to_fp32_calls(out_dir / tag):
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(out_dir), tag=tag)
    else:
        state_dict = {k: v.float() for k, v in states["module"].items()}
    return {k: v.float() for k, v in state_dict.items()}, client_state
