"""Reading checkpoint files as data, never as code.

A `.pt` file is a pickle, and a pickle can name any function to call while it is read: a
checkpoint tag in a shared project directory (or a nanoGPT ckpt.pt, an HF pytorch_model.bin)
could run a program as whoever resumes, samples or exports it. Every torch.load of ds_gpt goes
through this module with `weights_only=True`: torch's own unpickler, which builds tensors,
containers and plain values and nothing else. On top of those it allows exactly the few
classes that DeepSpeed's checkpoints and our RNG files hold (CHECKPOINT_TYPES); none of them
runs code when it is rebuilt (their state is set attribute by attribute). A file that names
anything else is refused with one UserError line; nothing of it runs.

Three ways in, one rule:
  load(path)               our own reads (model states, RNG files, the layout-free form, nanoGPT)
  install(engine)          DeepSpeed's load_checkpoint reads every file through its checkpoint
                           engine, a pluggable object: we hand it one whose load is ours
  weights_only_loads()     DeepSpeed's zero_to_fp32 (and transformers) call torch.load
                           themselves, with no hook; torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD makes
                           every torch.load in the block weights-only whatever its caller asked
"""
from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
from typing import Any, Iterator

import torch

from ds_gpt.errors import UserError

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # read by torch.load at every call
FORCE_OFF = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # set together with FORCE, torch.load refuses to run
REFUSED_HINT = ("do not load it with other tools either; take the file again from a source you trust (in a run "
                "directory: restore the tag from a copy, or use an older tag)")


@functools.cache
def checkpoint_types() -> list:
    """The classes beyond tensors and plain values that a DeepSpeed checkpoint and our RNG files hold.

    Found by listing torch.serialization.get_unsafe_globals_in_checkpoint over tags saved at ZeRO
    0-3, fp32 and bf16, with and without optimizer offload (DeepSpeed 0.19.8); DynamicLossScaler
    is what fp16 runs save in the same place as LossScaler (read from DeepSpeed's ZeRO optimizers).
    """
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = np._core.multiarray._reconstruct  # numpy's RNG state (rng_rank*.pt): one uint32 array
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,
            reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),  # the name numpy 1.x saved
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def refused(err: pickle.UnpicklingError, what: str | os.PathLike) -> UserError:
    """The one line for a file torch's weights-only unpickler would not build."""
    found = re.search(r"WeightsUnpickler error:\s*(Unsupported global: \S+ \S+?)\.?(?:\s|$)", str(err))
    if found is None:  # no function named: a damaged file, or no pickle at all
        return unreadable(err, what)
    return UserError(f"{what} holds more than tensors and plain data ({found.group(1)}); it was not loaded: "
                     "checkpoint files are read as data, never run", hint=REFUSED_HINT)


def unreadable(err: BaseException, what: str | os.PathLike) -> UserError:
    words = str(err).strip() if isinstance(err, (RuntimeError, ValueError)) else ""
    if isinstance(err, pickle.UnpicklingError):  # torch's advice first, the unpickler's words last
        words = str(err).rpartition("WeightsUnpickler error:")[2].strip()
    reason = words.splitlines()[0].split(". ")[0] if words else "not a file torch.save wrote"
    return UserError(f"{what} cannot be read as a torch file ({reason})",
                     hint="restore it from a copy, or use an older checkpoint")


def load(path: str | os.PathLike, map_location: Any = "cpu", **kwargs) -> Any:
    """torch.load(path, weights_only=True) with the checkpoint types allowed; a file that holds
    anything else, or is no torch file at all, is one UserError naming it."""
    with torch.serialization.safe_globals(checkpoint_types()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as err:
            raise refused(err, path) from None
        except (RuntimeError, EOFError, ValueError, KeyError) as err:  # torn, truncated, text: torch's words
            raise unreadable(err, path) from None


@contextlib.contextmanager
def weights_only_loads(what: str | os.PathLike) -> Iterator[None]:
    """Every torch.load inside the block is weights-only, the checkpoint types allowed.

    For library code that calls torch.load with full unpickling itself and offers no hook
    (DeepSpeed's zero_to_fp32): torch reads FORCE at each call and it overrides the argument.
    A refused file is one UserError about `what`. Not thread-safe (it sets the environment for
    the block): the commands that use it load in one thread.
    """
    saved = {name: os.environ.pop(name, None) for name in (FORCE, FORCE_OFF)}
    os.environ[FORCE] = "1"
    try:
        with torch.serialization.safe_globals(checkpoint_types()):
            yield
    except pickle.UnpicklingError as err:
        raise refused(err, what) from None
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine, whichever the JSON chose, with `load` replaced by ours.

    Everything else (save, commit, the decoupled writer's hooks) is the original's, by delegation.
    """

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return load(path, map_location=map_location)


def install(engine) -> None:
    """Make the engine's load_checkpoint read every file of a tag through `load`."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyCheckpointEngine):
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine.checkpoint_engine)

