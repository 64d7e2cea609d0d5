"""GPTQ on tiny seeded llamas and random linears: quality against RTN, act-order/g_idx, static groups,
dead columns, codes consistent with the stored scales, the AWQ→GPTQ recipe, determinism, bad input."""

from __future__ import annotations

import pytest
import torch
from test_awq import calib_ids, layer_error, layer_inputs, outlier_llama, run_steps

from lowbit.algorithms.awq import AWQ
from lowbit.algorithms.base import LayerContext
from lowbit.algorithms.gptq import GPTQ, add_gram_upper, gptq_quantize, gptq_quantize_many, symmetric_from_upper
from lowbit.algorithms.rtn import RTN
from lowbit.errors import UnsupportedSchemeError
from lowbit.models import LLAMA_FAMILY
from lowbit.plugins import registry
from lowbit.primitives import choose_qparams, quantize, quantize_codes
from lowbit.scheme import QuantScheme
from lowbit.testing import QuantizerConformance


def correlated_inputs(n=512, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(n, k, generator=g) @ mix
    x[:, :4] *= 5  # a few strong channels, as in LLM activations
    return x


def proxy_error(x, w, qw) -> float:
    return float((x @ (qw.dequantize() - w).T).pow(2).sum())


@pytest.mark.parametrize("k", [64, 100, 384, 1000])
def test_gram_from_the_upper_block_triangle(k):
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(k))
    acc = torch.zeros(k, k)
    add_gram_upper(acc, x[:200], block=48)
    add_gram_upper(acc, x[200:], block=48)
    h = symmetric_from_upper(acc)
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h, x.T @ x, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32), QuantScheme(3, 32, act_order=True), QuantScheme(4, -1, sym=True)],
                         ids=lambda s: s.describe())
def test_one_sweep_for_weights_sharing_a_hessian_equals_separate_runs(scheme):
    """q/k/v (gate/up) are quantized in one sweep of the columns: GPTQ is row by row, so each weight
    gets its own run's codes, scales, zeros and g_idx, and its own loss (BLAS may order a block
    update's sums differently for another width: at most a code in 10⁴ may flip at a tie)."""
    g = torch.Generator().manual_seed(1)
    x = correlated_inputs(k=96)
    h = 2 * x.T @ x / x.shape[0]
    ws = [torch.randn(n, 96, generator=g) for n in (40, 16, 24)]
    bias = torch.randn(16, generator=g)
    qws, losses = gptq_quantize_many(ws, h, scheme, block_size=32, biases=[None, bias, None])
    for w, qw, loss, b in zip(ws, qws, losses, [None, bias, None], strict=True):
        one, one_loss = gptq_quantize(w, h, scheme, block_size=32, bias=b)
        assert qw.codes.shape == one.codes.shape and (qw.codes != one.codes).float().mean() <= 1e-4
        assert torch.equal(qw.scales, one.scales) and torch.equal(qw.zeros, one.zeros)
        assert (qw.g_idx is None) == (one.g_idx is None) and (qw.g_idx is None or torch.equal(qw.g_idx, one.g_idx))
        assert qw.bias is b
        assert loss == pytest.approx(one_loss, rel=1e-4)
    with pytest.raises(ValueError, match="one input width"):
        gptq_quantize_many([torch.randn(4, 96), torch.randn(4, 64)], h, scheme)


def test_registered():
    assert registry("quantizers").get("gptq") is GPTQ
    assert GPTQ.supports_act_order and GPTQ.quantizes


SCHEMES = [QuantScheme(b, g, sym=s, act_order=a) for b, g, s, a in [
    (4, 32, False, False), (4, 64, True, False), (3, 32, False, True), (2, 32, False, False),
    (8, -1, True, False), (4, -1, False, True), (3, 64, True, True)]]


