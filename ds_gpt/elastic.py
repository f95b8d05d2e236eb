"""Resuming a checkpoint on another layout: another world size, ZeRO stage or precision.

DeepSpeed's load_checkpoint takes a tag only on the layout that wrote it (a ZeRO-0 tag, which is
not partitioned, loads at any world size), and its universal checkpoints cross neither ZeRO-0
nor ZeRO-1/2 <-> ZeRO-3. So a tag resumed on another layout is converted once, by one process,
into a layout-free form: for every parameter, by name and at full size, the fp32 master weight
and its optimizer state (AdamW's exp_avg and exp_avg_sq; under Muon, the hidden matrices' momentum
buffer instead), plus AdamW's step count:

    OUT/global_step{N}/layout_free/  fp32.pt  exp_avg.pt  exp_avg_sq.pt  momentum_buffer.pt  meta.json

Each rank of the new run then takes its share of every tensor through DeepSpeed's fragment API
(deepspeed.utils.safe_set_full_*), which knows how ZeRO-1, 2, 3 and the bf16 optimizer
partition them; ZeRO-0 holds whole tensors, which are set directly. Muon's momentum is set by
hand at ZeRO-1/2, where DeepSpeed keeps it for whole matrices (see _zero12_momentum). Masters,
moments and momentum do not depend on the layout, so the run goes on as the saved one would have.

The form is written under a temporary name inside the tag and published by one rename. The
tag's own files are only read: a kill mid-way leaves the tag as it was, and a rerun converts
again. It records which save of the tag it was made from, so a tag saved anew is converted
anew. Retention deletes it with its tag.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from ds_gpt import atomic, safe_load
from ds_gpt.collectives import all_reduce_sum
from ds_gpt.errors import UserError, write_reason
from ds_gpt.run_config import BatchSizes, ds_optimizer, flags_for_global_batch

DIRNAME = "layout_free"
FORMAT = 2  # 2: Muon's momentum_buffer.pt (empty under AdamW)
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's, for every parameter on its side
MOMENTUM = "momentum_buffer"  # Muon's, for the hidden matrices (DeepSpeed's and torch's name)
STATES = ("fp32", *MOMENTS, MOMENTUM)  # per parameter that has it, full size, fp32

# What DeepSpeed keeps in a model-states file beside the caller's client state (engine._load_checkpoint).
DEEPSPEED_KEYS = frozenset("""module optimizer lr_scheduler buffer_names param_shapes frozen_param_shapes
shared_params frozen_param_fragments data_sampler random_ltd sparse_tensor_module_names skipped_steps
global_steps global_samples dp_world_size mp_world_size checkpoint_parallel_dimensions ds_config
ds_version""".split())


def optimizer_states(muon: bool) -> tuple[str, ...]:
    """The optimizer's state of one parameter: Muon's momentum on its side, else AdamW's moments."""
    return (MOMENTUM,) if muon else MOMENTS


@dataclass(frozen=True)
class Layout:
    """How a run's state is split over ranks: what a DeepSpeed checkpoint is tied to."""

    world_size: int
    zero_stage: int
    dtype: str

    @classmethod
    def of_marker(cls, marker: dict) -> Layout:
        return cls(int(marker["world_size"]), int(marker["zero_stage"]), str(marker.get("dtype", "float32")))

    @classmethod
    def of_engine(cls, engine) -> Layout:
        dtype = "bfloat16" if engine.bfloat16_enabled() else "float16" if engine.fp16_enabled() else "float32"
        return cls(engine.dp_world_size, engine.zero_optimization_stage(), dtype)

    def __str__(self) -> str:
        return f"{self.world_size} rank(s) at ZeRO-{self.zero_stage} {self.dtype}"


def needs_conversion(saved: Layout, new: Layout) -> bool:
    """Whether DeepSpeed's own load_checkpoint cannot take a tag saved at `saved` on `new`."""
    if (saved.zero_stage, saved.dtype) != (new.zero_stage, new.dtype):
        return True
    return saved.world_size != new.world_size and saved.zero_stage > 0


