"""SignRound on tiny seeded llamas: lower layer error than RTN, iters=0 is RTN bit for bit, the codes
and the checkpoint, determinism, AWQ first, the straight-through quantizer against RTN's grid, options
through the CLI and bad values refused with one line."""

from __future__ import annotations

import copy

import pytest
import torch
from test_awq import calib_ids, layer_error, make_ctx, outlier_llama, rel_error, run_steps

from lowbit import pipeline
from lowbit.algorithms.awq import AWQ
from lowbit.algorithms.rtn import RTN
from lowbit.algorithms.signround import SignRound, _Rounding
from lowbit.errors import UnsupportedSchemeError
from lowbit.models import LLAMA_FAMILY
from lowbit.plugins import registry
from lowbit.primitives import quantize
from lowbit.recipe import METHODS
from lowbit.scheme import QuantScheme
from lowbit.testing import QuantizerConformance

SCHEMES = [QuantScheme(4, 32), QuantScheme(3, 32, sym=True), QuantScheme(2, 64), QuantScheme(4, -1),
           QuantScheme(8, 32)]


def test_registered_with_its_methods():
    assert registry("quantizers").get("signround") is SignRound
    assert SignRound.quantizes and SignRound.needs_calibration
    assert METHODS["signround"] == ["signround"] and METHODS["awq+signround"] == ["awq", "signround"]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_fake_quant_at_the_start_is_rtn(scheme):
    """``V = 0``, ``α = β = 1``: the differentiable quantize-dequantize gives RTN's values (to fp16 scale
    rounding, which RTN applies on storage), and the emitted weight is RTN's bit for bit."""
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3)) ** 3
    r = _Rounding(w, scheme)
    rtn = quantize(w, scheme)
    assert r.emit(None).equal(rtn)
    step = rtn.scales.float().max()
    torch.testing.assert_close(r.fake_quant(), rtn.dequantize(), rtol=0, atol=float(step) * 2**-10 * scheme.maxq)


def test_offsets_move_codes_and_factors_stay_in_range():
    scheme = QuantScheme(3, 32)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    r = _Rounding(w, scheme)
    r.v.fill_(0.5)
    r.alpha.fill_(0.5)
    r.beta.fill_(0.7)
    qw = r.emit(None)
    assert int(qw.codes.max()) <= scheme.maxq
    torch.testing.assert_close(r.fake_quant(), qw.dequantize(), rtol=0, atol=float(qw.scales.float().max()) * 2e-3)
    r.v.fill_(1.25)  # past the next level: AutoRound bounds V only by its step sizes, and so does lowbit
    r.alpha.fill_(-0.3)
    r.beta.fill_(1.4)
    r.clamp_()
    assert float(r.v.max()) == 1.25 and float(r.alpha.min()) == 0.0 and float(r.beta.max()) == 1.0
    qw = r.emit(None)
    assert int(qw.codes.max()) <= scheme.maxq
    torch.testing.assert_close(r.fake_quant(), qw.dequantize(), rtol=0, atol=float(qw.scales.float().max()) * 2e-3)


def test_straight_through_gradients():
    """round passes the gradient through: d(fake_quant)/dV is the scale for weights inside the range."""
    scheme = QuantScheme(4, 32)
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(5)) * 0.1
    r = _Rounding(w, scheme)
    r.v.fill_(0.1)
    r.v.requires_grad_(True)
    r.fake_quant().sum().backward()
    s = quantize(w, scheme).scales.float()
    inside = r.v.grad != 0
    assert inside.float().mean() > 0.8  # only the range's ends clamp
    torch.testing.assert_close(r.v.grad[inside], s.expand(4, 32)[inside], rtol=1e-3, atol=0)


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32), QuantScheme(3, 32, sym=True), QuantScheme(2, 32)],
                         ids=lambda s: s.describe())
def test_lowers_layer_error_below_rtn(scheme):
    model, ids = outlier_llama(), calib_ids()
    rtn = layer_error(model, ids, 1, scheme, [RTN(scheme)])
    sr = layer_error(model, ids, 1, scheme, [SignRound(scheme, iters=40)])
    assert sr < 0.9 * rtn, (sr, rtn)
    frozen = layer_error(model, ids, 1, scheme, [SignRound(scheme, iters=40, minmax=False)])
    assert frozen < 0.95 * rtn, (frozen, rtn)


