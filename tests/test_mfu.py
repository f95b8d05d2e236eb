"""FLOPs per token, MFU, device peaks and the CPU probe, against hand-computed numbers."""
from __future__ import annotations

import json

import pytest
import torch

from ds_gpt import mfu as M
from ds_gpt.errors import UserError

# GPT-2 124M as nanoGPT trains it (vocab padded to 50304). N without the position embedding:
#   wte 50304*768 = 38,633,472; per layer 7,087,872 (ln 3,072 + attn 1,771,776 + 590,592
#   + mlp 2,362,368 + 2,360,064), x12 = 85,054,464; ln_f 1,536  ->  123,689,472
N_124M = 38_633_472 + 12 * 7_087_872 + 1_536
L, D, T = 12, 768, 1024
TOKENS_PER_ITER = 491_520  # 12 micro x 1024 tokens x 40 micro-steps (all ranks)


def test_flops_per_token_124m_by_hand():
    assert N_124M == 123_689_472
    # 6N = 742,136,832; 12*L*T*d = 12*12*1024*768 = 113,246,208
    assert M.flops_per_token(N_124M, L, D, T) == 742_136_832 + 113_246_208 == 855_383_040
    # forward only: 2N + 4LTd = 247,378,944 + 37,748,736, a third of training
    assert M.fwd_flops_per_token(N_124M, L, D, T) == 285_127_680 == 855_383_040 / 3


@pytest.mark.parametrize("gpus, iter_s, seed_mfu", [(8, 0.480, 0.34), (2, 1.680, 0.39)])
def test_seed_mfu_reproduced(gpus, iter_s, seed_mfu):
    """The reference run's nanoGPT figures from its own iteration times and configuration.

    8 GPUs: 491,520 / 0.48 s = 1,024,000 tok/s; x 855,383,040 = 8.759e14 FLOPs/s;
            / (8 x 312e12) = 0.3509 (seed: ~34%).
    2 GPUs: 491,520 / 1.68 s = 292,571 tok/s -> 2.503e14 / (2 x 312e12) = 0.4011 (seed: ~39%).
    nanoGPT reports a running average over iterations that include slower ones, hence a
    point lower; the tolerance is 1.5 points.
    """
    peak, source = M.peak_flops_per_device("NVIDIA A100-SXM4-40GB", "bfloat16")
    assert (peak, source) == (312e12, "table:A100")
    got = M.mfu(TOKENS_PER_ITER / iter_s, M.flops_per_token(N_124M, L, D, T), gpus, peak)
    assert got == pytest.approx({8: 0.3509, 2: 0.4011}[gpus], abs=1e-4)
    assert abs(got - seed_mfu) <= 0.015


@pytest.mark.parametrize("name, key, bf16", [
    ("NVIDIA A100-SXM4-80GB", "A100", 312), ("NVIDIA A100 80GB PCIe", "A100", 312),
    ("NVIDIA H100 80GB HBM3", "H100-SXM", 989), ("NVIDIA H100 PCIe", "H100-PCIe", 756),
    ("NVIDIA H100 NVL", "H100-NVL", 835), ("NVIDIA H200", "H200", 989),
    ("NVIDIA GH200 480GB", "GH200", 989), ("NVIDIA A10G", "A10", 125), ("NVIDIA L4", "L4", 121),
    ("NVIDIA L40S", "L40S", 362), ("NVIDIA L40", "L40", 181), ("NVIDIA GeForce RTX 4090", "RTX-4090", 165.2),
    ("NVIDIA GeForce RTX 3090", "RTX-3090", 71), ("NVIDIA RTX A6000", "RTX-A6000", 154.8),
    ("NVIDIA A40", "A40", 149.7),
])
def test_cuda_names_map_to_the_table(name, key, bf16):
    assert M.table_device(name) == key
    assert M.peak_flops_per_device(name, "torch.bfloat16") == (bf16 * 1e12, f"table:{key}")


