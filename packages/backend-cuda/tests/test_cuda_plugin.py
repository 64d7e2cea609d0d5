"""The plugin shows up, declares itself, and says why it cannot run where it cannot."""

from __future__ import annotations

import torch

from lowbit import KernelSpec, QuantScheme
from lowbit.plugins import get_plugin_manager, registry
from lowbit.selection import clear_cache, kernel_reasons, select_kernel
from lowbit_cuda import configs
from lowbit_cuda.kernel import TritonW4A16Kernel
from lowbit_cuda.probe import probe_cuda


def test_registered_through_entry_point():
    assert registry("kernels").get("cuda.triton_w4a16") is TritonW4A16Kernel
    assert registry("packers").get("triton-kpack").name == "triton-kpack"
    names = [getattr(p, "__name__", "") for p in get_plugin_manager().pm.get_plugins()]
    assert "lowbit_cuda.plugin" in names


def test_probe_reasons():
    assert probe_cuda(torch.device("cpu")) == "runs on cuda, not cpu"
    assert TritonW4A16Kernel.probe(torch.device("meta")) == "runs on cuda, not meta"
    reason = TritonW4A16Kernel.probe(torch.device("cuda"))
    if not torch.cuda.is_available():
        assert reason.startswith("no CUDA device")
    else:
        assert reason is None or "compute capability" in reason


def test_selection_falls_back_with_reason_on_cpu():
    clear_cache()
    spec = KernelSpec(QuantScheme(4, 64), 128, 64, torch.float16)
    reasons = dict((k.name, r) for k, r in kernel_reasons(spec, torch.device("cpu")))
    assert reasons["cuda.triton_w4a16"] == "runs on cuda, not cpu"
    assert select_kernel(spec, "cpu").name != "cuda.triton_w4a16"


def test_configs_lookup():
    assert configs.lookup("gemv", 1)["BLOCK_M"] == 1
    assert configs.lookup("gemv", 16)["BLOCK_M"] == 16
    assert configs.lookup("gemm", 17)["BLOCK_M"] == 64
    assert configs.lookup("gemm", 4096)["BLOCK_M"] == 128
    assert configs.lookup("gemm", 4096, "Some Unknown GPU") == configs.lookup("gemm", 4096)
    for rows in configs.CONFIGS["default"].values():
        bounds = [b for b, _ in rows if b is not None]
        assert bounds == sorted(bounds)