def test_awq_then_signround_beats_rtn():
    scheme = QuantScheme(3, 32)
    model, ids = outlier_llama(), calib_ids()
    rtn = layer_error(model, ids, 1, scheme, [RTN(scheme)])
    both = layer_error(model, ids, 1, scheme, [AWQ(scheme, n_grid=6), SignRound(scheme, iters=30)])
    assert both < 0.9 * rtn, (both, rtn)


def test_bf16_matmuls_also_beat_rtn():
    scheme = QuantScheme(3, 32)
    model, ids = outlier_llama(), calib_ids()
    rtn = layer_error(model, ids, 1, scheme, [RTN(scheme)])
    layer = copy.deepcopy(LLAMA_FAMILY.layers(model)[1])
    ctx = make_ctx(model, ids, 1, scheme, layer)
    ref = ctx.forward()
    ctx.compute_dtype = torch.bfloat16
    SignRound(scheme, iters=30).apply(ctx)
    ctx.compute_dtype = torch.float32
    assert rel_error(ref, ctx.forward()) < 0.9 * rtn
    assert ctx.report["signround_loss"]["best"] <= ctx.report["signround_loss"]["first"]


@pytest.mark.parametrize("scheme", SCHEMES[:3], ids=lambda s: s.describe())
def test_zero_iters_is_rtn_bit_for_bit(scheme):
    ids = calib_ids()
    q_rtn = run_steps(outlier_llama(), [RTN(scheme)], ids)
    q_sr = run_steps(outlier_llama(), [SignRound(scheme, iters=0)], ids)
    assert set(q_rtn) == set(q_sr) and len(q_rtn) == 14
    assert all(q_rtn[k].equal(q_sr[k]) for k in q_rtn)


def test_fixed_selection_keeps_the_step_best_on_the_scored_samples():
    """select=fixed: the kept parameters' loss on the evenly spread samples is the reported best, and no step's
    parameters scored lower there (each step is recorded by a spy on the scoring)."""
    scheme = QuantScheme(3, 32)
    model, ids = outlier_llama(), calib_ids()
    layer = copy.deepcopy(LLAMA_FAMILY.layers(model)[1])
    ctx = make_ctx(model, ids, 1, scheme, layer)
    scores = []

    class Spy(SignRound):
        def _loss(self, ctx, params, batches, chosen):
            scores.append((chosen.tolist(), super()._loss(ctx, params, batches, chosen)))
            return scores[-1][1]

    spy = Spy(scheme, iters=12, batch_size=3)
    spy.apply(ctx)
    assert len(scores) == 12 and len({tuple(c) for c, _ in scores}) == 1  # the same samples every step
    best = ctx.report["signround_loss"]["best"]
    assert best == pytest.approx(min(v for _, v in scores), rel=1e-3)
    assert best <= ctx.report["signround_loss"]["first"]


def test_batch_selection_scores_no_extra_forward():
    scheme = QuantScheme(3, 32)
    model, ids = outlier_llama(), calib_ids()
    ctx = make_ctx(model, ids, 1, scheme, copy.deepcopy(LLAMA_FAMILY.layers(model)[1]))

    class Spy(SignRound):
        def _loss(self, *a):
            raise AssertionError("select=batch scored a step on extra samples")

    Spy(scheme, iters=5, select="batch").apply(ctx)
    assert ctx.report["signround_loss"]["best"] <= ctx.report["signround_loss"]["first"]


def test_deterministic_given_the_seed():
    scheme = QuantScheme(4, 32)
    ids = calib_ids()
    runs = [run_steps(outlier_llama(), [SignRound(scheme, iters=20, batch_size=3, seed=s)], ids) for s in (7, 7, 8)]
    assert all(runs[0][k].equal(runs[1][k]) for k in runs[0])
    assert not all(runs[0][k].equal(runs[2][k]) for k in runs[0])