def test_dtypes_and_overrides():
    assert M.peak_flops_per_device("NVIDIA A100-PCIE-40GB", "float32")[0] == 19.5e12
    assert M.peak_flops_per_device("NVIDIA A100-PCIE-40GB", "tf32")[0] == 156e12
    assert M.peak_flops_per_device("Tesla V100-SXM2-16GB", "float16") == (125e12, "table:V100-SXM")
    assert M.peak_flops_per_device("Tesla V100-PCIE-32GB", "float16")[0] == 112e12
    assert M.peak_flops_per_device("Tesla T4", "fp16")[0] == 65e12
    assert M.peak_flops_per_device("Some Future GPU", "bfloat16", override_tflops=500) == (500e12, "override")
    with pytest.raises(UserError, match="peak_tflops"):
        M.peak_flops_per_device("Some Future GPU", "bfloat16")
    with pytest.raises(UserError, match="V100-SXM in bf16"):  # V100 has no bf16 tensor cores
        M.peak_flops_per_device("Tesla V100-SXM2-16GB", "bfloat16")
    with pytest.raises(UserError):
        M.peak_flops_per_device("NVIDIA A100", "int8")


def test_mfu_is_per_device():
    # 1e5 tok/s x 1e9 FLOPs/token = 1e14 FLOPs/s over 4 devices of 1e14 peak = 25%
    assert M.mfu(1e5, 1e9, 4, 1e14) == pytest.approx(0.25)


def test_cpu_peak_is_cached_per_dtype_and_threads(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(M, "probe_matmul_flops", lambda dtype: calls.append(dtype) or 1.5e11)
    monkeypatch.setattr(M.os, "getloadavg", lambda: (0.5, 0.5, 0.5))  # a quiet machine: each probe is final
    path = tmp_path / "cpu_peak.json"
    assert M.cpu_peak_flops("fp32", cache_path=path) == 1.5e11
    assert M.cpu_peak_flops("fp32", cache_path=path) == 1.5e11  # from the cache
    assert M.cpu_peak_flops("bf16", cache_path=path) == 1.5e11
    assert calls == ["fp32", "bf16"]
    keys = list(json.loads(path.read_text()))
    assert keys[0].startswith("fp32|linear|threads=") and keys[1].startswith("bf16|linear|threads=")


def test_cpu_probe_times_the_op_the_models_layers_run(monkeypatch):
    """F.linear: on CPUs without bf16 units torch.matmul's bf16 path is ~20x slower."""
    import torch.nn.functional as F

    shapes = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, *rest: shapes.append((x.dtype, *x.shape)) or real_linear(x, w, *rest))
    M.probe_matmul_flops("bf16", n=64, seconds=0.01)
    assert len(shapes) >= 2 and set(shapes) == {(torch.bfloat16, 64, 64)}


def test_cpu_probe_measures_a_plausible_peak():
    flops = M.probe_matmul_flops("fp32", n=256, seconds=0.05)
    assert 1e8 < flops < 1e14  # between a slow core and far beyond any CPU


def test_a_peak_probed_on_a_busy_machine_is_probed_again_and_the_best_kept(tmp_path, monkeypatch):
    """A probe under a load above the usable cores reads low; it is not final until a quiet one."""
    path, cores = tmp_path / "cpu_peak.json", M.usable_cores()
    probes = iter([1e11, 3e11, 2e11])
    monkeypatch.setattr(M, "probe_matmul_flops", lambda dtype: next(probes))
    monkeypatch.setattr(M.os, "getloadavg", lambda: (3.0 * cores + 1, 0.0, 0.0))
    assert M.cpu_peak_flops("fp32", cache_path=path) == 1e11  # busy: cached, not final
    assert M.cpu_peak_flops("fp32", cache_path=path) == 3e11  # busy again: probed, the better figure kept
    monkeypatch.setattr(M.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert M.cpu_peak_flops("fp32", cache_path=path) == 3e11  # quiet: a lower probe does not lower the peak
    assert M.cpu_peak_flops("fp32", cache_path=path) == 3e11  # and now it is final: no fourth probe
    [entry] = json.loads(path.read_text()).values()
    assert entry["load"] == 0.1


def test_peak_on_cpu_comes_from_the_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_GPT_CACHE", str(tmp_path))
    monkeypatch.setattr(M, "probe_matmul_flops", lambda dtype: 2e11)
    assert M.peak_flops_per_device("cpu", "float32") == (2e11, "measured:cpu")
    assert (tmp_path / "cpu_peak.json").exists()
