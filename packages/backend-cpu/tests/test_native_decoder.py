"""The native decoder (lowbit_cpu.engine, csrc/engine.c) against the transformers path on tiny seeded models.

Reference: the same QuantizedModel built by ``lowbit.run.nn.build_model`` (transformers modules, lowbit's
kernels). Tolerances: fp32 activations run the same arithmetic in another order, so logits agree to 1e-4
relative (measured ~1e-6) and greedy tokens are identical; bf16 rounds activations (transformers: bf16
everywhere; native: int8 per 64 columns into each linear, fp32 elsewhere), so logits are compared relative to
their norm within 4e-2 (the kernels' bf16 tolerance is 1.6e-2 per linear; measured 1.1-1.5 % over a 2-layer
model) and greedy picks wherever the reference's top-2 margin exceeds that error.
"""

import pytest
import torch

from lowbit import QuantizedModel
from lowbit.errors import LowbitError
from lowbit.pipeline import float_tensors_of
from lowbit.primitives import quantize
from lowbit.run import engine as runtime
from lowbit.run.nn import build_model
from lowbit.scheme import QuantScheme
from lowbit.testing.models import tiny_model
from lowbit_cpu import engine, native

pytestmark = pytest.mark.skipif(native.unavailable_reason() is not None,
                                reason=str(native.unavailable_reason()))

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


def make_qmodel(model_type: str, scheme=QuantScheme(4, 64), **overrides) -> QuantizedModel:
    model = tiny_model(model_type, seed=0, **overrides)
    qweights = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            q = quantize(mod.weight.detach(), scheme)
            if mod.bias is not None:  # Qwen2's q/k/v biases
                q.bias = mod.bias.detach().clone()
            qweights[name] = q
    return QuantizedModel(model.config, scheme, qweights, float_tensors_of(model, qweights))


@pytest.fixture(scope="module", params=FAMILIES)
def qm(request):
    return make_qmodel(request.param)


