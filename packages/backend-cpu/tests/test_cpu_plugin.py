"""The plugin shows up, selection prefers the CPU kernels, LOWBIT_DISABLED_KERNELS moves the choice."""

import torch

from lowbit import registry, select_kernel
from lowbit.kernels.base import KernelSpec
from lowbit.scheme import QuantScheme
from lowbit.selection import kernel_reasons

W4 = KernelSpec(QuantScheme(4, 64), in_features=576, out_features=1536, dtype=torch.bfloat16)


def test_kernels_registered_with_origin(fresh_plugins):
    names = registry("kernels").names()
    for name in ("cpu.vnni_int4", "cpu.vnni_int8", "cpu.avx2_int4", "cpu.torch_int4", "cpu.torch_int8", "cpu.ipex_woq"):
        assert name in names
        assert registry("kernels").origin(name) == "backend-cpu"


def test_priorities_above_reference(fresh_plugins):
    for name in ("cpu.vnni_int4", "cpu.vnni_int8", "cpu.avx2_int4", "cpu.torch_int4", "cpu.torch_int8", "cpu.ipex_woq"):
        assert registry("kernels").get(name).priority > registry("kernels").get("reference").priority


def test_every_kernel_has_a_reason_or_runs(fresh_plugins):
    for _cls, reason in kernel_reasons(W4, torch.device("cpu")):
        assert reason is None or (isinstance(reason, str) and reason)


def _cpu_choice(spec):
    """The best kernel for ``spec`` among this package's and the reference (other plugins may be installed)."""
    ours = [k for k, r in kernel_reasons(spec, torch.device("cpu")) if r is None
            and (k.name.startswith("cpu.") or k.name == "reference")]
    return ours[0].name


def test_disabled_kernels_moves_the_choice(fresh_plugins):
    first = _cpu_choice(W4)
    assert first.startswith("cpu.")
    fresh_plugins.setenv("LOWBIT_DISABLED_KERNELS", first)
    from lowbit.plugins import reset_plugin_manager

    reset_plugin_manager()
    second = _cpu_choice(W4)
    assert second != first
    reasons = {k.name: r for k, r in kernel_reasons(W4, torch.device("cpu"))}
    assert reasons[first] == "disabled by LOWBIT_DISABLED_KERNELS"
    assert select_kernel(W4, "cpu").name != first
    fresh_plugins.setenv("LOWBIT_DISABLED_KERNELS", "cpu.vnni_int4,cpu.avx2_int4,cpu.torch_int4,cpu.ipex_woq")
    reset_plugin_manager()
    assert _cpu_choice(W4) == "reference"
    assert not select_kernel(W4, "cpu").name.startswith("cpu.")


def test_grouped_8bit_falls_back_to_reference(fresh_plugins):
    spec = KernelSpec(QuantScheme(8, 64), in_features=576, out_features=64, dtype=torch.float32)
    assert _cpu_choice(spec) == "reference"
    spec = KernelSpec(QuantScheme(8, -1), in_features=576, out_features=64, dtype=torch.float32)
    assert _cpu_choice(spec) == "cpu.torch_int8"


def test_w3_falls_back_to_reference(fresh_plugins):
    spec = KernelSpec(QuantScheme(3, 64), in_features=576, out_features=64, dtype=torch.bfloat16)
    assert _cpu_choice(spec) == "reference"


def test_bf16_prefill_tiles_only_with_amx(monkeypatch):
    # AVX512-BF16 without AMX ran bf16 GEMMs at ~0.6x fp32 on a Xeon; only AMX makes bf16 the faster choice
    from lowbit import cpuinfo as core_cpuinfo
    from lowbit_cpu import cpuinfo

    monkeypatch.setattr(core_cpuinfo, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "avx512f", "avx512_bf16"}))
    assert not cpuinfo.has_fast_bf16_matmul()
    monkeypatch.setattr(core_cpuinfo, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "amx_tile", "amx_bf16"}))
    assert cpuinfo.has_fast_bf16_matmul()