@pytest.mark.parametrize("order", ["hessian", "columns"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_gptq_beats_rtn_on_a_linear(scheme, order):
    torch.manual_seed(0)
    x, w = correlated_inputs(), torch.randn(48, 64)
    h = 2 * x.T @ x / x.shape[0]
    qw, _ = gptq_quantize(w, h, scheme, column_order=order)
    rtn = quantize(w, QuantScheme(scheme.bits, scheme.group_size, scheme.sym))
    assert proxy_error(x, w, qw) < 0.9 * proxy_error(x, w, rtn)
    # the codes are exactly what the stored (fp16) scales and zeros give for the dequantized weight
    assert torch.equal(quantize_codes(qw.dequantize(), qw.scales, qw.zeros, scheme, qw.g_idx), qw.codes)
    assert qw.scales.dtype == torch.float16
    if scheme.sym:
        assert (qw.zeros == 2 ** (scheme.bits - 1)).all()
    if scheme.act_order and scheme.group_size != -1:
        assert qw.g_idx is not None and qw.g_idx.dtype == torch.int32
        assert qw.num_groups == 1 or not qw.has_trivial_g_idx()
        assert torch.equal(torch.bincount(qw.g_idx.long()), torch.full((qw.num_groups,), scheme.group_size))
    else:
        assert qw.g_idx is None


def test_hessian_column_order_keeps_plain_groups():
    """The default order quantizes strong columns first but fixes each group's scales up front
    from the original weight: no g_idx, the min/max scales and zeros, and the codes differ from
    the natural order's."""
    x, w = correlated_inputs(), torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    h = 2 * x.T @ x / 512
    scheme = QuantScheme(4, 32)
    qh, _ = gptq_quantize(w, h, scheme)
    qc, _ = gptq_quantize(w, h, scheme, column_order="columns")
    assert qh.g_idx is None and qh.has_trivial_g_idx()
    scales, zeros = choose_qparams(w, scheme)  # the stored grid of the original weight
    assert torch.equal(qh.scales, scales) and torch.equal(qh.zeros, zeros)
    assert not torch.equal(qh.codes, qc.codes)


def test_static_groups_keep_trivial_g_idx():
    x, w = correlated_inputs(), torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    scheme = QuantScheme(4, 32, act_order=True)
    qw, _ = gptq_quantize(w, 2 * x.T @ x / 512, scheme, static_groups=True)
    assert qw.has_trivial_g_idx()
    assert proxy_error(x, w, qw) < proxy_error(x, w, quantize(w, QuantScheme(4, 32)))


def test_block_size_does_not_change_the_result():
    """Lazy batch updates are an exact reordering of the same arithmetic."""
    x, w = correlated_inputs(), torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    h = 2 * x.T @ x / 512
    a, _ = gptq_quantize(w, h, QuantScheme(4, 32), block_size=128)
    b, _ = gptq_quantize(w, h, QuantScheme(4, 32), block_size=8)
    assert (a.codes == b.codes).float().mean() > 0.995


def test_dead_columns_quantize_to_zero():
    x, w = correlated_inputs(), torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    x[:, 10] = 0
    qw, _ = gptq_quantize(w, 2 * x.T @ x / 512, QuantScheme(4, 32))
    assert torch.equal(qw.dequantize()[:, 10], torch.zeros(16))


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32), QuantScheme(3, 32, sym=True, act_order=True),
                                    QuantScheme(4, -1)], ids=lambda s: s.describe())
def test_gptq_lowers_layer_error_below_rtn(scheme):
    model, ids = outlier_llama(), calib_ids()
    rtn = layer_error(model, ids, 1, scheme, [RTN(QuantScheme(scheme.bits, scheme.group_size, scheme.sym))])
    gptq = layer_error(model, ids, 1, scheme, [GPTQ(scheme)])
    assert gptq < 0.9 * rtn, (gptq, rtn)
    seq = layer_error(model, ids, 1, scheme, [GPTQ(scheme, true_sequential=False)])
    assert seq < 0.9 * rtn
    natural = layer_error(model, ids, 1, scheme, [GPTQ(scheme, column_order="columns")])
    assert natural < 0.9 * rtn


def test_awq_then_gptq_recipe_beats_rtn():
    scheme = QuantScheme(3, 32)
    model, ids = outlier_llama(), calib_ids()
    rtn = layer_error(model, ids, 1, scheme, [RTN(scheme)])
    both = layer_error(model, ids, 1, scheme, [AWQ(scheme, n_grid=6), GPTQ(scheme)])
    assert both < 0.9 * rtn, (both, rtn)


def test_deterministic():
    scheme = QuantScheme(4, 32, act_order=True)
    ids = calib_ids()
    q1 = run_steps(outlier_llama(), [GPTQ(scheme)], ids)
    q2 = run_steps(outlier_llama(), [GPTQ(scheme)], ids)
    assert set(q1) == set(q2) and len(q1) == 14
    assert all(q1[k].equal(q2[k]) for k in q1)


