"""The plugin shows up, selection prefers the CPU kernels, LOWBIT_DISABLED_KERNELS moves the choice."""

import torch

from lowbit import registry, select_kernel
from lowbit.kernels.base import KernelSpec
from lowbit.scheme import QuantScheme
from lowbit.selection import kernel_reasons

W4 = KernelSpec(QuantScheme(4, 64), in_features=576, out_features=1536, dtype=torch.bfloat16)


def test_kernels_registered_with_origin(fresh_plugins):
    names = registry("kernels").names()
    for name in ("cpu.avx2_int4", "cpu.torch_int4", "cpu.torch_int8", "cpu.ipex_woq"):
        assert name in names
        assert registry("kernels").origin(name) == "backend-cpu"


def test_priorities_above_reference(fresh_plugins):
    for name in ("cpu.avx2_int4", "cpu.torch_int4", "cpu.torch_int8", "cpu.ipex_woq"):
        assert registry("kernels").get(name).priority > registry("kernels").get("reference").priority


def test_every_kernel_has_a_reason_or_runs(fresh_plugins):
    for _cls, reason in kernel_reasons(W4, torch.device("cpu")):
        assert reason is None or (isinstance(reason, str) and reason)


def test_disabled_kernels_moves_the_choice(fresh_plugins):
    first = select_kernel(W4, "cpu")
    assert first.name.startswith("cpu.")
    fresh_plugins.setenv("LOWBIT_DISABLED_KERNELS", first.name)
    from lowbit.plugins import reset_plugin_manager

    reset_plugin_manager()
    second = select_kernel(W4, "cpu")
    assert second.name != first.name
    reasons = dict((k.name, r) for k, r in kernel_reasons(W4, torch.device("cpu")))
    assert reasons[first.name] == "disabled by LOWBIT_DISABLED_KERNELS"
    fresh_plugins.setenv("LOWBIT_DISABLED_KERNELS", "cpu.avx2_int4,cpu.torch_int4,cpu.ipex_woq")
    reset_plugin_manager()
    assert select_kernel(W4, "cpu").name == "reference"


def test_grouped_8bit_falls_back_to_reference(fresh_plugins):
    spec = KernelSpec(QuantScheme(8, 64), in_features=576, out_features=64, dtype=torch.float32)
    assert select_kernel(spec, "cpu").name == "reference"
    spec = KernelSpec(QuantScheme(8, -1), in_features=576, out_features=64, dtype=torch.float32)
    assert select_kernel(spec, "cpu").name == "cpu.torch_int8"


def test_w3_falls_back_to_reference(fresh_plugins):
    spec = KernelSpec(QuantScheme(3, 64), in_features=576, out_features=64, dtype=torch.bfloat16)
    assert select_kernel(spec, "cpu").name == "reference"