def read_model_states(tag_dir: Path) -> dict:
    """Rank 0's model-states file (client state, DeepSpeed's counters, ZeRO-0's weights and optimizer),
    memory-mapped: reading the client state copies no weights."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).exists():
            return safe_load.load(tag_dir / name, mmap=True)
    raise UserError(f"{tag_dir} has no model-states file: not a complete DeepSpeed checkpoint")


def client_state_of(states: dict) -> dict:
    return {k: v for k, v in states.items() if k not in DEEPSPEED_KEYS}


def saved_optimizer(client_state: dict) -> str:
    """"muon" or "adamw": the optimizer of the DeepSpeed JSON the run was saved under."""
    return ds_optimizer((client_state.get("config") or {}).get("ds_config") or {})


# -----------------------------------------------------------------------------
# reading a tag of any layout as full tensors by parameter name (CPU, no process group)


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


@contextlib.contextmanager
def zero_to_fp32_calls(tag_dir: Path) -> Iterator[None]:
    """Around calls into DeepSpeed's zero_to_fp32: its progress reports (stdout, stderr: the
    command's console) are dropped, and its torch.load, which asks for full unpickling, is made weights-only."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            safe_load.weights_only_loads(f"a file of {tag_dir}"):
        yield


class SavedTag:
    """One saved tag of any layout; its states read one at a time as {name: full fp32 tensor}.

    ZeRO-1/2/3 shards are merged by DeepSpeed's own zero_to_fp32 code, handed the moments' flat
    partitions in place of the fp32 ones (both share one partition layout; so does Muon's momentum
    at ZeRO-3); ZeRO-0 keeps whole tensors, numbered as our optimizer's parameter groups list them.
    """

    def __init__(self, tag_dir: Path, model_args: dict):
        from ds_gpt.model import GPT, GPTConfig

        self.tag_dir = tag_dir
        self.states = read_model_states(tag_dir)
        optim_files = sorted(glob.glob(str(tag_dir / "*_optim_states.pt")), key=_natural)
        # Memory-mapped: a state's merge reads only its own flat partitions.
        self.shards = [safe_load.load(f, mmap=True)["optimizer_state_dict"]
                       for f in optim_files]
        self.stage = int(self.shards[0]["zero_stage"]) if self.shards else 0
        self.muon = saved_optimizer(client_state_of(self.states)) == "muon"
        with torch.device("meta"):  # names, shapes and groups of the parameters, in no memory
            model = GPT(GPTConfig(**model_args))
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.shapes = {n: p.shape for n, p in model.named_parameters()}
        # The groups as the run's optimizer was given them: under Muon, the hidden matrices first
        # (DeepSpeed keeps each of our groups, all on one side, as one group of its own).
        sides = {"muon": {"lr": 0.0}, "adam": {"lr": 0.0}} if self.muon else None
        groups = model.optimizer_param_groups(0.0, muon=sides)
        self.groups = [[name_of[id(p)] for p in g["params"]] for g in groups if g["params"]]
        hidden = {name_of[id(p)] for p in model.muon_matrices()} if self.muon else set()
        self.group_is_muon = [bool(set(names) & hidden) for names in self.groups]
        # DeepSpeed's Muon (after Keller Jordan's) orders its group by size, largest first, stably.
        self.groups = [sorted(names, key=lambda n: self.shapes[n], reverse=True) if muon else names
                       for names, muon in zip(self.groups, self.group_is_muon, strict=True)]

    def names_with(self, key: str) -> list[str]:
        """The parameters that have state `key`: every one has fp32; the optimizer's states by side."""
        return [n for names, muon in zip(self.groups, self.group_is_muon, strict=True) for n in names
                if key == "fp32" or key in optimizer_states(muon)]

    def step(self) -> int:
        """AdamW's step count (one for all parameters: the groups step together)."""
        if self.stage == 0:
            states = self._zero0_base()["state"]
        elif self.stage == 3:
            states = self.shards[0]["optimizer_state_dict"]["state"]
        else:
            states = self.shards[0]["base_optimizer_state"]["state"]
        steps = {int(s["step"]) for s in states.values() if "step" in s}
        if len(steps) > 1:
            raise UserError(f"{self.tag_dir}: AdamW's parameter groups have differing step counts {sorted(steps)}")
        return steps.pop() if steps else 0

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        """`key` (one of STATES) of every trainable parameter that has it, full size, by name."""
        names = self.names_with(key)
        if not names:
            return {}
        if self.stage == 0:
            tensors = self._zero0(key)
        elif key == MOMENTUM and self.stage in (1, 2):
            tensors = self._zero12_momentum()
        else:
            tensors = self._zero123(key)
        tensors = {n: t for n, t in tensors.items() if n in names}
        if tensors.keys() != set(names) or any(t.shape != self.shapes[n] for n, t in tensors.items()):
            raise UserError(f"{self.tag_dir} holds other parameters than its model_args describe")
        return {n: t.detach().float() for n, t in tensors.items()}

    def _flat_state(self, states: dict, group: int, key: str, size: int) -> torch.Tensor:
        """A group's flat optimizer state `key`; zeros where the group's side keeps none (AdamW's
        moments of a Muon group and the other way round: the names that follow drop them)."""
        state = states.get(group) or {}
        return state[key] if key in state else torch.zeros(size)

    def _zero123(self, key: str) -> dict[str, torch.Tensor]:
        from deepspeed.utils import zero_to_fp32

        world_size = self.shards[0]["partition_count"]
        world_size = max(world_size) if isinstance(world_size, list) else int(world_size)
        if world_size != len(self.shards):
            raise UserError(f"{self.tag_dir} holds {len(self.shards)} optimizer shard(s) for {world_size} rank(s)")
        model_files = sorted(glob.glob(str(self.tag_dir / "*_model_states.pt")), key=_natural)
        with zero_to_fp32_calls(self.tag_dir):
            model_states = zero_to_fp32.parse_model_states(model_files)
            if self.stage == 3:
                flats = [s["fp32_flat_groups"] if key == "fp32" else
                         [self._flat_state(s["optimizer_state_dict"]["state"], i, key, flat.numel())
                          for i, flat in enumerate(s["fp32_flat_groups"])]
                         for s in self.shards]
                merged = zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(world_size, flats, model_states, True)
                return {n: merged[n].contiguous() for n in self.shapes}  # gathered lazily until here
            if not isinstance(self.shards[0]["base_optimizer_state"], dict):
                raise UserError(f"{self.tag_dir}: ZeRO's elastic_checkpoint layout is not supported; "
                                "save with zero_optimization.elastic_checkpoint off")
            flats = [s["single_partition_of_fp32_groups"] if key == "fp32" else
                     [self._flat_state(s["base_optimizer_state"]["state"], g, key, flat.numel())
                      for g, flat in enumerate(s["single_partition_of_fp32_groups"])]
                     for s in self.shards]
            merged = zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(
                world_size, flats, model_states, True, self.shards[0].get("param_alignment_paddings"))
        return {n: merged[n] for n in self.shapes}  # the trainable ones: no buffers, no tied copy (lm_head)

    def _zero12_momentum(self) -> dict[str, torch.Tensor]:
        """Muon's momentum at ZeRO-1/2: not partitioned like the masters. Newton-Schulz needs whole
        matrices, so each rank keeps, per Muon group, the momentum of every parameter its partition
        touches, whole, one after the other (DeepSpeed's _muon_momentum_buffer); a matrix that
        straddles two partitions is kept, the same, by both ranks."""
        out = {}
        for g, (names, muon) in enumerate(zip(self.groups, self.group_is_muon, strict=True)):
            if not muon:
                continue
            for rank, shard in enumerate(self.shards):
                size = shard["single_partition_of_fp32_groups"][g].numel()
                start, end, offset, touched = rank * size, (rank + 1) * size, 0, []
                for name in names:  # the flat group holds them in this order (zero_to_fp32 reads it so)
                    numel = self.shapes[name].numel()
                    if offset < end and offset + numel > start:
                        touched.append(name)
                    offset += numel
                state = self._flat_state(shard["base_optimizer_state"]["state"], g, MOMENTUM, 0)
                sizes = [self.shapes[n].numel() for n in touched]
                if state.numel() != sum(sizes):
                    raise UserError(f"{self.tag_dir}: rank {rank}'s Muon momentum holds {state.numel()} values, "
                                    f"not the {sum(sizes)} of the matrices its partition touches")
                for name, part in zip(touched, state.split(sizes), strict=True):
                    out.setdefault(name, part.view(self.shapes[name]))
        return out

    def _zero0_base(self) -> dict:
        opt = self.states["optimizer"]  # torch's state_dict, or DeepSpeed's fp16/bf16 wrapper around it
        return opt["optimizer_state_dict"] if "optimizer_state_dict" in opt else opt

    def _zero0(self, key: str) -> dict[str, torch.Tensor]:
        opt, base = self.states["optimizer"], self._zero0_base()
        if [len(g["params"]) for g in base["param_groups"]] != [len(g) for g in self.groups]:
            raise UserError(f"{self.tag_dir}: the optimizer's parameter groups do not match the model's")
        out = {}
        for g, (names, group) in enumerate(zip(self.groups, base["param_groups"], strict=True)):
            if "fp32_groups_flat" in opt:  # fused fp16/bf16 optimizer: one flat master per group
                flat = opt["fp32_groups_flat"][g] if key == "fp32" else \
                    self._flat_state(base["state"], g, key, sum(self.shapes[n].numel() for n in names))
                parts = flat.split([self.shapes[n].numel() for n in names])
                out.update({n: t.view(self.shapes[n]) for n, t in zip(names, parts, strict=True)})
                continue
            for j, (name, index) in enumerate(zip(names, group["params"], strict=True)):
                if key != "fp32" and key not in optimizer_states(self.group_is_muon[g]):
                    continue
                if key != "fp32":
                    state = base["state"].get(index)  # none before the first step
                    out[name] = state[key] if state else torch.zeros(self.shapes[name])
                elif "fp32_groups" in opt:  # unfused fp16/bf16 optimizer: an fp32 master per parameter
                    out[name] = opt["fp32_groups"][g][j]
                else:  # fp32: the weights are the masters
                    out[name] = self.states["module"][name]
        return out


