"""The example plugin, tested the way its users meet it: installed, found through its entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lowbit import KernelSpec, QuantScheme, select_kernel
from lowbit.plugins import reset_plugin_manager
from lowbit.run.nn import build_model, kernels_used
from lowbit.testing import KernelConformance, tiny_quantized_model
from lowbit_example_int8 import Int8PerChannelKernel

PLUGIN = "example-int8"
DIST = "lowbit-example-int8"
KERNEL = "example.int8_pc"
W8PC = QuantScheme(8, -1)


@pytest.fixture(autouse=True)
def _fresh_plugins():
    reset_plugin_manager()
    yield
    reset_plugin_manager()


class TestInt8Conformance(KernelConformance):
    kernel = Int8PerChannelKernel
    bits = (8,)
    group_sizes = (-1,)
    dtypes = (torch.bfloat16,)

    # the shared suite's batch/bias tests use w4; run the same checks at w8 per channel too
    @pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
    @pytest.mark.parametrize("batch", [1, 7, 33, 128])
    def test_w8_batches(self, batch, sym):
        self._check(QuantScheme(8, -1, sym=sym), batch, torch.bfloat16, bias=batch == 7)

    def test_w8_3d_input_and_bias(self):
        from lowbit.kernels.reference import ReferenceKernel
        from lowbit.testing import make_qweight

        qw = make_qweight(64, 256, W8PC, bias=True)
        x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(0))
        ref = ReferenceKernel(qw, torch.device("cpu"), torch.float32).forward(x)
        out = Int8PerChannelKernel(qw, torch.device("cpu"), torch.bfloat16).forward(x.bfloat16())
        assert out.shape == (2, 5, 64) and out.dtype == torch.bfloat16
        assert float((out.float() - ref).norm() / ref.norm()) <= 1.6e-2


def lowbit_cli(*argv: str, **env: str) -> subprocess.CompletedProcess:
    """``lowbit ...`` in a fresh process (the LOWBIT_* switches are read at plugin load)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("LOWBIT_")}
    full.update(env, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *argv], capture_output=True, text=True,
                          env=full, timeout=300)


def plugins_json(**env) -> dict:
    res = lowbit_cli("plugins", "--json", **env)
    assert res.returncode == 0, res.stderr
    return {p["name"]: p for p in json.loads(res.stdout)}


def kernels_json(*argv, **env) -> dict:
    res = lowbit_cli("kernels", "--json", *argv, **env)
    assert res.returncode == 0, res.stderr
    return {k["kernel"]: k for k in json.loads(res.stdout)["kernels"]}


def test_shows_in_lowbit_plugins():
    p = plugins_json()[PLUGIN]
    assert p["distribution"] == DIST and p["status"] == "loaded" and p["version"] == "0.1.0"
    assert p["provides"] == {"kernels": [KERNEL]}


def test_shows_in_lowbit_kernels_and_runs_w8_per_channel():
    k = kernels_json("--bits", "8", "--group-size", "-1", "--dtype", "bf16")[KERNEL]
    assert k["plugin"] == PLUGIN and k["can_run"] and k["priority"] == 80
    k = kernels_json("--bits", "4", "--group-size", "128")[KERNEL]
    assert not k["can_run"] and "supports bits (8,), got 4" in k["reason"]


def test_selected_where_best():
    spec = KernelSpec(W8PC, 4096, 4096, torch.bfloat16)
    chosen = select_kernel(spec, "cpu")
    assert chosen is Int8PerChannelKernel or chosen.priority > Int8PerChannelKernel.priority
    for other in (KernelSpec(QuantScheme(4, 128), 4096, 4096, torch.bfloat16),  # not 8-bit
                  KernelSpec(QuantScheme(8, 128), 4096, 4096, torch.bfloat16),  # grouped
                  KernelSpec(W8PC, 4096, 4096, torch.float32)):  # fp32 activations: slower than dense here
        assert select_kernel(other, "cpu") is not Int8PerChannelKernel


def test_a_w8_model_runs_on_it():
    qm = tiny_quantized_model(W8PC, tokenizer=False)
    model = build_model(qm, "cpu", torch.bfloat16)
    assert kernels_used(model) == {KERNEL: len(qm.qweights)}
    ref = build_model(qm, "cpu", torch.bfloat16, kernel="reference")
    ids = torch.randint(0, qm.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits.float(), ref(ids).logits.float()
    assert float((a - b).norm() / b.norm()) < 2e-2


@pytest.mark.parametrize("value", [PLUGIN, DIST])
def test_disabled_plugins_switch(value):
    p = plugins_json(LOWBIT_DISABLED_PLUGINS=value)[PLUGIN]
    assert p["status"] == "disabled by LOWBIT_DISABLED_PLUGINS" and p["provides"] == {}
    assert KERNEL not in kernels_json(LOWBIT_DISABLED_PLUGINS=value)


def test_disable_autoload_switch():
    assert PLUGIN not in plugins_json(LOWBIT_DISABLE_PLUGIN_AUTOLOAD="1")
    assert KERNEL not in kernels_json(LOWBIT_DISABLE_PLUGIN_AUTOLOAD="1")


def test_disabled_kernels_switch(monkeypatch):
    k = kernels_json("--bits", "8", "--group-size", "-1", LOWBIT_DISABLED_KERNELS=KERNEL)[KERNEL]
    assert not k["can_run"] and k["reason"] == "disabled by LOWBIT_DISABLED_KERNELS"
    monkeypatch.setenv("LOWBIT_DISABLED_KERNELS", KERNEL)
    assert select_kernel(KernelSpec(W8PC, 4096, 4096, torch.bfloat16), "cpu") is not Int8PerChannelKernel
