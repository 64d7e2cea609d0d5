import inspect
import sys
import types

import pytest
import torch

import lowbit
from lowbit import hookspecs
from lowbit.errors import LowbitError, NoKernelError, UnknownNameError
from lowbit.kernels.base import Kernel, KernelSpec
from lowbit.plugins import get_plugin_manager, registry
from lowbit.scheme import QuantScheme
from lowbit.selection import select_kernel

HOOKS = [n for n in dir(hookspecs) if n.startswith("lowbit_")]


def test_hooks_are_prefixed_and_documented():
    assert set(HOOKS) == {
        "lowbit_register_quantizers", "lowbit_register_packers", "lowbit_register_kernels",
        "lowbit_register_exporters", "lowbit_register_architectures", "lowbit_register_runtimes",
    }
    for name in HOOKS:
        fn = getattr(hookspecs, name)
        doc = inspect.getdoc(fn) or ""
        for param in inspect.signature(fn).parameters:
            assert f":param {param}:" in doc, f"{name} does not document {param}"


def test_hookimpl_is_public():
    assert lowbit.hookimpl is not None and "hookimpl" in lowbit.__all__


def test_builtins_register_through_hooks():
    assert "rtn" in registry("quantizers")
    assert "reference" in registry("kernels")
    assert "lowbit" in registry("exporters")
    assert registry("architectures").get("llama").name == "llama-family"
    assert registry("kernels").origin("reference") == "lowbit"


def test_registry_error_lists_known_names():
    with pytest.raises(UnknownNameError, match=r"unknown kernel 'nope'; known: .*reference"):
        registry("kernels").get("nope")


def _fake_plugin(monkeypatch, module_name="lowbit_fake_plugin", ep_name="fake", kernel_priority=100):
    """Install an entry point backed by an in-memory module, as a third-party package would."""
    class FakeKernel(Kernel):
        name = "fake"
        priority = kernel_priority
        supported_bits = (4,)

        def __init__(self, qweight, device, dtype):
            super().__init__(qweight, device, dtype)
            self.w = qweight.dequantize(dtype)

        def forward(self, x):
            return x @ self.w.T

    @lowbit.hookimpl
    def lowbit_register_kernels(register):
        register.add(FakeKernel)

    _install_plugin(monkeypatch, module_name, ep_name, lowbit_register_kernels=lowbit_register_kernels)
    return FakeKernel


def _install_plugin(monkeypatch, module_name: str, ep_name: str, **hooks) -> None:
    """Publish an in-memory module with these hook implementations under an entry point of group ``lowbit``,
    as an installed third-party package would, and forget the plugins loaded so far."""
    from importlib import metadata

    from lowbit.plugins import reset_plugin_manager

    mod = types.ModuleType(module_name)
    for name, fn in hooks.items():
        setattr(mod, name, fn)
    monkeypatch.setitem(sys.modules, module_name, mod)
    ep = metadata.EntryPoint(ep_name, module_name, "lowbit")
    real = metadata.entry_points

    def entry_points(**kw):
        if kw.get("group") == "lowbit":
            return metadata.EntryPoints(list(real(group="lowbit")) + [ep])
        return real(**kw)

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    reset_plugin_manager()


def _spec(bits=4):
    return KernelSpec(QuantScheme(bits, 64), 128, 64, torch.float32)


def test_entry_point_plugin_is_loaded_and_selected(monkeypatch):
    _fake_plugin(monkeypatch)
    names = [p.name for p in get_plugin_manager().plugins]
    assert "fake" in names
    assert select_kernel(_spec()).name == "fake"
    assert select_kernel(_spec(bits=3)).name != "fake"  # can_implement declines 3-bit


def test_disabled_kernels_moves_the_choice(monkeypatch):
    _fake_plugin(monkeypatch)
    monkeypatch.setenv("LOWBIT_DISABLED_KERNELS", "fake")
    assert select_kernel(_spec()).name != "fake"