def test_samples_across_batches_with_per_sample_kwargs():
    """Batches whose keyword tensors are per sample (an explicit mask) are cut row by row: same result
    as when they broadcast."""
    from lowbit.algorithms.signround import _Samples

    xs = [torch.randn(4, 5, 3), torch.randn(2, 5, 3)]
    ys = [x * 2 for x in xs]
    kws = [{"mask": torch.arange(4)[:, None].expand(4, 5), "flag": True}, {"mask": torch.arange(2)[:, None].expand(2, 5) + 4,
                                                                          "flag": True}]
    s = _Samples(xs, kws, ys)
    assert not s.shared and s.count == 6
    parts = list(s.take(torch.tensor([1, 3, 5])))
    assert [p[3] for p in parts] == [2, 1]
    assert torch.equal(parts[0][0], xs[0][[1, 3]]) and torch.equal(parts[0][1]["mask"][:, 0], torch.tensor([1, 3]))
    assert torch.equal(parts[1][1]["mask"][:, 0], torch.tensor([5])) and torch.equal(parts[1][2], ys[1][[1]])
    shared = _Samples(xs, [{"pos": torch.ones(1, 5)}] * 2, ys)
    assert shared.shared
    (x, _, y, n), = shared.take(torch.tensor([0, 5]))
    assert n == 2 and torch.equal(x[1], xs[1][1]) and torch.equal(y[0], ys[0][0])


def test_checkpoint_reads_back(tmp_path, tiny_dir):
    from lowbit import read_checkpoint

    out = tmp_path / "q"
    qm = pipeline.quantize(str(tiny_dir), method="awq+signround", scheme=QuantScheme(3, 32), out=out,
                           step_options={"signround": {"iters": 3}, "awq": {"n_grid": 3}}, nsamples=8, seqlen=32,
                           progress=False)
    back = read_checkpoint(out / "lowbit")
    assert set(back.qweights) == set(qm.qweights) and qm.qweights
    for k, qw in qm.qweights.items():
        assert int(qw.codes.max()) <= 7 and back.qweights[k].equal(qw)
    rows = qm.manifest["report"]["layers"]
    assert all(r["signround_loss"]["best"] <= r["signround_loss"]["first"] for r in rows)
    recipe = back.manifest["recipe"]
    assert recipe["method"] == "awq+signround" and recipe["step_options"]["signround"]["iters"] == 3


def test_options_reach_the_cli(tmp_path, tiny_dir):
    from lowbit import read_checkpoint
    from lowbit.cli import main

    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_dir), "--method", "signround", "--bits", "4", "--group-size", "32", "--out",
               str(out), "--nsamples", "4", "--seqlen", "32", "--signround-iters", "2", "--signround-lr", "0.01",
               "--signround-batch-size", "2", "--no-signround-minmax", "--signround-seed", "5", "--signround-select",
               "batch", "--no-progress"])
    assert rc == 0
    recipe = read_checkpoint(out / "lowbit").manifest["recipe"]
    assert recipe["step_options"]["signround"] == {"iters": 2, "lr": 0.01, "batch_size": 2, "minmax": False, "seed": 5,
                                                   "select": "batch"}


@pytest.mark.parametrize("flag,value", [("--signround-iters", "-1"), ("--signround-lr", "0"),
                                        ("--signround-lr", "nan"), ("--signround-batch-size", "0"),
                                        ("--signround-seed", "-3"), ("--signround-select", "best")])
def test_bad_flags_refused_with_one_line(tmp_path, tiny_dir, flag, value, capsys):
    from lowbit.cli import main

    rc = main(["quantize", str(tiny_dir), "--method", "signround", "--out", str(tmp_path / "q"), flag, value])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "q").exists()