def _count_calls(model, path: str) -> list[int]:
    """How often the module at ``path`` computes (an instance-level forward, as accelerate's hooks set:
    the pass's replay patches must leave it in place and count through it)."""
    calls = [0]
    for layer in model.model.layers:
        mod = layer.get_submodule(path)

        def counted(*args, _forward=type(mod).forward.__get__(mod), **kwargs):
            calls[0] += 1
            return _forward(*args, **kwargs)

        mod.forward = counted
    return calls


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32), QuantScheme(3, 32, act_order=True)], ids=lambda s: s.describe())
def test_replaying_finished_blocks_changes_nothing(scheme):
    """Once o (down) is quantized, later stages and the forward to the next layer compute the
    attention (MLP) block as o(captured input), and skip the norm feeding it. Bit-identical codes
    and outputs, fewer forwards."""
    ids = calib_ids()
    runs = {}
    paths = ("self_attn.q_proj", "mlp.gate_proj", "input_layernorm", "post_attention_layernorm")
    for blocks in (False, True):
        model = outlier_llama()
        calls = [_count_calls(model, p) for p in paths]
        outs: list = []
        runs[blocks] = (run_steps(model, [GPTQ(scheme)], ids, blocks=blocks, outputs=outs), outs, [c[0] for c in calls])
    (q0, out0, (qc0, gc0, n1c0, n2c0)), (q1, out1, (qc1, gc1, n1c1, n2c1)) = runs[False], runs[True]
    assert set(q0) == set(q1) and all(q0[k].equal(q1[k]) for k in q0)
    assert all(torch.equal(a, b) for a, b in zip(out0, out1, strict=True))
    n, n_layers = 2, 2  # 8 samples in batches of 4
    # q_proj computes, per layer, without replay: in the o, gate/up and down stages and the forward
    # (the q/k/v stage stops at its input); with: in the o stage only (whose first batch runs on to
    # the end of the attention block to check it). gate_proj: down stage and forward → down stage
    assert qc0 == 4 * n * n_layers and qc1 == n * n_layers
    assert gc0 == 2 * n * n_layers and gc1 == n * n_layers
    # the input norm: every stage and the forward → the q/k/v and o stages; the post-attention
    # norm: gate/up, down stages and the forward → the two stages
    assert n1c0 == 5 * n * n_layers and n1c1 == 2 * n * n_layers
    assert n2c0 == 3 * n * n_layers and n2c1 == 2 * n * n_layers