def test_disabled_plugins_and_autoload(monkeypatch):
    from lowbit.plugins import reset_plugin_manager

    _fake_plugin(monkeypatch)
    monkeypatch.setenv("LOWBIT_DISABLED_PLUGINS", "fake")
    reset_plugin_manager()
    assert "fake" not in registry("kernels")
    assert any(p.name == "fake" and "disabled" in p.status for p in get_plugin_manager().plugins)
    monkeypatch.delenv("LOWBIT_DISABLED_PLUGINS")
    monkeypatch.setenv("LOWBIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    reset_plugin_manager()
    assert [p.name for p in get_plugin_manager().plugins] == ["lowbit"]
    assert registry("kernels").names() == ["reference"]


def test_misspelled_hook_fails_loudly(monkeypatch):
    from importlib import metadata

    mod = types.ModuleType("lowbit_typo_plugin")

    @lowbit.hookimpl
    def lowbit_register_kernel(register):  # missing "s"
        pass

    mod.lowbit_register_kernel = lowbit_register_kernel
    monkeypatch.setitem(sys.modules, "lowbit_typo_plugin", mod)
    real = metadata.entry_points
    ep = metadata.EntryPoint("typo", "lowbit_typo_plugin", "lowbit")
    monkeypatch.setattr(metadata, "entry_points",
                        lambda **kw: metadata.EntryPoints([ep]) if kw.get("group") == "lowbit" else real(**kw))
    with pytest.raises(LowbitError, match="typo.*lowbit_register_kernel"):
        get_plugin_manager()


def test_no_kernel_error_lists_every_reason(monkeypatch):
    monkeypatch.setenv("LOWBIT_DISABLED_KERNELS", ",".join(registry("kernels").names()))
    with pytest.raises(NoKernelError) as err:
        select_kernel(_spec())
    msg = str(err.value)
    assert "no kernel can run w4 g64" in msg
    for name in registry("kernels").names():
        assert f"- {name}: disabled by LOWBIT_DISABLED_KERNELS" in msg


def test_kernel_on_wrong_device_gives_reason():
    from lowbit.kernels.reference import ReferenceKernel

    class CudaOnly(ReferenceKernel):
        name = "cuda-only"
        device_types = ("cuda",)

    assert "runs on cuda, not cpu" in CudaOnly.probe(torch.device("cpu"))


def _plugin_module(monkeypatch, module_name: str, ep_name: str, **hooks):
    """An entry point ``ep_name`` backed by an in-memory module whose hooks are ``hooks``."""
    from importlib import metadata

    mod = types.ModuleType(module_name)
    for name, fn in hooks.items():
        setattr(mod, name, lowbit.hookimpl(fn))
    monkeypatch.setitem(sys.modules, module_name, mod)
    ep = metadata.EntryPoint(ep_name, module_name, "lowbit")
    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points", lambda **kw: metadata.EntryPoints(list(real(group="lowbit")) + [ep])
                        if kw.get("group") == "lowbit" else real(**kw))


