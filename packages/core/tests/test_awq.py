"""AWQ on tiny seeded llamas: quality against RTN, exact folding, dump → load, determinism, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lowbit.algorithms.awq import AWQ, _first_input, _take_rows, apply_clip, awq_scales, clip_search, gram, read_results
from lowbit.algorithms.base import LayerContext
from lowbit.algorithms.rtn import RTN
from lowbit.errors import CheckpointError, LowbitError, UnsupportedSchemeError
from lowbit.models import LLAMA_FAMILY
from lowbit.pipeline import capture_layer_inputs
from lowbit.plugins import registry
from lowbit.primitives import fake_quantize
from lowbit.scheme import QuantScheme
from lowbit.testing import QuantizerConformance
from lowbit.testing.models import tiny_llama

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def outlier_llama(seed: int = 0, **overrides):
    """A tiny random llama whose norms make a few activation channels large, as real LLMs have."""
    model = tiny_llama(seed, **{**SMALL, **overrides})
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 8
            layer.post_attention_layernorm.weight[5:8] *= 8
    return model


def calib_ids(n: int = 8, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 384, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def layer_inputs(model, ids, index: int, batch_size: int = 4):
    """The inputs and keyword arguments reaching decoder layer ``index``, per batch."""
    return capture_layer_inputs(model, LLAMA_FAMILY, ids, batch_size, index)


def make_ctx(model, ids, index: int, scheme: QuantScheme, layer=None) -> LayerContext:
    xs, kws = layer_inputs(model, ids, index)
    layer = layer if layer is not None else LLAMA_FAMILY.layers(model)[index]
    return LayerContext(index, LLAMA_FAMILY.layer_prefix(index), layer, LLAMA_FAMILY.groups(layer), scheme, xs, kws)


def rel_error(ref, out) -> float:
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(ref, out))
    return (num / sum(float(a.pow(2).sum()) for a in ref)) ** 0.5


@torch.no_grad()
def run_steps(model, steps, ids, blocks=True, outputs: list | None = None) -> dict:
    """A minimal layer-by-layer pass (the shape of the pipeline's): returns the QuantizedWeights;
    ``blocks=False`` declares no replayable blocks; ``outputs`` receives the last layer's outputs."""
    for s in steps:
        s.prepare(model, LLAMA_FAMILY)
    xs, kws = layer_inputs(model, ids, 0)
    qweights: dict = {}
    for i, layer in enumerate(LLAMA_FAMILY.layers(model)):
        ctx = LayerContext(i, LLAMA_FAMILY.layer_prefix(i), layer, LLAMA_FAMILY.groups(layer), steps[0].scheme,
                           xs, kws, qweights=qweights, blocks=LLAMA_FAMILY.blocks(layer) if blocks else {})
        for s in steps:
            ctx.replays.clear()
            s.apply(ctx)
        xs = ctx.forward()
    for s in steps:
        s.finish()
    if outputs is not None:
        outputs.extend(xs)
    return qweights


def layer_error(model, ids, index, scheme, steps) -> float:
    layer = copy.deepcopy(LLAMA_FAMILY.layers(model)[index])
    ctx = make_ctx(model, ids, index, scheme, layer)
    ref = ctx.forward()
    for s in steps:
        s.apply(ctx)
    return rel_error(ref, ctx.forward())


def test_registered():
    assert registry("quantizers").get("awq") is AWQ
    assert AWQ.quantizes is False and AWQ.needs_calibration


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32), QuantScheme(3, 32, sym=True), QuantScheme(3, -1)],
                         ids=lambda s: s.describe())
def test_awq_lowers_layer_error_below_rtn(scheme):
    model, ids = outlier_llama(), calib_ids()
    rtn = layer_error(model, ids, 1, scheme, [RTN(scheme)])
    awq = layer_error(model, ids, 1, scheme, [AWQ(scheme, n_grid=5), RTN(scheme)])
    assert awq < 0.9 * rtn, (awq, rtn)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "v-to-o"])
