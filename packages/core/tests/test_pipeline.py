"""RTN end to end on a tiny random llama, the lowbit checkpoint, and determinism."""

import json
import sys

import pytest
import torch

from lowbit import calibration, pipeline, read_checkpoint
from lowbit.errors import CalibrationError, CheckpointError
from lowbit.hf import LazyTensors
from lowbit.plugins import registry
from lowbit.primitives import fake_quantize
from lowbit.recipe import Recipe
from lowbit.run.nn import QuantLinear, build_model
from lowbit.scheme import QuantScheme
from lowbit.testing.models import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize("bits,gs", [(4, 64), (3, 32), (8, -1), (2, 128)])
def test_rtn_end_to_end_matches_fake_quantized_float_model(tiny_dir, tmp_path, bits, gs):
    scheme = QuantScheme(bits, gs)
    qm = pipeline.quantize(str(tiny_dir), method="rtn", scheme=scheme, out=tmp_path / "q", progress=False)
    assert len(qm.qweights) == 2 * 7
    loaded = read_checkpoint(tmp_path / "q" / "lowbit")
    assert loaded.diff(qm) == {}
    model = build_model(loaded, dtype=torch.float32)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14

    ref = tiny_llama(seed=0)  # the same seeded weights save_tiny_llama wrote
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.copy_(fake_quantize(mod.weight, scheme))
    ids = torch.randint(0, 384, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_checkpoint_hash_is_deterministic(tiny_dir, tmp_path):
    a = pipeline.quantize(str(tiny_dir), scheme=QuantScheme(4, 64), out=tmp_path / "a", progress=False)
    b = pipeline.quantize(str(tiny_dir), scheme=QuantScheme(4, 64), out=tmp_path / "b", progress=False)
    ha = json.loads((tmp_path / "a/lowbit/lowbit.json").read_text())["tensor_hash"]
    hb = json.loads((tmp_path / "b/lowbit/lowbit.json").read_text())["tensor_hash"]
    assert ha == hb and a.tensor_hash() == b.tensor_hash()
    c = pipeline.quantize(str(tiny_dir), scheme=QuantScheme(4, 32), progress=False)
    assert c.tensor_hash() != a.tensor_hash()


def test_manifest_records_scheme_recipe_versions(tiny_dir, tmp_path):
    pipeline.quantize(str(tiny_dir), scheme=QuantScheme(4, 64, sym=True), out=tmp_path / "q", progress=False)
    m = json.loads((tmp_path / "q/lowbit/lowbit.json").read_text())
    assert m["scheme"] == {"bits": 4, "group_size": 64, "sym": True, "act_order": False, "version": 1}
    assert m["recipe"]["method"] == "rtn" and m["recipe"]["steps"][0]["name"] == "rtn"
    assert "lowbit" in m["versions"] and "torch" in m["versions"]
    assert len(m["quantized_modules"]) == 14


def test_corrupt_checkpoint_is_refused(tiny_dir, tmp_path):
    pipeline.quantize(str(tiny_dir), scheme=QuantScheme(4, 64), out=tmp_path / "q", progress=False)
    st = LazyTensors(tmp_path / "q/lowbit").file("model.layers.1.mlp.up_proj.qcodes")
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        read_checkpoint(tmp_path / "q/lowbit")


def test_tampered_codes_fail_the_hash(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    pipeline.quantize(str(tiny_dir), scheme=QuantScheme(4, 64), out=tmp_path / "q", progress=False)
    st = LazyTensors(tmp_path / "q/lowbit").file("model.layers.0.mlp.up_proj.qcodes")
    t = load_file(str(st))
    key = next(k for k in t if k.endswith(".qcodes"))
    t[key] = (t[key] ^ 1).contiguous()
    save_file(t, str(st), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tensor_hash"):
        read_checkpoint(tmp_path / "q/lowbit")


@pytest.mark.parametrize("edit", [{"sym": True}, {"group_size": 32}, {"act_order": True}])
def test_tensor_hash_covers_the_scheme(tiny_dir, tmp_path, edit):
    """An edited scheme would decode the same tensors differently: the manifest's hash refuses it."""
    pipeline.quantize(str(tiny_dir), scheme=QuantScheme(4, 64), out=tmp_path / "q", progress=False)
    path = tmp_path / "q/lowbit/lowbit.json"
    manifest = json.loads(path.read_text())
    manifest["scheme"].update(edit)
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="tensor_hash"):
        read_checkpoint(tmp_path / "q/lowbit")


def test_tensor_hash_covers_the_widths_and_layout(tiny_dir, tmp_path, monkeypatch):
    from lowbit import checkpoint

    pipeline.quantize(str(tiny_dir), scheme=QuantScheme(4, 64), out=tmp_path / "q", progress=False)
    path = tmp_path / "q/lowbit/lowbit.json"
    manifest = json.loads(path.read_text())
    monkeypatch.setattr(checkpoint, "CODES_LAYOUT", checkpoint.CODES_LAYOUT + " (another layout)")
    with pytest.raises(CheckpointError, match="tensor_hash"):  # a reader of another layout refuses these codes
        read_checkpoint(tmp_path / "q/lowbit")
    monkeypatch.undo()
    read_checkpoint(tmp_path / "q/lowbit")
    manifest["in_features"] = {m: k + 8 for m, k in manifest["in_features"].items()}
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="tensor_hash"):
        read_checkpoint(tmp_path / "q/lowbit")


def test_calibration_samples_are_deterministic_windows():
    tok = tiny_tokenizer()
    text = calibration.load_text("wikitext2")
    a = calibration.samples(tok, text, 4, 64)
    b = calibration.samples(tok, text, 4, 64)
    assert a.shape == (4, 64) and torch.equal(a, b)
    assert calibration.fingerprint("wikitext2", a)["sha256"] == calibration.fingerprint("wikitext2", b)["sha256"]


def test_calibration_bad_input(tmp_path):
    tok = tiny_tokenizer()
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        calibration.load_text(str(empty))
    with pytest.raises(CalibrationError, match="shorter than one sample"):
        calibration.samples(tok, "just a few words", 1, 512)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:1"):
        calibration.load_text(str(bad))
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello"}\n\n{"text": "world"}\n')
    assert calibration.load_text(str(good)) == "hello\n\nworld"


def test_calibrated_pass_reports_layer_errors(tiny_dir):
    """A pass with a calibration-needing step runs the layers and reports each layer's output error."""
    from lowbit.algorithms.rtn import RTN
    from lowbit.models import adapter_for
    from lowbit.testing.models import tiny_llama

    class CalibratedRTN(RTN):
        needs_calibration = True

    model = tiny_llama(seed=0)
    ids = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(4, 64)
    adapter = adapter_for(model.config, registry("architectures"))
    recipe = Recipe(scheme=scheme, batch_size=2)
    qweights, report = pipeline.run_pass(model, adapter, [CalibratedRTN(scheme)], recipe, ids, progress=False)
    assert len(qweights) == 14
    errs = [r["output_rel_error"] for r in report.layers]
    assert len(errs) == 2 and all(0 < e < 0.5 for e in errs)
    assert all(r["error_samples"] == 2 for r in report.layers)  # report_batches=1 batch of 2
    _, two = pipeline.run_pass(tiny_llama(seed=0), adapter, [CalibratedRTN(scheme)], recipe, ids, progress=False,
                               report_batches=2)
    assert all(r["error_samples"] == 4 for r in two.layers)


def test_awq_records_the_float_reference_without_changing_the_report():
    """AWQ's statistics pass streams the untouched float layer and keeps the report batches'
    outputs as the error report's reference: the same layer errors as a separate float forward."""
    from lowbit.models import adapter_for
    from lowbit.testing.models import tiny_llama

    ids = torch.randint(0, 384, (6, 32), generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(4, 32)
    reports = []
    for records in (True, False):
        model = tiny_llama(seed=0)
        recipe = Recipe("awq", scheme, {"awq": {"n_grid": 4}}, batch_size=2)
        steps = pipeline.make_steps(recipe)
        assert steps[0].records_reference
        steps[0].records_reference = records
        adapter = adapter_for(model.config, registry("architectures"))
        qweights, report = pipeline.run_pass(model, adapter, steps, recipe, ids, progress=False)
        reports.append(([r["output_rel_error"] for r in report.layers], {k: v.codes for k, v in qweights.items()}))
    assert reports[0][0] == reports[1][0]
    assert all(torch.equal(reports[0][1][k], reports[1][1][k]) for k in reports[0][1])


def test_stream_reference_is_the_float_forward():
    from lowbit.algorithms.base import LayerContext
    from lowbit.models import adapter_for
    from lowbit.testing.models import tiny_llama

    model = tiny_llama(seed=0)
    ad = adapter_for(model.config, registry("architectures"))
    ids = torch.randint(0, 384, (6, 32), generator=torch.Generator().manual_seed(0))
    xs, kws = pipeline.capture_layer_inputs(model, ad, ids, 2)
    layer = ad.layers(model)[0]
    ctx = LayerContext(0, ad.layer_prefix(0), layer, ad.groups(layer), QuantScheme(4, 32), xs, kws, report_batches=2)
    seen = []
    ctx.stream({"self_attn.q_proj": lambda b, a, kw: seen.append(b)}, reference=True)
    assert seen == [0, 1, 2] and len(ctx.reference) == 2
    want = ctx.forward(2)
    assert all(torch.equal(a, b) for a, b in zip(ctx.reference, want))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_freed_activation_memory_goes_back_to_the_os():
    """Freed 8 MiB activation-sized blocks that sit between live small tensors come from the heap
    (no mmap and page faults per tensor) and go back to the OS at the next return_freed_memory(),
    which the pass calls after each layer."""
    import resource

    from lowbit.heap import return_freed_memory

    if not return_freed_memory():
        pytest.skip("not glibc")

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    keep, blocks = [], []
    blocks.append(torch.ones(2 << 20))  # one mmapped 8 MiB block freed: glibc's threshold would rise
    del blocks[0]
    before = rss_mib()
    for _ in range(8):
        blocks.append(torch.ones(2 << 20))  # 8 MiB
        keep.append(torch.ones(16 << 10))  # 64 KiB kept alive after each block
    del blocks
    assert return_freed_memory()
    assert rss_mib() - before < 24, "freed 8 MiB blocks stayed resident"


def test_cache_root_follows_lowbit_cache(monkeypatch, tmp_path):
    from lowbit.loading import ModelSource, _cached, cache_root

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    for off in ("off", "0", ""):
        monkeypatch.setenv("LOWBIT_CACHE", off)
        assert cache_root() is None
    monkeypatch.delenv("LOWBIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "lowbit"
    src = ModelSource("x", str(tmp_path), "missing.gguf")  # no file: nothing cached, nothing to convert
    assert _cached(src) == src


@pytest.mark.parametrize("flags, dtype", [
    ({"avx2", "fma"}, torch.float32),  # bf16 emulated: ~8x slower than fp32
    ({"avx2", "avx512f", "avx512_bf16"}, torch.float32),  # AVX512-BF16 without AMX: ~0.6x fp32 measured
    ({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, torch.bfloat16),
    (set(), torch.float32),
])
def test_auto_compute_dtype_is_bf16_only_with_amx(flags, dtype):
    assert pipeline.fast_compute_dtype(flags) == dtype


def test_quantize_uses_the_registries_it_is_given(tiny_dir):
    """The pipeline takes its steps, adapters and formats from the registries passed to it, not from
    the process's plugin manager: a step known only to the given registry runs."""
    from lowbit.algorithms.rtn import RTN
    from lowbit.errors import UnsupportedSchemeError
    from lowbit.plugins import get_plugin_manager
    from lowbit.registry import Registry

    class Private(RTN):
        name = "private-rtn"

    quantizers = Registry("quantizer")
    quantizers.add("private-rtn", Private, "test")
    registries = {**get_plugin_manager().registries, "quantizers": quantizers}
    qm = pipeline.quantize(str(tiny_dir), method="private-rtn", scheme=QuantScheme(4, 32), progress=False,
                           registries=registries)
    assert qm.manifest["recipe"]["steps"][0]["name"] == "private-rtn"
    with pytest.raises(UnsupportedSchemeError, match="unknown method 'private-rtn'"):
        pipeline.quantize(str(tiny_dir), method="private-rtn", scheme=QuantScheme(4, 32), progress=False)
    with pytest.raises(UnsupportedSchemeError, match="unknown method 'rtn'"):
        pipeline.quantize(str(tiny_dir), method="rtn", scheme=QuantScheme(4, 32), progress=False,
                          registries=registries)
