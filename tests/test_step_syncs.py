"""The training step reads the device once: every way a tensor's value can reach the host is counted."""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from helpers import free_port, write_token_bins
from torch.utils._python_dispatch import TorchDispatchMode

# Each of these waits for the device to finish before it returns a host value.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
# torch.tensor(host value, device=gpu) runs lift_fresh, then a blocking host-to-device copy: a host
# wait for everything queued before it. On CPU there is no copy, but lift_fresh is there to see.
HOST_MADE = "aten.lift_fresh.default"

pytestmark = pytest.mark.slow  # a real engine built in this process (~5 s, more with a cold import)


@contextlib.contextmanager
def counting_host_reads(counts: dict[str, list[str]]):
    """Count host reads made by ds_gpt's own code (DeepSpeed's internals are its own business)."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("ds_gpt"):
                counts.setdefault(name, []).append(caller)
            return originals[name](self, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


RUN_FLAGS = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--vocab_size", "512",
             "--dtype", "float32", "--compile", "False", "--micro_batch_size", "2",
             "--gradient_accumulation_steps", "4"]


class OpsOfDsGpt(TorchDispatchMode):
    """The aten ops that ds_gpt's own code calls (its nearest caller outside torch is ds_gpt)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith("torch"):
            frame = frame.f_back
        if frame is not None and frame.f_globals.get("__name__", "").startswith("ds_gpt"):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_token_bins(tmp_path_factory.mktemp("syncs-data"))


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, data_dir):
    """A real one-rank engine (ZeRO-1, 4 micro-batches per step) and its sampler, in this process."""
    from ds_gpt import engine as ds_engine
    from ds_gpt.data import RandomWindowSampler
    from ds_gpt.model import GPT
    from ds_gpt.startup import build_run

    tmp = tmp_path_factory.mktemp("syncs")
    mp = pytest.MonkeyPatch()
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        mp.setenv(k, v)
    start = build_run(["--data_dir", str(data_dir), "--out_dir", str(tmp / "out"), *RUN_FLAGS, "--zero_stage", "1"])
    ds_engine.init_distributed(60, start.env)
    eng = ds_engine.build_engine(GPT(start.shape), start.run)
    sampler = RandomWindowSampler(start.data["train"], "train", 32, 512, 1337, 2, 4, 1, 0)
    yield eng, sampler
    mp.undo()


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_one_step_reads_the_device_once(one_rank_run, policy):
    from ds_gpt.flops_profile import FlopsProfileCapture
    from ds_gpt.nonfinite import NonFiniteGuard
    from ds_gpt.signals import GracefulStop
    from ds_gpt.train import train_step

    eng, sampler = one_rank_run
    guard = NonFiniteGuard(policy, micro_batches_per_step=4, model=eng.module)
    profile = FlopsProfileCapture(eng, profile_step=None, output_file="unused", n_params=1, n_layer=2, n_embd=32,
                                  peak_flops=1.0)
    counts: dict[str, list[str]] = {}
    from ds_gpt.data import BatchPrefetcher

    ops = OpsOfDsGpt()
    with BatchPrefetcher(sampler, "cpu") as batches, counting_host_reads(counts), ops:
        result = train_step(eng, batches, 0, guard, GracefulStop(), profile)
    assert result.action == "ok" and result.loss == result.loss
    assert sum(len(callers) for callers in counts.values()) == 1, counts
    assert counts == {"tolist": ["ds_gpt.collectives"]}  # the step's one all-reduce, read back once
    assert "aten.full.default" in ops.ops  # the stop flag, filled on the device (the recorder sees ds_gpt)
    assert HOST_MADE not in ops.ops  # no tensor made from a host value: no hidden host wait on a GPU


def test_the_cpu_engine_steps_torchs_fused_adamw(one_rank_run):
    """The resolver's `fused` reaches the AdamW that DeepSpeed builds (here inside ZeRO-1's wrapper)."""
    eng, _ = one_rank_run
    base = eng.optimizer.optimizer
    assert isinstance(base, torch.optim.AdamW) and all(group["fused"] for group in base.param_groups)


def test_deepspeed_does_not_synchronize_the_device_in_a_step(one_rank_run, monkeypatch):
    """DeepSpeed's throughput timer would synchronize the device at every forward and step()
    from the engine's third step on (two host waits per micro-batch on a GPU): the resolved
    config turns it off. On CPU the call is a no-op, so it is counted, not timed."""
    from deepspeed.accelerator import get_accelerator

    from ds_gpt.data import BatchPrefetcher
    from ds_gpt.flops_profile import FlopsProfileCapture
    from ds_gpt.nonfinite import NonFiniteGuard
    from ds_gpt.signals import GracefulStop
    from ds_gpt.train import train_step

    eng, sampler = one_rank_run
    accelerator = get_accelerator()
    calls = []
    monkeypatch.setattr(accelerator, "synchronize", lambda *a, **k: calls.append(a))
    guard = NonFiniteGuard("stop", micro_batches_per_step=4, model=eng.module)
    profile = FlopsProfileCapture(eng, profile_step=None, output_file="unused", n_params=1, n_layer=2, n_embd=32,
                                  peak_flops=1.0)
    with BatchPrefetcher(sampler, "cpu") as batches:
        for step in range(3):  # the timer starts timing (and synchronizing) at the engine's second step
            train_step(eng, batches, step, guard, GracefulStop(), profile)
    assert eng.global_steps >= 3 and calls == []


def test_zero0_alone_skips_the_self_all_reduce_and_steps_the_same_bits(one_rank_run, data_dir, tmp_path):
    """One process at ZeRO-0 has no gradient to average: build_engine turns DeepSpeed's flat-buffer
    all-reduce off. The parameters after two steps are bit for bit those with it on."""
    import copy

    from ds_gpt import engine as ds_engine
    from ds_gpt.data import BatchPrefetcher, RandomWindowSampler
    from ds_gpt.flops_profile import FlopsProfileCapture
    from ds_gpt.model import GPT
    from ds_gpt.nonfinite import NonFiniteGuard
    from ds_gpt.signals import GracefulStop
    from ds_gpt.startup import build_run
    from ds_gpt.train import train_step

    start = build_run(["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"), *RUN_FLAGS,
                       "--zero_stage", "0"])
    torch.manual_seed(0)
    model = GPT(start.shape)
    engines = [ds_engine.build_engine(copy.deepcopy(model), start.run) for _ in range(2)]
    assert [e.enable_backward_allreduce for e in engines] == [False, False]
    engines[1].enable_backward_allreduce = True  # DeepSpeed's own way
    sampler = RandomWindowSampler(start.data["train"], "train", 32, 512, 1337, 2, 4, 1, 0)
    for eng in engines:
        ds_engine.set_lr(eng, 1e-2)
        guard = NonFiniteGuard("skip", micro_batches_per_step=4, model=eng.module)
        profile = FlopsProfileCapture(eng, profile_step=None, output_file="unused", n_params=1, n_layer=2,
                                      n_embd=32, peak_flops=1.0)
        with BatchPrefetcher(sampler, "cpu") as batches:
            for step in range(2):
                train_step(eng, batches, step, guard, GracefulStop(), profile)
    skipped, reduced = (dict(e.module.named_parameters()) for e in engines)
    assert all(torch.equal(skipped[name], reduced[name]) for name in skipped)
    assert not all(torch.equal(skipped[name], p) for name, p in model.named_parameters())  # they did train