def test_scales_fold_exactly(kv_heads):
    """With clipping off and nothing quantized, the scaled layer computes the same function."""
    model, ids = outlier_llama(num_key_value_heads=kv_heads), calib_ids()
    scheme = QuantScheme(4, 32)
    ctx = make_ctx(model, ids, 0, scheme)
    ref = ctx.forward()
    before = {n: p.clone() for n, p in ctx.layer.named_parameters()}
    step = AWQ(scheme, n_grid=6, clip=False)
    step.apply(ctx)
    assert not ctx.qweights
    changed = [n for n, p in ctx.layer.named_parameters() if not torch.equal(p, before[n])]
    assert "input_layernorm.weight" in changed and "mlp.down_proj.weight" in changed
    if kv_heads == 4:
        assert "self_attn.o_proj.weight" in changed and "self_attn.v_proj" in ctx.report["awq_alpha"]
    out = ctx.forward()
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_search_on_part_of_a_batch():
    """search_tokens below one batch runs the inspect modules on that many whole sequences (the
    batch's first rows, position embeddings cut with them) and still beats RTN."""
    model, ids = outlier_llama(), calib_ids()  # 8 sequences of 32, batches of 4
    scheme = QuantScheme(4, 32)
    step = AWQ(scheme, n_grid=5, search_tokens=64)
    calls = [c for st in step._collect(make_ctx(model, ids, 1, scheme)) for c in st.calls]
    assert calls and all(_first_input(args, kw).shape[0] == 2 for args, kw in calls)
    rtn = layer_error(model, ids, 1, scheme, [RTN(scheme)])
    part = layer_error(model, ids, 1, scheme, [AWQ(scheme, n_grid=5, search_tokens=64), RTN(scheme)])
    assert part < 0.9 * rtn, (part, rtn)


def test_take_rows_cuts_batch_dimension_only():
    x, pos = torch.randn(4, 8, 16), torch.randn(1, 8, 16)
    args, kw = _take_rows((x,), {"position_embeddings": (pos, torch.randn(4, 8, 16)), "mask": None, "flag": True},
                          rows=2, batch=4)
    assert torch.equal(args[0], x[:2])
    assert kw["position_embeddings"][0] is pos and kw["position_embeddings"][1].shape[0] == 2
    assert kw["mask"] is None and kw["flag"] is True
    assert _take_rows((x,), {}, rows=4, batch=4)[0][0] is x


def test_alpha_zero_is_rtn_and_scales_normalised():
    x_mean = torch.tensor([0.1, 1.0, 10.0, 3.0])
    assert torch.equal(awq_scales(x_mean, None, 0.0), torch.ones(4))
    s = awq_scales(x_mean, torch.rand(4) + 0.1, 0.5)
    assert abs(float((s.max() * s.min()).sqrt()) - 1) < 1e-5


def test_gram_blocks_are_the_full_grams_diagonal_blocks():
    torch.manual_seed(0)
    x = torch.randn(2, 96, 128)
    full = gram(x, stride=3)
    ref = x.reshape(-1, 128)[::3].double()
    torch.testing.assert_close(full.double(), ref.T @ ref, rtol=1e-5, atol=1e-4)
    blocks = gram(x, stride=3, group_size=32)
    assert blocks.shape == (4, 32, 32)
    for i in range(4):
        torch.testing.assert_close(blocks[i], full[i * 32:(i + 1) * 32, i * 32:(i + 1) * 32], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gram(x, group_size=128)[0], gram(x))
    with pytest.raises(ValueError, match="diagonal blocks"):
        clip_search(torch.randn(8, 128), full, QuantScheme(4, 32))


def test_clip_search_never_worse_than_no_clip():
    torch.manual_seed(0)
    scheme = QuantScheme(3, 32)
    w = torch.randn(16, 64)
    w[:, 3] *= 6  # an outlier weight column makes clipping worthwhile
    x = torch.randn(256, 64)
    mv = clip_search(w, gram(x, group_size=32), scheme, n_grid=20)
    clipped = w.clone()
    apply_clip(clipped, mv, scheme)
    err_clip = float((x @ (fake_quantize(clipped, scheme) - w).T).pow(2).sum())
    err_none = float((x @ (fake_quantize(w, scheme) - w).T).pow(2).sum())
    assert err_clip < err_none
    assert (mv <= w.reshape(16, 2, 32).abs().amax(-1) + 1e-7).all()


def test_dump_then_load_reproduces_bit_for_bit(tmp_path):
    scheme = QuantScheme(4, 32)
    ids = calib_ids()
    f = tmp_path / "awq.safetensors"
    q1 = run_steps(outlier_llama(), [AWQ(scheme, n_grid=6, dump=str(f)), RTN(scheme)], ids)
    assert f.is_file() and (tmp_path / "awq.json").is_file()
    meta = json.loads((tmp_path / "awq.json").read_text())
    assert meta["format"] == "lowbit-awq" and meta["options"]["n_grid"] == 6
    assert set(meta["model"]["linears"]) == set(q1)
    tensors, _ = read_results(f)
    assert "model.layers.0.input_layernorm.awq_scales" in tensors
    assert "model.layers.1.mlp.down_proj.awq_clip" in tensors
    assert "model.layers.0.self_attn.q_proj.awq_clip" not in tensors  # q/k are never clipped
    q2 = run_steps(outlier_llama(), [AWQ(scheme, load=str(f)), RTN(scheme)], ids)
    assert set(q1) == set(q2)
    for k in q1:
        assert q1[k].equal(q2[k]), (k, q1[k].diff(q2[k]))


