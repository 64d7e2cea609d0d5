"""The native decoder loaded from a lowbit checkpoint's packed codes (``read_checkpoint(path, lazy=True)``):
the same decoder as the one built from unpacked QuantizedWeights, bit for bit, with a peak memory of the packed
weights plus a few MB.

References: the decoder built the old way (``read_checkpoint(path)``, codes unpacked, then packed to nib64),
compared with ``torch.equal`` (the same nib64 bytes, scales and zeros give the same sums in the same order);
the peak is the resident set's high-water mark of a child process above its own level once torch, lowbit and
the engine are loaded.
"""

import ctypes
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from test_native_decoder import make_qmodel, prompt

from lowbit import read_checkpoint
from lowbit.checkpoint import LowbitCheckpoint
from lowbit.errors import CheckpointError, LowbitError
from lowbit.run import engine as runtime
from lowbit.scheme import QuantScheme
from lowbit_cpu import engine, native

pytestmark = pytest.mark.skipif(native.unavailable_reason() is not None,
                                reason=str(native.unavailable_reason()))


def write(qm, path):
    path.mkdir()
    LowbitCheckpoint().write(qm, path)
    return path


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "int8-act"])
def test_packed_load_is_bit_identical_to_the_unpacked_path(tmp_path, family, dtype):
    ckpt = write(make_qmodel(family), tmp_path / "ckpt")
    lazy = read_checkpoint(ckpt, lazy=True)
    assert not isinstance(lazy.qweights, dict)  # the codes stay on disk until the decoder converts them
    old = engine.NativeDecoder(read_checkpoint(ckpt), dtype, capacity=40)
    new = engine.NativeDecoder(lazy, dtype, capacity=40)
    for a, b in zip(old.keep, new.keep, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    ids = prompt(24)[0]
    assert torch.equal(old.forward(ids, all_logits=True), new.forward(ids, all_logits=True))
    assert torch.equal(old.forward(ids[:3]), new.forward(ids[:3]))


def test_bf16_tables_are_kept_as_stored_and_give_the_fp32_copy_logits(tmp_path):
    """A bf16 embedding and lm_head stay bf16 for fp32 activations (half the bytes of the fp32 copy the old
    loader made); the engine widens them exactly, so the logits are the fp32 copy's, bit for bit."""
    qm = make_qmodel("llama", tie_word_embeddings=False)
    qm.float_tensors = {k: v.bfloat16() for k, v in qm.float_tensors.items()}
    wide = make_qmodel("llama", tie_word_embeddings=False)
    wide.float_tensors = {k: v.float() for k, v in qm.float_tensors.items()}
    kept = engine.NativeDecoder(read_checkpoint(write(qm, tmp_path / "bf16"), lazy=True), torch.float32, capacity=24)
    copy = engine.NativeDecoder(wide, torch.float32, capacity=24)
    assert kept.md.embed_bf16 == 1 and kept.md.head_kind == engine.HEAD_BF16
    assert copy.md.embed_bf16 == 0 and copy.md.head_kind == engine.HEAD_F32
    emb = 2 * qm.config.vocab_size * qm.config.hidden_size  # each table's fp32 bytes minus its bf16 bytes
    assert copy.weight_bytes() - kept.weight_bytes() == 2 * emb  # embedding and lm_head
    ids = prompt(16)[0]
    assert torch.equal(kept.forward(ids, all_logits=True), copy.forward(ids, all_logits=True))


def test_version_1_checkpoint_still_runs(tmp_path):
    qm = make_qmodel("qwen2")
    v1 = tmp_path / "v1"
    v1.mkdir()
    tensors = {k: v.contiguous() for k, v in qm.float_tensors.items()}
    for mod, qw in qm.qweights.items():
        tensors.update({f"{mod}.{p}": t.contiguous() for p, t in qw.tensors().items()})
    save_file(tensors, str(v1 / "model.safetensors"), metadata={"format": "pt"})
    qm.config.save_pretrained(str(v1))
    (v1 / "lowbit.json").write_text(json.dumps({
        "format": "lowbit", "format_version": 1, "scheme": qm.scheme.to_dict(), "quantized_modules": sorted(qm.qweights),
        "tensor_hash": qm.tensor_hash(), "float_hash": qm.float_hash()}))
    ids = prompt(12)[0]
    want = engine.NativeDecoder(qm, torch.float32, capacity=12).forward(ids, all_logits=True)
    for lazy in (False, True):
        got = engine.NativeDecoder(read_checkpoint(v1, lazy=lazy), torch.float32, capacity=12)
        assert torch.equal(got.forward(ids, all_logits=True), want)


def test_damaged_scales_are_one_error_on_the_packed_path(tmp_path):
    """The checks every read makes on a quantized linear, made on the packed path too: a NaN scale written into
    the file (read without the hash check, which would catch it first) names the module, in one line."""
    qm = make_qmodel("llama")
    ckpt = write(qm, tmp_path / "ckpt")
    name = "model.layers.1.mlp.up_proj.scales"
    with open(ckpt / "model.safetensors", "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        start = json.loads(f.read(n))[name]["data_offsets"][0]
        f.seek(8 + n + start)
        f.write(torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="tensor_hash"):
        read_checkpoint(ckpt, lazy=True)
    lazy = LowbitCheckpoint().read(ckpt, lazy=True, verify=False)
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj: .*scales hold NaN") as err:
        engine.NativeDecoder(lazy, torch.float32)
    assert "\n" not in str(err.value)


def test_kv_cache_is_sized_from_the_request(tmp_path):
    qm = make_qmodel("llama")
    nat = runtime.runner_for(qm, torch.float32)
    assert nat.decoder.capacity == 0 and nat.decoder.cache_bytes() == 0  # nothing until a request
    runtime.generate(nat, prompt(8), 5)
    assert nat.decoder.capacity == 13
    runtime.generate(nat, prompt(8), 2)
    assert nat.decoder.capacity == 13  # grown, not shrunk
    ctx = qm.config.max_position_embeddings
    runtime.generate(nat, prompt(8), ctx - 8)
    assert nat.decoder.capacity == ctx
    with pytest.raises(LowbitError, match=rf"^the prompt \(8 tokens\) plus {ctx - 7} new tokens exceeds the model's "
                                          rf"context of {ctx} tokens\.$"):
        runtime.generate(nat, prompt(8), ctx - 7)
    assert nat.decoder.capacity == ctx


PEAK_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from lowbit import read_checkpoint
    from lowbit_cpu import engine, native
    native.engine_library(engine.wants_vnni())
    native.amx_unavailable_reason()  # process setup (the AMX tile permission), not the loader
    import transformers.models.llama.modeling_llama  # noqa: F401  (what the rope table imports)
    def status(key):  # VmHWM: this process's own high-water mark (ru_maxrss would carry the parent's over exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    base = status("VmRSS")
    assert status("VmHWM") - base < 2**20  # nothing bigger was freed before: the mark starts at this level
    dec = engine.NativeDecoder(read_checkpoint(sys.argv[1], lazy=True), torch.bfloat16, capacity=0)
    peak = status("VmHWM") - base
    print(json.dumps({"peak": peak, "weights": dec.weight_bytes()}))
""")


@pytest.mark.slow
def test_loader_peak_is_the_packed_weights_plus_a_few_mb(tmp_path):
    """Two layers at a 1B model's width (hidden 2048, MLP 8192): 67 MB packed, while the codes unpacked are
    134 MB and one layer's gate/up alone 34 MB. The load's peak above the packed weights is 18-25 MiB in the
    environments measured (the checkpoint reader's 11-12 MiB, the engine's structures); unpacking the model,
    or even one fused matrix, adds at least 34 MB on top of that, so a bound of 32 MiB fails it."""
    hidden, inter, layers = 2048, 8192, 2
    qm = make_qmodel("llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=16, num_key_value_heads=4, vocab_size=512)
    ckpt = write(qm, tmp_path / "big")
    del qm
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(ckpt)], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    codes = layers * (5 * hidden * hidden // 2 + 3 * hidden * inter)  # q, o: hidden²; k, v: hidden²/4 (4 of 16 heads)
    assert got["weights"] > codes / 2
    assert got["peak"] - got["weights"] < 32 * 2**20, got


def test_int8_embedding_decodes_its_rows_exactly():
    """``embedding="int8"``: each row looked up is (code - zero) * scale of the per-row int8 quantization (the int8
    lm_head's), so fp32 activations give, bit for bit, the logits of a float table holding those decoded rows."""
    from lowbit.primitives import quantize
    from lowbit.run.nn import LM_HEAD_SCHEMES

    qm = make_qmodel("llama", tie_word_embeddings=False)
    bits, gs, sym = LM_HEAD_SCHEMES["int8"]
    emb = "model.embed_tokens.weight"
    decoded = make_qmodel("llama", tie_word_embeddings=False)
    decoded.float_tensors = {**qm.float_tensors,
                             emb: quantize(qm.float_tensors[emb].float(), QuantScheme(bits, gs, sym=sym)).dequantize()}
    ids = prompt(16)[0]
    int8 = engine.NativeDecoder(qm, torch.float32, capacity=16, embedding="int8")
    assert int8.md.embed_bf16 == engine.EMBED_INT8 and "embedding int8" in int8.describe()
    want = engine.NativeDecoder(decoded, torch.float32, capacity=16).forward(ids, all_logits=True)
    assert torch.equal(int8.forward(ids, all_logits=True), want)
    v, h = qm.config.vocab_size, qm.config.hidden_size
    plain = engine.NativeDecoder(qm, torch.float32, capacity=16)
    assert plain.weight_bytes() - int8.weight_bytes() == 3 * v * h - 3 * v  # fp32 rows → int8 rows + fp16 scale, zero


def test_int8_embedding_shares_a_tied_int8_lm_head_and_is_refused_beside_a_tied_float_one(tmp_path):
    if not engine.wants_vnni():
        pytest.skip("an int8 lm_head needs AVX-512 VNNI")
    qm = make_qmodel("llama", tie_word_embeddings=True)
    head = engine.NativeDecoder(qm, torch.bfloat16, lm_head="int8", capacity=16)
    both = engine.NativeDecoder(qm, torch.bfloat16, lm_head="int8", capacity=16, embedding="int8")
    assert both.md.embed == ctypes.addressof(both.md) + engine.Model.head_q.offset  # one table
    table = qm.float_tensors["model.embed_tokens.weight"]
    assert head.weight_bytes() - both.weight_bytes() == table.numel() * 2  # only the float (bf16) table is gone
    assert both.streamed_bytes() == both.weight_bytes()
    assert both.forward(prompt(16)[0]).isfinite().all()
    reason = engine.unsupported(qm, torch.bfloat16, "float", "int8")
    assert reason == "an int8 embedding with the tied float lm_head would keep the float table too; add --lm-head int8"
    with pytest.raises(LowbitError, match=r"^--embedding int8 runs on the native decoder only, .*add --lm-head int8\.$"):
        runtime.runner_for(qm, torch.bfloat16, embedding="int8")