# -----------------------------------------------------------------------------
# the conversion: once per save of a tag, atomic


def fingerprint(marker: dict) -> str:
    """Which save of a tag this is: its completion marker (file checksums, pid) changes with every save."""
    return hashlib.sha256(json.dumps(marker, sort_keys=True, default=str).encode()).hexdigest()


def converted(tag_dir: Path, marker: dict) -> dict | None:
    """The layout-free form's meta.json if it is there and was made from this save of the tag."""
    try:
        meta = json.loads((tag_dir / DIRNAME / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT and meta.get("fingerprint") == fingerprint(marker) else None


def convert(tag_dir: Path, marker: dict) -> dict:
    """Write the tag's layout-free form unless it is there already; returns its meta.json.

    One process; at its peak one state of the model in memory (one fp32 copy of the weights;
    the shards are memory-mapped); on disk three fp32 copies of the weights, inside the tag.
    """
    meta = converted(tag_dir, marker)
    if meta is not None:
        return meta
    final, tmp = tag_dir / DIRNAME, tag_dir / f".{DIRNAME}.tmp-{os.getpid()}"
    for stale in [*tag_dir.glob(f".{DIRNAME}.tmp-*"), final]:  # a killed conversion; one of an older save
        shutil.rmtree(stale, ignore_errors=True)
    saved = None
    try:
        tmp.mkdir()
        t0 = time.perf_counter()
        saved = SavedTag(tag_dir, marker["model_args"])
        for key in STATES:  # one at a time: the peak is one state, not three
            _save_durably(saved.tensors(key), tmp / f"{key}.pt")
        meta = {"format": FORMAT, "fingerprint": fingerprint(marker), "step": saved.step(),
                "source": asdict(Layout.of_marker(marker)), "seconds": round(time.perf_counter() - t0, 3),
                "bytes": sum(p.stat().st_size for p in tmp.iterdir())}
        atomic.write_text(tmp / "meta.json", json.dumps(meta, indent=1))
        tmp.rename(final)
        atomic.fsync_dir(tag_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not atomic.write_failed(err):
            raise
        need = "" if saved is None else \
            f", it needs {len(STATES) * 4 * sum(s.numel() for s in saved.shapes.values()) / 2**20:.0f} MiB"
        raise UserError(f"converting {tag_dir} for another layout failed ({write_reason(err)}; "
                        f"{shutil.disk_usage(tag_dir).free / 2**20:.0f} MiB free there{need}); the checkpoint itself "
                        "is intact", hint=f"free disk space under {tag_dir.parent} and resume again") from None
    return meta


def remove_stale_conversions(out_dir: Path) -> None:
    """The temporary directories of conversions killed half-way, in every tag of `out_dir`.

    A resume on the saving layout never converts, so nothing else would remove them. Call only
    where no conversion in `out_dir` can be under way (rank 0, holding the run's lock, before it
    converts)."""
    for stale in out_dir.glob(f"*/.{DIRNAME}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _save_durably(obj, path: Path) -> None:
    with open(path, "wb") as fh:  # fsynced: on disk before the rename publishes it
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


# -----------------------------------------------------------------------------
# loading the layout-free form into a built engine (every rank)


def load_into(engine, tag_dir: Path) -> None:
    """Set the engine's weights, fp32 masters, optimizer state and step count from the tag's layout-free form.

    Every rank calls it: under ZeRO-3 the weights are set through collectives.
    """
    meta = json.loads((tag_dir / DIRNAME / "meta.json").read_text())
    states = {key: safe_load.load(tag_dir / DIRNAME / f"{key}.pt", mmap=True) for key in STATES}
    set_state(engine, states, meta["step"], source=str(tag_dir))


def set_state(engine, states: dict[str, dict[str, torch.Tensor]], step: int, source: str = "the state") -> None:
    """Give a built engine, at any ZeRO stage and precision, these full-size fp32 tensors by parameter
    name (`states`: fp32 for all; exp_avg and exp_avg_sq on AdamW's side; momentum_buffer on Muon's)
    and AdamW's step count. Every rank calls it."""
    params = dict(engine.module.named_parameters())
    if set(params) != set(states["fp32"]):
        diff = sorted(set(params) ^ set(states["fp32"]))
        raise UserError(f"{source} holds other parameters than this model: {', '.join(diff[:4])}")
    muon = {n for n, p in params.items() if getattr(p, "use_muon", False)}
    for key in STATES[1:]:
        have, need = set(states.get(key, {})), {n for n in params if key in optimizer_states(n in muon)}
        if have != need:
            raise UserError(f"{source} holds {key} for other parameters than this run's optimizer steps with it: "
                            f"{', '.join(sorted(have ^ need)[:4])}")
    _create_optimizer_state(engine.optimizer, step)
    device = next(iter(params.values())).device
    with torch.no_grad():
        if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params.values()):
            _set_partitioned(engine.optimizer, params, states, device)
        else:
            _set_whole(engine.optimizer, params, states, device)


def _base_optimizer(optimizer):
    """The torch optimizer that steps the fp32 masters, under DeepSpeed's wrapper if any."""
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


def _create_optimizer_state(optimizer, step: int) -> None:
    """The state of every tensor the base optimizer steps (it has none until its first step): AdamW's
    moments and step count, or on Muon's side its momentum, which ZeRO-1/2 keep for whole matrices."""
    base = _base_optimizer(optimizer)
    # ZeRO-3 hands the base optimizer one flat fp32 partition at a time and leaves its groups empty.
    masters = [(p, bool(group.get("use_muon")), g)
               for g, group in enumerate(base.param_groups) for p in group["params"]]
    muon_subgroups = getattr(optimizer, "sub_groups_using_muon", None) or []
    masters += [(p, bool(muon_subgroups and muon_subgroups[i]), None)
                for i, p in enumerate(getattr(optimizer, "fp32_partitioned_groups_flat", []))]
    aux = getattr(base, "aux_optimizer", None) or base  # Muon's AdamW side: its own optimizer, sharing the state
    torch_adam = isinstance(aux, (torch.optim.Adam, torch.optim.AdamW))
    # torch keeps `step` as a CPU tensor unless its fused/capturable kernels read it on the device;
    # DeepSpeed's fused and CPU Adam (and Muon's inline AdamW) keep a Python int.
    on_device = aux.defaults.get("fused") or aux.defaults.get("capturable")
    in_partition = getattr(optimizer, "params_in_partition", None)  # ZeRO-1/2
    for p, muon, group in masters:
        if muon:
            whole = in_partition is not None and group is not None and p.dim() == 1
            size = sum(q.numel() for q in in_partition[group]) if whole else p.numel()
            base.state[p] = {MOMENTUM: torch.zeros(size, dtype=p.dtype, device=p.device).view(
                -1 if whole else p.shape)}
            continue
        count = step if not torch_adam else \
            torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")
        base.state[p] = {"step": count, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 and the bf16 optimizer link each parameter's fragment of the moments after the
        # first step; the state exists now, so link them now.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _set_partitioned(optimizer, params: dict, states: dict, device: torch.device) -> None:
    """ZeRO-1/2/3 and the bf16 optimizer: each rank keeps its fragment of the masters and moments
    (ZeRO-3: of Muon's momentum too; ZeRO-1/2 keep that whole, and it is set by hand here)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    in_partition = getattr(optimizer, "params_in_partition", None)
    name_of = {id(p): n for n, p in params.items()}
    for name, p in params.items():
        safe_set_full_fp32_param(p, states["fp32"][name].to(device))
        for key in optimizer_states(getattr(p, "use_muon", False)):
            if key == MOMENTUM and in_partition is not None:
                continue
            safe_set_full_optimizer_state(p, states[key][name].to(device), key)
        # The weights themselves: whole on every rank at ZeRO-1/2; ZeRO-3 partitions them too, so
        # gather, set, and let the context's exit re-partition them.
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
            p.data.copy_(states["fp32"][name].to(device))
    if in_partition is None:
        return
    base = _base_optimizer(optimizer)
    for g, group in enumerate(base.param_groups):  # ZeRO-1/2: the layout of _zero12_momentum
        if group.get("use_muon"):
            whole = [states[MOMENTUM][name_of[id(q)]].flatten() for q in in_partition[g]]
            base.state[group["params"][0]][MOMENTUM].copy_(torch.cat(whole).to(device))


def _set_whole(optimizer, params: dict, states: dict, device: torch.device) -> None:
    """ZeRO-0: whole tensors on every rank. The masters are the weights themselves (fp32), an fp32
    copy per weight (DeepSpeed's unfused fp16/bf16 optimizer) or a flat copy per group (fused)."""
    base = _base_optimizer(optimizer)
    name_of = {id(p): n for n, p in params.items()}
    if hasattr(optimizer, "fp32_groups_flat"):
        masters = [(flat, [name_of[id(p)] for p in lps])
                   for flat, lps in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups, strict=True)]
    elif hasattr(optimizer, "fp32_groups"):
        pairs = zip(optimizer.fp32_groups, optimizer.fp16_groups, strict=True)
        masters = [(hp, [name_of[id(lp)]]) for hps, lps in pairs for hp, lp in zip(hps, lps, strict=True)]
    else:
        masters = [(p, [name_of[id(p)]]) for group in base.param_groups for p in group["params"]]
    muon = {n for n, p in params.items() if getattr(p, "use_muon", False)}
    for master, names in masters:
        for key in ("fp32", *optimizer_states(names[0] in muon)):
            target = master if key == "fp32" else base.state[master][key]
            target.copy_(torch.cat([states[key][n].flatten() for n in names]).view_as(target).to(device))
    for name, p in params.items():  # the weights (at fp16/bf16, the masters' rounded copies)
        p.data.copy_(states["fp32"][name].to(device))


# -----------------------------------------------------------------------------
# the resume: what may change, checked before anything is built; the load, on every rank


def tokenizer_of(data_dir: str | None) -> str | None:
    """The tokenizer a prepared data directory's meta.json names (None: no meta.json, e.g. nanoGPT's bins).

    A run records it in every checkpoint's marker ("tokenizer"): what the weights were trained on."""
    try:
        meta = json.loads((Path(data_dir) / "meta.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    name, digest = meta.get("tokenizer"), meta.get("tokenizer_sha256")
    return f"{name} (sha256 {digest[:12]})" if name and digest else name


def check_resume(tag_dir: Path, marker: dict, *, batch: BatchSizes, data_dir: str, allow_batch_change: bool,
                 optimizer: str) -> None:
    """Refuse, with one line, a resume that would not continue the run saved in `tag_dir`.

    The layout (world size, ZeRO stage, precision) and the split of the global batch into micro
    batches and accumulation may change; the global batch only with --allow_batch_change (the
    curve would no longer be the saved run's); the optimizer never (its state would not carry
    over: AdamW's moments are not Muon's momentum); the data's tokenizer never: the one the marker
    recorded at save time, not the one the saved data directory's meta.json names today (data
    re-prepared in place with another tokenizer). The model's shape is the checkpoint's
    (run_config.adopt_model_args refuses flags that contradict it).
    """
    client_state = client_state_of(read_model_states(tag_dir))
    saved_config = client_state.get("config") or {}
    saved_batch = (saved_config.get("batch") or {}).get("global_batch")
    tag = tag_dir.name
    if (saved := saved_optimizer(client_state)) != optimizer:
        raise UserError(f"checkpoint {tag} was trained with {saved}; this run's optimizer is {optimizer}",
                        hint="resume with the checkpoint's DeepSpeed JSON, or start a new run from its weights: "
                             "--init_from weights:OUT --out_dir NEW_OUT")
    if saved_batch is not None and saved_batch != batch.global_batch and not allow_batch_change:
        flags = flags_for_global_batch(saved_batch, batch)
        keep = f"pass {flags}" if flags else f"resume on a number of ranks that divides {saved_batch}"
        raise UserError(f"checkpoint {tag} was trained with a global batch of {saved_batch} sequences; this run's is "
                        f"{batch.global_batch}, and resuming with it would not continue the same loss curve",
                        hint=f"{keep} to keep it, or --allow_batch_change to continue with the new batch")
    saved_data = (saved_config.get("train") or {}).get("data_dir")
    # tags saved before the tokenizer was recorded: the saved data directory as it is now
    before = marker["tokenizer"] if "tokenizer" in marker else tokenizer_of(saved_data)
    now = tokenizer_of(data_dir)
    if before and now and before != now:
        raise UserError(f"checkpoint {tag} was trained on {saved_data} tokenized with {before}; --data_dir {data_dir} "
                        f"is tokenized with {now}", hint="resume on data prepared with the checkpoint's tokenizer, "
                        "or start a new run from its weights: --init_from weights:OUT --out_dir NEW_OUT")


def resume_events(tag: str, marker: dict, client_state: dict, new: Layout, global_batch: int,
                  iter_num: int) -> list[dict]:
    """metrics.jsonl events for what a resume changed: the layout, the global batch (none if neither)."""
    saved = Layout.of_marker(marker)
    saved_batch = ((client_state.get("config") or {}).get("batch") or {}).get("global_batch")
    events = []
    if saved != new:
        events.append({"event": "layout_change", "iter": iter_num, "tag": tag, "from": asdict(saved),
                       "to": asdict(new), "converted": needs_conversion(saved, new)})
    if saved_batch not in (None, global_batch):
        events.append({"event": "batch_change", "iter": iter_num, "tag": tag, "from": saved_batch, "to": global_batch})
    return events


def resume(engine, tag_dir: Path, marker: dict, *, rank: int) -> dict:
    """Load a tag written on another layout into `engine` (every rank); returns the client state.

    Rank 0 converts the tag (once: a rerun finds the form in place) while the others wait; a
    failed conversion is reported on every rank.
    """
    error, t0 = None, time.perf_counter()
    if rank == 0:
        try:
            made = "found in place" if converted(tag_dir, marker) else "converted"
            meta = convert(tag_dir, marker)
        except UserError as err:
            error = err
    if all_reduce_sum([1.0 if error else 0.0])[0]:
        raise error or UserError(f"rank 0 could not convert {tag_dir} for this layout (see its error line)")
    t1 = time.perf_counter()
    load_into(engine, tag_dir)
    if rank == 0:
        print(f"resuming {tag_dir.name}, saved by {Layout.of_marker(marker)}, on {Layout.of_engine(engine)}: "
              f"layout-free form ({meta['bytes'] / 2**20:.0f} MiB) {made} in {t1 - t0:.1f} s, "
              f"loaded in {time.perf_counter() - t1:.1f} s", flush=True)
    states = read_model_states(tag_dir)
    # DeepSpeed's own counters, as its load_checkpoint restores them
    engine.global_steps = int(states.get("global_steps", engine.global_steps))
    engine.global_samples = int(states.get("global_samples", engine.global_samples))
    engine.skipped_steps = int(states.get("skipped_steps", engine.skipped_steps))
    return client_state_of(states)