def test_a_replay_stops_when_its_linear_changes():
    """A replayed block's cached outputs hold for the weight they came from: once the linear changes
    (a later step writes it), the block, and the norm feeding it, run for real again."""
    model, ids = outlier_llama(), calib_ids()
    xs, kws = layer_inputs(model, ids, 0)
    layer = LLAMA_FAMILY.layers(model)[0]
    ctx = LayerContext(0, LLAMA_FAMILY.layer_prefix(0), layer, LLAMA_FAMILY.groups(layer), QuantScheme(4, 32),
                       xs, kws, blocks=LLAMA_FAMILY.blocks(layer))
    GPTQ(QuantScheme(4, 32)).apply(ctx)
    assert {b: rp.state for b, rp in ctx.replays.items()} == {"self_attn": "on", "mlp": "on"}
    replayed = ctx.forward()
    with torch.no_grad():
        layer.mlp.down_proj.weight.mul_(0.5)
    changed = ctx.forward()
    assert ctx.replays["mlp"].state == "off" and ctx.replays["self_attn"].state == "on"
    ctx.replays.clear()
    assert all(torch.equal(a, b) for a, b in zip(changed, ctx.forward(), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(changed, replayed, strict=True))


class _ScaledMLP(torch.nn.Module):
    """An MLP whose output is not down_proj's output (x1.5 after it), under the llama names."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def forward(self, x):
        return 1.5 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_a_wrongly_declared_block_is_not_replayed():
    ids = calib_ids()
    outs = {}
    for blocks in (False, True):
        model = outlier_llama()
        for layer in model.model.layers:
            layer.mlp = _ScaledMLP(layer.mlp)
        o: list = []
        run_steps(model, [GPTQ(QuantScheme(4, 32))], ids, blocks=blocks, outputs=o)
        outs[blocks] = o
    assert all(torch.equal(a, b) for a, b in zip(outs[False], outs[True], strict=True))


@pytest.mark.parametrize("damp", [0, 1, -0.1, 1.5, "x", True])
def test_damp_out_of_range(damp):
    with pytest.raises(UnsupportedSchemeError, match="0 < damp < 1"):
        GPTQ(QuantScheme(4, 32), damp=damp)


def test_bad_options():
    with pytest.raises(UnsupportedSchemeError, match="block_size"):
        GPTQ(QuantScheme(4, 32), block_size=0)
    with pytest.raises(UnsupportedSchemeError, match="column_order must be one of hessian, columns"):
        GPTQ(QuantScheme(4, 32), column_order="random")
    with pytest.raises(UnsupportedSchemeError, match="no option"):
        GPTQ(QuantScheme(4, 32), n_grid=3)
    with pytest.raises(UnsupportedSchemeError, match="act-order"):
        RTN(QuantScheme(4, 32, act_order=True))
    with pytest.raises(UnsupportedSchemeError, match="does not divide"):
        gptq_quantize(torch.randn(4, 48), torch.eye(48), QuantScheme(4, 32))


class TestGPTQConformance(QuantizerConformance):
    quantizer = GPTQ
    schemes = (QuantScheme(4, 64), QuantScheme(3, 32), QuantScheme(4, -1, sym=True))  # act-order: tests above


class TestAWQThenGPTQConformance(QuantizerConformance):
    quantizer = AWQ
    options = {"n_grid": 4}
    follow_with = "gptq"
    schemes = (QuantScheme(3, 32),)


def test_observer_option_reaches_gptqs_scales():
    """GPTQ's hessian order fixes each group's qparams up front: with observer mse they are the mse
    observer's (not min/max's), and GPTQ still beats RTN with the same observer."""
    x, w = correlated_inputs(), torch.randn(48, 64, generator=torch.Generator().manual_seed(5)) ** 3
    h = 2 * x.T @ x / 512
    scheme = QuantScheme(4, 32)
    qw, _ = gptq_quantize(w, h, scheme, observer="mse")
    scales, zeros = choose_qparams(w, scheme, observer="mse")
    assert torch.equal(qw.scales, scales) and torch.equal(qw.zeros, zeros)
    assert not torch.equal(qw.scales, choose_qparams(w, scheme)[0])
    rtn = quantize(w, scheme, observer="mse")
    assert proxy_error(x, w, qw) < proxy_error(x, w, rtn)
    qc, _ = gptq_quantize(w, h, QuantScheme(4, 32, act_order=True), observer="mse")  # groups chosen as they come
    assert torch.equal(quantize_codes(qc.dequantize(), qc.scales, qc.zeros, qc.scheme, qc.g_idx), qc.codes)


@pytest.mark.parametrize("step", [GPTQ, RTN])
def test_bad_observer(step):
    with pytest.raises(UnsupportedSchemeError, match="observer must be one of minmax, mse"):
        step(QuantScheme(4, 32), observer="absmax")


def test_hessian_parts_cut_by_bytes():
    from lowbit.algorithms.gptq import hessian_parts

    widths = [64, 64, 64, 128, 32]  # 16, 16, 16, 64 and 4 KiB of fp32 Hessian
    assert hessian_parts(list("abcde"), widths, 0) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert hessian_parts(list("abcde"), widths, 48 * 1024) == [["a", "b", "c"], ["d"], ["e"]]
    assert hessian_parts(list("abcde"), widths, 1e12) == [list("abcde")]


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])
def test_a_moe_stage_in_parts_gives_the_same_codes(model_type, monkeypatch):
    """``hessian_memory`` 0: one calibration pass per expert input instead of one per stage, so at most one
    expert's Hessian is held; the inputs of a stage do not depend on its own linears, so every code, scale
    and loss is the same."""
    from lowbit import pipeline
    from lowbit.models import adapter_for
    from lowbit.recipe import Recipe
    from lowbit.testing.models import tiny_model

    passes = []
    original = GPTQ._hessians
    monkeypatch.setattr(GPTQ, "_hessians", lambda self, ctx, paths: passes.append(len(paths)) or
                        original(self, ctx, paths))
    ids = calib_ids()
    results = {}
    for mem in (512.0, 0.0):
        model = tiny_model(model_type, seed=4)
        adapter = adapter_for(model.config, registry("architectures"))
        recipe = Recipe("gptq", QuantScheme(4, 32), {"gptq": {"hessian_memory": mem}}, batch_size=4)
        passes.clear()
        q, report = pipeline.run_pass(model, adapter, pipeline.make_steps(recipe), recipe, ids, progress=False)
        results[mem] = (q, [r["gptq_loss"] for r in report.layers], list(passes))
    (q0, loss0, passes0), (q1, loss1, passes1) = results[512.0], results[0.0]
    assert set(q0) == set(q1) and all(q0[k].equal(q1[k]) for k in q0), [k for k in q0 if not q0[k].equal(q1[k])]
    assert loss0 == loss1
    assert max(passes0) > 1 and max(passes1) == 1 and len(passes1) > len(passes0)