def test_deterministic():
    scheme = QuantScheme(3, 32, sym=True)
    ids = calib_ids()
    q1 = run_steps(outlier_llama(), [AWQ(scheme, n_grid=5, duo_scaling=True), RTN(scheme)], ids)
    q2 = run_steps(outlier_llama(), [AWQ(scheme, n_grid=5, duo_scaling=True), RTN(scheme)], ids)
    assert all(q1[k].equal(q2[k]) for k in q1)


def test_load_for_another_model_is_refused(tmp_path):
    scheme = QuantScheme(4, 32)
    ids = calib_ids(4, 16)
    f = tmp_path / "a.safetensors"
    run_steps(outlier_llama(), [AWQ(scheme, n_grid=3, dump=str(f)), RTN(scheme)], ids)
    other_shape = tiny_llama(0, **{**SMALL, "intermediate_size": 96})
    with pytest.raises(CheckpointError, match="made for another model"):
        AWQ(scheme, load=str(f)).prepare(other_shape, LLAMA_FAMILY)
    other_weights = outlier_llama(seed=7)
    with pytest.raises(CheckpointError, match="made for another model with the same shapes"):
        AWQ(scheme, load=str(f)).prepare(other_weights, LLAMA_FAMILY)
    with pytest.raises(UnsupportedSchemeError, match="searched for w4 g32 asym"):
        AWQ(QuantScheme(3, 32), load=str(f))
    AWQ(scheme, load=str(f)).prepare(outlier_llama(), LLAMA_FAMILY)  # the right model passes


def test_bad_files_and_options(tmp_path):
    scheme = QuantScheme(4, 32)
    with pytest.raises(CheckpointError, match="does not exist"):
        AWQ(scheme, load=str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        AWQ(scheme, load=str(junk))
    with pytest.raises(UnsupportedSchemeError, match="n_grid"):
        AWQ(scheme, n_grid=1)
    with pytest.raises(UnsupportedSchemeError, match="exclude each other"):
        AWQ(scheme, dump="a", load="b")
    with pytest.raises(UnsupportedSchemeError, match="no option"):
        AWQ(scheme, damp=0.1)
    with pytest.raises(UnsupportedSchemeError, match="bits=5"):
        QuantScheme(bits=5)


def test_no_calibration_batches_is_an_error():
    model = outlier_llama()
    layer = LLAMA_FAMILY.layers(model)[0]
    ctx = LayerContext(0, "model.layers.0.", layer, LLAMA_FAMILY.groups(layer), QuantScheme(4, 32), [], [])
    with pytest.raises(LowbitError, match="calibration"):
        AWQ(QuantScheme(4, 32)).apply(ctx)


class TestAWQConformance(QuantizerConformance):
    quantizer = AWQ
    options = {"n_grid": 5}


@pytest.mark.parametrize("scheme", [QuantScheme(4, 64), QuantScheme(3, 32, sym=True), QuantScheme(4, -1)],
                         ids=lambda s: s.describe())
def test_search_quantizes_as_the_final_rtn_step(scheme):
    """AWQ's searches score candidates with ``_fq``; it must give exactly the final RTN step's values, also
    on weights with many exact ties (a dequantized 4-bit grid, like the demo model's Q4_1 weights)."""
    from lowbit.algorithms.awq import _fq
    from lowbit.primitives import fake_quantize

    g = torch.Generator().manual_seed(7)
    blocks = torch.randint(0, 16, (64, 256), generator=g).float()
    d = torch.rand(64, 256 // 32, 1, generator=g).half().float() / 16  # per-32 step and minimum, fp16 as in Q4_1
    m = -torch.rand(64, 256 // 32, 1, generator=g).half().float() / 2
    w = (blocks.view(64, -1, 32) * d + m).view(64, 256)
    for x in (w, torch.randn(64, 256, generator=g)):
        assert torch.equal(_fq(x, scheme), fake_quantize(x, scheme))


@pytest.mark.parametrize("drop", ["layers", "scheme", "groups"])
def test_dump_with_malformed_metadata_is_one_error(tmp_path, drop):
    """A dump whose metadata lacks a field (hand-edited, or written by another tool) is a
    CheckpointError naming the file, not a KeyError from deep inside the reader."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    scheme = QuantScheme(4, 32)
    f = tmp_path / "a.safetensors"
    run_steps(outlier_llama(), [AWQ(scheme, n_grid=3, dump=str(f)), RTN(scheme)], calib_ids(4, 16))
    with safe_open(str(f), framework="pt") as h:
        meta = json.loads(h.metadata()["lowbit-awq"])
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    if drop == "groups":
        for rec in meta["layers"].values():
            del rec["groups"]
    else:
        del meta[drop]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"lowbit-awq": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="malformed metadata"):
        AWQ(scheme, load=str(bad))