def test_every_hook_registers_through_a_fake_plugin_and_is_used(monkeypatch):
    """One thing of each kind from a third-party entry point, each reached by the code that uses it."""
    from lowbit.algorithms.rtn import RTN
    from lowbit.checkpoint import LowbitCheckpoint
    from lowbit.exporting import check_formats
    from lowbit.models import LlamaAdapter, adapter_for
    from lowbit.packing import Packer
    from lowbit.pipeline import make_steps
    from lowbit.primitives import quantize
    from lowbit.qweight import QuantizedWeight
    from lowbit.recipe import Recipe

    packed = []

    class SpyPacker(Packer):
        name = "fake-layout"

        def pack(self, qw):
            packed.append(qw.out_features)
            return {"w": qw.dequantize()}

    class FakeKernel(Kernel):
        name = "fake.layout_kernel"
        priority = 1000
        layout = "fake-layout"

        def __init__(self, qweight, device, dtype):
            super().__init__(qweight, device, dtype)
            self.w = self.packer(registry("packers"))().pack(qweight)["w"].to(dtype)

        def forward(self, x):
            return x @ self.w.T

    class FakeRTN(RTN):
        name = "fake-rtn"

    class FakeFormat(LowbitCheckpoint):
        name = "fake-format"

        @classmethod
        def check(cls, scheme, config=None):
            return None if scheme.bits == 4 else "fake-format holds 4-bit only"

    class FakeAdapter(LlamaAdapter):
        name = "fake-arch"
        model_types = ("fakellama",)

    _plugin_module(
        monkeypatch, "lowbit_every_hook", "every-hook",
        lowbit_register_packers=lambda register: register.add(SpyPacker),
        lowbit_register_kernels=lambda register: register.add(FakeKernel),
        lowbit_register_quantizers=lambda register: register.add(FakeRTN),
        lowbit_register_exporters=lambda register: register.add(FakeFormat),
        lowbit_register_architectures=lambda register: register.add(FakeAdapter()),
    )
    for kind, name in (("packers", "fake-layout"), ("kernels", "fake.layout_kernel"), ("quantizers", "fake-rtn"),
                       ("exporters", "fake-format"), ("architectures", "fakellama")):
        assert registry(kind).origin(name) == "every-hook", kind
    assert [type(s) for s in make_steps(Recipe("fake-rtn", QuantScheme(4, 64)))] == [FakeRTN]
    with pytest.raises(LowbitError, match="fake-format: fake-format holds 4-bit only"):
        check_formats(["fake-format"], QuantScheme(3, 64))
    assert adapter_for({"model_type": "fakellama"}, registry("architectures")).name == "fake-arch"
    w = torch.randn(64, 128)
    qw: QuantizedWeight = quantize(w, QuantScheme(4, 64))
    kernel = select_kernel(KernelSpec.of(qw, torch.float32))
    assert kernel is FakeKernel
    y = kernel(qw, torch.device("cpu"), torch.float32).forward(torch.ones(2, 128))
    assert packed == [64]  # the kernel repacked through the registered packer of its layout
    torch.testing.assert_close(y, torch.ones(2, 128) @ qw.dequantize().T)


def test_checkpoint_functions_use_the_registries_they_are_given(ckpt):
    """export/read_checkpoint/detect_format/check_formats search the registries passed to them (the
    installed plugins' by default), and a model read back carries the adapter found there."""
    from lowbit.errors import CheckpointError
    from lowbit.exporting import check_formats, detect_format, export, read_checkpoint
    from lowbit.models import LLAMA_FAMILY
    from lowbit.registry import Registry

    assert read_checkpoint(ckpt).adapter is LLAMA_FAMILY
    assert read_checkpoint(ckpt, architectures=Registry("architecture")).adapter is None
    with pytest.raises(CheckpointError, match="is not a checkpoint lowbit can read"):
        detect_format(ckpt, exporters=Registry("exporter"))
    with pytest.raises(UnknownNameError, match="unknown exporter 'lowbit'; known: none"):
        check_formats(["lowbit"], QuantScheme(4, 32), exporters=Registry("exporter"))
    qm = read_checkpoint(ckpt, architectures=Registry("architecture"))
    with pytest.raises(UnknownNameError):
        export(qm, "lowbit", ckpt.parent / "again", exporters=Registry("exporter"))


def test_nothing_the_builtins_import_reaches_back_to_the_plugin_manager():
    """The plugin manager imports ``lowbit._builtin``; no module that import reaches (function-level
    imports and sub-package ``__init__``s included) may import the plugin manager: base classes and
    adapters are given the registries they use, so there is no import loop."""
    import ast
    from pathlib import Path

    import lowbit

    root = Path(lowbit.__file__).parent

    def source(mod: str) -> Path | None:
        path = root.joinpath(*mod.split(".")[1:])
        for f in (path / "__init__.py", path.with_suffix(".py")):
            if f.is_file():
                return f
        return None

    def imports(mod: str) -> set[str]:
        """The lowbit modules ``mod`` imports, with the sub-packages each import runs first."""
        f = source(mod)
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{parent}.{base}" if base else parent
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                out |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)
                        if parts[0] == "lowbit" and source(".".join(parts[:i]))}
        return out

    seen, todo = set(), ["lowbit._builtin"]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(imports(mod))
    assert {"lowbit.models.llama", "lowbit.checkpoint", "lowbit.kernels.base", "lowbit.exporter"} <= seen
    assert "lowbit.plugins" not in seen, sorted(seen)