def test_flag_for_a_method_without_signround_is_refused(tmp_path, tiny_dir, capsys):
    from lowbit.cli import main

    rc = main(["quantize", str(tiny_dir), "--method", "gptq", "--out", str(tmp_path / "q"), "--signround-iters", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--signround-iters" in err[0]


@pytest.mark.parametrize("opts,match", [({"iters": -1}, "iters"), ({"iters": 2.5}, "iters"), ({"iters": True}, "iters"),
                                        ({"lr": 0}, "lr"), ({"lr": float("inf")}, "lr"), ({"batch_size": 0}, "batch_size"),
                                        ({"minmax": "yes"}, "minmax"), ({"seed": -1}, "seed"), ({"damp": 0.1}, "no option"),
                                        ({"select": "best"}, "select")])
def test_bad_option_values(opts, match):
    with pytest.raises(UnsupportedSchemeError, match=match):
        SignRound(QuantScheme(4, 32), **opts)


def test_act_order_refused():
    with pytest.raises(UnsupportedSchemeError, match="act-order"):
        SignRound(QuantScheme(4, 32, act_order=True))


class TestSignRoundConformance(QuantizerConformance):
    quantizer = SignRound
    options = {"iters": 20}
    schemes = (QuantScheme(4, 64), QuantScheme(3, 32), QuantScheme(4, -1, sym=True))


def test_the_target_is_the_untouched_float_layer_after_a_transform():
    """The pass takes the float outputs before any step: after a transform that changes the function (as
    AWQ's clipping does) signround's target is still the original layer's."""
    from lowbit.algorithms.base import Quantizer
    from lowbit.pipeline import capture_layer_inputs, run_pass
    from lowbit.recipe import Recipe

    seen = []

    class Shrink(Quantizer):  # a transform that changes the function: halves every linear's weight
        name, quantizes = "shrink", False

        def apply(self, ctx):
            with torch.no_grad():
                for p in ctx.linear_paths():
                    ctx.module(p).weight.mul_(0.5)

    class Spy(SignRound):
        def apply(self, ctx):
            seen.append((ctx.float_outputs, ctx.forward()))
            super().apply(ctx)

    scheme = QuantScheme(4, 32)
    model, ids = outlier_llama(), calib_ids()
    xs, kws = capture_layer_inputs(copy.deepcopy(model), LLAMA_FAMILY, ids, 4, 0)
    layer0 = copy.deepcopy(LLAMA_FAMILY.layers(model)[0])
    with torch.no_grad():
        want = [layer0(x, **kw) for x, kw in zip(xs, kws)]
    want = [w[0] if isinstance(w, tuple) else w for w in want]
    run_pass(model, LLAMA_FAMILY, [Shrink(scheme), Spy(scheme, iters=3)], Recipe("shrink+signround", scheme, batch_size=4),
             ids, progress=False)
    targets, shrunk = seen[0]
    assert len(targets) == len(want) == 2
    for t, w in zip(targets, want):
        torch.testing.assert_close(t, w, rtol=1e-5, atol=1e-5)
    assert max(float((c - w).abs().max()) for c, w in zip(shrunk, want)) > 1e-2


def _float_model_outputs(model, ids, batch_size):
    """Every layer's output in the float model itself (its own activations through every float layer)."""
    from lowbit.pipeline import capture_layer_inputs

    model = copy.deepcopy(model)
    xs, kws = capture_layer_inputs(model, LLAMA_FAMILY, ids, batch_size, 0)
    outs = []
    with torch.no_grad():
        for layer in LLAMA_FAMILY.layers(model):
            xs = [layer(x, **kw) for x, kw in zip(xs, kws)]
            xs = [x[0] if isinstance(x, tuple) else x for x in xs]
            outs.append(xs)
    return outs


def test_target_is_the_float_models_own_output_at_every_layer():
    """From layer 1 on, the target is the float model's output of the layer (the float stream), not the
    float layer run on the inputs that the quantized layer 0 changed."""
    from lowbit.pipeline import run_pass
    from lowbit.recipe import Recipe

    seen = []

    class Spy(SignRound):
        def apply(self, ctx):
            seen.append((ctx.float_outputs, ctx.forward()))
            super().apply(ctx)

    scheme = QuantScheme(3, 32)
    model, ids = outlier_llama(), calib_ids()
    want = _float_model_outputs(model, ids, 4)
    run_pass(model, LLAMA_FAMILY, [Spy(scheme, iters=2)], Recipe("signround", scheme, batch_size=4), ids, progress=False)
    assert len(seen) == len(want) >= 2
    for (targets, _), w in zip(seen, want):
        for t, x in zip(targets, w):
            torch.testing.assert_close(t, x, rtol=1e-5, atol=1e-5)
    # layer 1's float layer on the quantized stream differs from the float model's output
    assert max(float((a - b).abs().max()) for a, b in zip(seen[1][1], want[1])) > 1e-4


def test_float_stream_at_a_resumed_layer_equals_the_straight_run():
    from lowbit.pipeline import _float_stream_at, capture_layer_inputs

    model, ids = outlier_llama(), calib_ids()
    want = _float_model_outputs(model, ids, 4)
    xs, kws = capture_layer_inputs(copy.deepcopy(model), LLAMA_FAMILY, ids, 4, 0)
    got = _float_stream_at(LLAMA_FAMILY.layers(model), LLAMA_FAMILY, 1, xs, kws, None)
    for g, w in zip(got, want[0]):
        assert torch.equal(g, w)
    assert _float_stream_at(LLAMA_FAMILY.layers(model), LLAMA_FAMILY, 0, xs, kws, None) == xs