def prompt(n=8, seed=1):
    return torch.randint(1, 384, (1, n), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_fp32_greedy_64_tokens_and_logits(qm):
    ref = runtime.Runner(qm, "transformers", "test", model=build_model(qm, dtype=torch.float32))
    nat = runtime.runner_for(qm, torch.float32, capacity=128)
    assert nat.path == "native", nat.why
    ids = prompt()
    want = runtime.generate(ref, ids, 64)
    got = runtime.generate(nat, ids, 64)
    assert got.shape == want.shape == (1, 72)
    assert torch.equal(got, want)
    with torch.no_grad():
        ref_logits = ref.model(want).logits[0]
    dec = nat.decoder
    dec.reset()
    step = torch.stack([dec.forward(want[0, :8])] + [dec.forward(want[0, i:i + 1]) for i in range(8, 72)])
    assert rel(step, ref_logits[7:]) < 1e-4
    dec.reset()
    assert rel(dec.forward(want[0], all_logits=True), ref_logits) < 1e-4


def test_bf16_logits_within_tolerance(qm):
    ref32 = runtime.Runner(qm, "transformers", "test", model=build_model(qm, dtype=torch.float32))
    seq = runtime.generate(ref32, prompt(), 64)
    with torch.no_grad():
        ref = build_model(qm, dtype=torch.bfloat16)(seq).logits[0].float()
    dec = engine.NativeDecoder(qm, torch.bfloat16, capacity=80)
    step = torch.stack([dec.forward(seq[0, :8])] + [dec.forward(seq[0, i:i + 1]) for i in range(8, 72)])
    ref = ref[7:]
    err = rel(step, ref)
    assert err < 4e-2
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err * ref.norm(dim=-1) / ref.shape[-1] ** 0.5
    assert clear.sum() > 0
    assert torch.equal(step.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_threads_1_and_2_agree(qm):
    for dtype in (torch.float32, torch.bfloat16):
        dec = engine.NativeDecoder(qm, dtype, capacity=64)
        ids = prompt(40)[0]
        one = dec.forward(ids, all_logits=True, threads=1)
        dec.reset()
        two = dec.forward(ids, all_logits=True, threads=2)
        assert torch.equal(one, two)  # every output element is summed by one thread, in the same order


def test_prompt_longer_than_cache():
    dec = engine.NativeDecoder(make_qmodel("llama"), torch.float32, capacity=16)
    with pytest.raises(LowbitError, match=r"^20 positions do not fit the KV cache of 16 \(prompt and new"):
        dec.forward(prompt(20)[0])
    dec.forward(prompt(10)[0])
    with pytest.raises(LowbitError, match="16 positions|do not fit"):
        dec.forward(prompt(7)[0])
    assert "\n" not in str(pytest.raises(LowbitError, dec.forward, prompt(7)[0]).value)


def test_avx2_build_matches_vnni_and_has_no_avx512(monkeypatch):
    qm = make_qmodel("llama")
    ids = prompt(24)[0]
    first = engine.NativeDecoder(qm, torch.bfloat16, capacity=32)
    first.md.gemm = engine.GEMM_ROWS  # the VPDPBUSD row kernels (the AMX tiles: test_native_prefill.py)
    a = first.forward(ids, all_logits=True)
    from lowbit import cpuinfo as core_cpuinfo

    flags = frozenset({"avx2", "fma", "f16c"})
    monkeypatch.setattr(core_cpuinfo, "cpu_flags", lambda: flags)
    monkeypatch.setattr(native.cpuinfo, "cpu_flags", lambda: flags)
    assert native.vnni_unavailable_reason() is not None
    avx2 = engine.NativeDecoder(qm, torch.bfloat16, capacity=32)
    assert not avx2.vnni and avx2.lib.lowbit_engine_isa() == 0
    assert "AVX2" in avx2.describe()
    b = avx2.forward(ids, all_logits=True)
    # same int8 activations and int32 dot products; only the float accumulation order differs
    assert rel(b, a) < 1e-5
    assert engine.unsupported(qm, torch.bfloat16, "int8") == "an int8 lm_head needs AVX-512 VNNI in the native decoder"
    import shutil
    import subprocess

    if shutil.which("objdump"):
        so = native._library_path(native.ENGINE_SOURCE, native.CFLAGS)
        asm = subprocess.run(["objdump", "-d", str(so)], capture_output=True, text=True, check=True).stdout
        assert "zmm" not in asm and "{k" not in asm


@pytest.mark.parametrize("lm_head", ["int4", "int8"])
def test_quantized_lm_head_matches_transformers(lm_head):
    if lm_head == "int8" and not engine.wants_vnni():
        pytest.skip("int8 lm_head needs AVX-512 VNNI")
    qm = make_qmodel("llama")
    ids = prompt(16)
    with torch.no_grad():
        ref = build_model(qm, dtype=torch.bfloat16, lm_head=lm_head)(ids).logits[0].float()
    got = engine.NativeDecoder(qm, torch.bfloat16, lm_head=lm_head, capacity=16).forward(ids[0], all_logits=True)
    assert rel(got, ref) < 4e-2


def test_declines_with_reasons():
    qm = make_qmodel("llama", scheme=QuantScheme(8, 64))
    assert engine.unsupported(qm, torch.float32) == \
        "model.layers.0.self_attn.q_proj is 8-bit; the native decoder runs 4-bit weights"
    r = runtime.runner_for(qm, torch.float32)
    assert r.path == "transformers" and "8-bit" in r.why
    with pytest.raises(LowbitError, match="--runtime native: .*8-bit"):
        runtime.runner_for(qm, torch.float32, runtime="native")
    qm4 = make_qmodel("llama", scheme=QuantScheme(4, 32))
    assert "group size 32" in engine.unsupported(qm4, torch.float32)
    assert "fp32 or bf16" in engine.unsupported(make_qmodel("llama"), torch.float16)
    assert "phi3" in engine.unsupported(make_qmodel("phi3"), torch.float32)


def test_runtime_switches(monkeypatch):
    qm = make_qmodel("llama")
    assert runtime.runner_for(qm, torch.float32, capacity=16).path == "native"
    assert runtime.runner_for(qm, torch.float32, runtime="transformers").path == "transformers"
    assert runtime.runner_for(qm, torch.float32, kernel="reference").why.startswith("--kernel reference")
    monkeypatch.setenv("LOWBIT_RUNTIME", "transformers")
    assert runtime.runner_for(qm, torch.float32).why == "asked for the transformers runtime"


def test_sampling_and_eos():
    qm = make_qmodel("llama")
    nat = runtime.runner_for(qm, torch.float32, capacity=16)
    ids = prompt()
    greedy = runtime.generate(nat, ids, 6)
    stop = int(greedy[0, 9])
    cut = runtime.generate(nat, ids, 6, eos=[stop])
    assert torch.equal(cut, greedy[:, :10])
    torch.manual_seed(0)
    a = runtime.generate(nat, ids, 6, temperature=1.0, top_p=0.9)
    torch.manual_seed(0)
    b = runtime.generate(nat, ids, 6, temperature=1.0, top_p=0.9)
    assert torch.equal(a, b) and a.shape == (1, 14)
    grown = runtime.generate(nat, ids, 40)  # more than the capacity: the cache grows to fit
    assert grown.shape == (1, 48) and nat.decoder.capacity >= 48


def test_perplexity_through_the_native_decoder():
    from lowbit.run.evaluate import perplexity

    qm = make_qmodel("qwen3")
    windows = torch.randint(1, 384, (2, 48), generator=torch.Generator().manual_seed(3))
    ref = perplexity(build_model(qm, dtype=torch.float32), windows=windows, seqlen=48, progress=False)["ppl"]
    nat = runtime.LogitsModel(runtime.runner_for(qm, torch.float32, capacity=16))  # the cache grows to the window
    assert perplexity(nat, windows=windows, seqlen=48, progress=False)["ppl"] == pytest.approx(ref, rel=1e-4)


def test_mistral_sliding_window():
    """A window of 8 positions, prompt and steps past it: the native decoder drops the same keys transformers masks."""
    qm = make_qmodel("mistral", sliding_window=8)
    ref = runtime.Runner(qm, "transformers", "test", model=build_model(qm, dtype=torch.float32))
    nat = runtime.runner_for(qm, torch.float32, capacity=40)
    assert nat.decoder.md.window == 8
    ids = prompt(12)
    want = runtime.generate(ref, ids, 20)
    assert torch.equal(runtime.generate(nat, ids, 20), want)
    with torch.no_grad():
        ref_logits = ref.model(want).logits[0]
    nat.decoder.reset()
    assert rel(nat.decoder.forward(want[0], all_logits=True), ref_logits) < 1e-4


def test_llama3_rope_scaling_and_theta():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    qm = make_qmodel("llama", rope_parameters=rope)
    ids = prompt(48)
    with torch.no_grad():
        ref = build_model(qm, dtype=torch.float32)(ids).logits[0]
    got = engine.NativeDecoder(qm, torch.float32, capacity=48).forward(ids[0], all_logits=True)
    assert rel(got, ref) < 1e-4
    plain = engine.NativeDecoder(make_qmodel("llama"), torch.float32, capacity=48).forward(ids[0], all_logits=True)
    assert rel(plain, ref) > 1e-3  # the scaling changes the logits, and the decoder follows it