class RecomputeRuntime(lowbit.Runtime):
    """A third-party runtime for the tests: the transformers modules over each sequence's whole history on
    every call (no KV cache), so its tokens must equal the transformers path's."""

    name = "recompute"
    priority = 50  # above the CPU backend's native decoder, where that is installed

    @classmethod
    def unsupported(cls, qmodel, dtype, lm_head="float", embedding="float"):
        return None if lm_head == "float" else "the recompute runtime keeps the float lm_head only"

    def __init__(self, qmodel, dtype, lm_head="float", capacity=0, consume=False, embedding="float"):
        from lowbit.run.nn import build_model

        self.model = build_model(qmodel, "cpu", dtype)
        self.reset(capacity, 1)

    def reset(self, capacity=None, slots=None):
        self.capacity = self.capacity if capacity is None else capacity
        self.slots = self.slots if slots is None else slots
        self.seqs = [[] for _ in range(self.slots)]

    def forward(self, ids, all_logits=False, threads=None, slot=0):
        new = [int(i) for i in torch.as_tensor(ids).reshape(-1)]
        self.seqs[slot] += new
        with torch.no_grad():
            logits = self.model(torch.tensor([self.seqs[slot]])).logits[0].float()
        return logits[-len(new):] if all_logits else logits[-1]

    def forward_rows(self, ids, slots, threads=None):
        return torch.stack([self.forward([i], slot=s) for i, s in zip(ids, slots)])

    def describe(self):
        return "recompute (transformers modules, no cache)"


def test_a_runtime_plugin_is_picked_and_drives_generation(monkeypatch):
    """A runtime published by a third party: ``--runtime`` offers it, ``auto`` picks it by priority,
    generation runs through it with the transformers path's tokens, and where it declines its reason is
    the fallback's (or the error, when it was asked for by name)."""
    import argparse

    from lowbit.run import engine
    from lowbit.testing.exporters import tiny_quantized_model

    @lowbit.hookimpl
    def lowbit_register_runtimes(register):
        register.add(RecomputeRuntime)

    _install_plugin(monkeypatch, "lowbit_recompute_plugin", "recompute",
                    lowbit_register_runtimes=lowbit_register_runtimes)
    assert registry("runtimes").origin("recompute") == "recompute"
    assert "recompute" in engine.runtime_names()
    p = argparse.ArgumentParser()
    engine.runtime_arg(p)
    assert p.parse_args(["--runtime", "recompute"]).runtime == "recompute"

    qm = tiny_quantized_model(QuantScheme(4, 64))
    runner = engine.runner_for(qm, torch.float32)
    assert runner.path == "recompute" and "recompute" in runner.describe()
    ref = engine.runner_for(qm, torch.float32, runtime="transformers")
    prompts = [[1, 5, 9, 20], [7, 3]]
    for prompt in prompts:
        ids = torch.tensor([prompt])
        assert engine.generate(runner, ids, 6).tolist() == engine.generate(ref, ids, 6).tolist()
    assert engine.generate_batch(runner, prompts, 6) == [engine.generate(ref, torch.tensor([q]), 6)[0].tolist()
                                                        for q in prompts]

    with pytest.raises(LowbitError, match="--runtime recompute: the recompute runtime keeps the float lm_head only"):
        engine.runner_for(qm, torch.float32, lm_head="int8", runtime="recompute")
    monkeypatch.setenv("LOWBIT_DISABLED_PLUGINS", "recompute")
    from lowbit.plugins import reset_plugin_manager

    reset_plugin_manager()
    assert "recompute" not in engine.runtime_names()
    with pytest.raises(LowbitError, match="runtime 'recompute' is not installed; installed: auto"):
        engine.runner_for(qm, torch.float32, runtime="recompute")


def test_without_runtime_plugins_the_transformers_path_runs(monkeypatch):
    from lowbit.plugins import reset_plugin_manager
    from lowbit.run import engine
    from lowbit.testing.exporters import tiny_quantized_model

    monkeypatch.setenv("LOWBIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    reset_plugin_manager()
    assert engine.runtime_names() == ("auto", "transformers")
    runner = engine.runner_for(tiny_quantized_model(QuantScheme(4, 64)), torch.float32)
    assert runner.path == "transformers" and runner.decoder is None
    assert "no runtime plugin is installed" in runner.why
