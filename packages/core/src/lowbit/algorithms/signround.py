"""SignRound: learn each weight's rounding and each group's range by signed gradient descent on the
decoder layer's output error (Cheng et al., 2023, "Optimize Weight Rounding via Signed Gradient
Descent for the Quantization of LLMs"; AutoRound is the authors' tool).

A quantizing step. For every linear of a decoder layer it learns

=================  ==========================================================================
rounding offsets   ``V`` ``[N, K]``, init 0: a weight's code is
                   ``clamp(round(w / s + V) + z, 0, maxq)``. ``V`` is not clamped (as in
                   AutoRound): the step sizes bound it, by ``lr · (iters + 1) / 2`` (0.525 at
                   the default ``lr``), so a weight moves at most to the other neighbouring
                   level
range factors      ``α`` (the group's max), ``β`` (its min), each ``[N, NG]`` in ``[0, 1]``,
                   init 1 (``minmax`` on; off: both stay 1): the group's range is
                   ``[β·min, α·max]``, turned into scale and zero point as RTN turns its
                   ``[min, max]`` (:func:`lowbit.primitives.exact_qparams`: asymmetric ranges
                   take in 0, symmetric ones use ``2·max(|lo|, |hi|) / maxq``)
=================  ==========================================================================

The loss is the mean squared error between the output of the layer with every linear
quantized-dequantized that way, run on the calibration inputs the pass hands this layer (they come
through the already quantized earlier layers), and the float model's own output of this layer (the
untouched float layer on the float model's activations, which the pass carries beside the quantized
ones: ``needs_float_outputs``). So each layer also learns to cancel the error the layers before it
left, as AutoRound does; and with ``awq+signround``, whose weights start from AWQ's scaled (and,
unless ``--no-awq-clip``, clipped) layer, the target stays the original function. ``round`` passes gradients straight through (``x + (round(x) - x).detach()``), the zero
point's rounding too; the clamp to ``[0, maxq]`` passes none outside the range.

Each of ``iters`` steps takes the next ``batch_size`` calibration samples of a shuffled order of all of them
(reshuffled when fewer than a batch are left, so every sample serves once before any serves twice, as
AutoRound's sampler does; a seeded generator per layer: the same seed gives the same codes, also for a
resumed run), computes the loss and its
gradient, and moves every parameter by ``-lr_t · sign(grad)``, then clamps it back into its
interval; ``lr_t`` falls linearly from ``lr`` to 0. ``lr``'s default is AutoRound's: ``1 / iters``, and
``2 / iters`` for schemes of 3 bits or fewer run for 1000 steps or more. The parameters
of the step with the lowest loss are kept (the loss of step ``t`` is the one of the parameters
before its update; step 0 is RTN's). Which loss (``select``): ``fixed`` (the default) scores every step on
the same ``batch_size`` samples, spread evenly over the set, at the cost of one more forward per step;
``batch`` takes each step's loss on its own training batch, as AutoRound does, which rewards a step whose batch
happened to be easy (the minimum of 20 such losses can sit well below the kept parameters' loss on the whole
set). The matmuls run in the recipe's ``compute_dtype`` (bf16:
autocast, AMX on Xeon), the quantize-dequantize in fp32.

The result is the canonical :class:`~lowbit.qweight.QuantizedWeight` for the scheme: codes,
fp16 scales and zero points chosen exactly as RTN chooses them for the learnt range (the exact
scale's codes, the scale stored in fp16), plus the learnt offset before rounding. With
``iters = 0`` (``V = 0``, ``α = β = 1``) that is RTN with the min/max range, bit for bit.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..argtypes import nonnegative_int, positive_float, positive_int
from ..argtypes import seed as seed_arg
from ..errors import LowbitError, UnsupportedSchemeError
from ..primitives import exact_qparams
from ..qweight import QuantizedWeight
from ..scheme import QuantScheme
from .base import LayerContext, Option, Quantizer

#: the interval of the range factors (AutoRound's; the paper's is [0.5, 1])
RANGE_FACTORS = (0.0, 1.0)
#: how the best step is chosen (see the module docstring)
SELECT = ("fixed", "batch")
_MIN_SCALE = 1e-5  # as primitives' floor: a group of zeros keeps a representable scale


class SignRound(Quantizer):
    """SignRound (a quantizing step). Options: ``iters``, ``lr``, ``batch_size``, ``minmax``, ``seed``."""

    name = "signround"
    quantizes = True
    needs_calibration = True
    needs_float_outputs = True
    description = ("rounding offsets and group ranges learnt by signed gradient descent on the layer's output "
                   "error (Cheng et al. 2023, AutoRound's algorithm)")
    options = (
        Option("iters", 200, type=nonnegative_int, metavar="N",
               help="optimization steps per decoder layer (0: RTN)"),
        Option("lr", None, type=positive_float, metavar="LR",
               help="initial step size of the signed updates, decayed linearly to 0 "
                    "(none: 1 / iters; 2 / iters at 3 bits or fewer and 1000 steps or more)"),
        Option("batch_size", 8, type=positive_int, metavar="N", help="calibration samples per step"),
        Option("minmax", True, help="learn each group's range factors as well as the rounding"),
        Option("seed", 0, type=seed_arg, metavar="N", help="seed of the samples' draw"),
        Option("select", "fixed", choices=SELECT,
               help="how the best step is chosen: its loss on the same evenly spread samples every step (fixed, "
                    "one more forward per step), or on its own training batch (batch, AutoRound's)"),
    )

    def check(self, scheme: QuantScheme) -> None:
        super().check(scheme)
        o = self.opts
        for name, low in (("iters", 0), ("batch_size", 1)):
            v = o[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UnsupportedSchemeError(f"signround {name} must be a whole number of at least {low}, got {v!r}; "
                                             f"pass --signround-{name.replace('_', '-')} "
                                             f"{200 if name == 'iters' else 8}.")
        lr = o["lr"]
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf")):
            raise UnsupportedSchemeError(f"signround lr must be a finite number above 0, got {lr!r}; "
                                         "leave it out for 1 / iters.")
        if not isinstance(o["minmax"], bool):
            raise UnsupportedSchemeError(f"signround minmax must be true or false, got {o['minmax']!r}.")
        if o["select"] not in SELECT:
            raise UnsupportedSchemeError(f"signround select must be one of {', '.join(SELECT)}, got {o['select']!r}.")
        s = o["seed"]
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**64:
            raise UnsupportedSchemeError(f"signround seed must be a whole number from 0 to 2**64-1, got {s!r}.")

    def apply(self, ctx: LayerContext) -> None:
        t0 = time.perf_counter()
        paths = ctx.unquantized()
        for p in paths:
            self.scheme.check_shape(ctx.module(p).in_features, ctx.prefix + p)
        iters = self.opts["iters"]
        params = {p: _Rounding(ctx.module(p).weight.detach(), self.scheme) for p in paths}
        if iters:
            if not ctx.inputs:
                raise LowbitError("signround needs calibration data; got no calibration batches (pass --nsamples 128).")
            first, best = self._optimize(ctx, params, iters)
            ctx.report["signround_loss"] = {"first": float(f"{first:.4g}"), "best": float(f"{best:.4g}")}
        for p in paths:
            lin = ctx.module(p)
            bias = None if lin.bias is None else lin.bias.detach().clone()
            ctx.set_quantized(p, params[p].emit(bias))
        ctx.report["signround_seconds"] = round(time.perf_counter() - t0, 2)

    def _optimize(self, ctx: LayerContext, params: dict[str, _Rounding], iters: int) -> tuple[float, float]:
        """Signed gradient descent on every linear's offsets (and range factors); keeps the best step's
        values in ``params``. Returns (the first step's loss, the best loss)."""
        # the float layer's outputs, from before any step when the pass took them (after AWQ the layer
        # computes another function when AWQ clipped); the steps change only the copies below
        targets = ctx.float_outputs if ctx.float_outputs is not None else ctx.forward()
        batches = _Samples(ctx.inputs, ctx.kwargs, targets)
        gen = torch.Generator().manual_seed((self.opts["seed"] + ctx.index) % 2**64)
        lr = float(self.opts["lr"] or (2.0 if self.scheme.bits <= 3 and iters >= 1000 else 1.0) / iters)
        minmax = self.opts["minmax"]
        learnt = [t for r in params.values() for t in ((r.v, r.alpha, r.beta) if minmax else (r.v,))]
        for t in learnt:
            t.requires_grad_(True)
        frozen = [q for q in ctx.layer.parameters() if q.requires_grad]
        for q in frozen:
            q.requires_grad_(False)
        best = float("inf")
        first = None
        kept = [t.detach().clone() for t in learnt]
        n = min(self.opts["batch_size"], batches.count)
        bar = tqdm(range(iters), desc=f"layer {ctx.index} signround", unit="step", leave=False, disable=None)
        order = torch.empty(0, dtype=torch.long)
        scored = torch.linspace(0, batches.count - 1, n).round().long() if self.opts["select"] == "fixed" else None
        try:
            for step in bar:
                if order.numel() < n:
                    order = torch.randperm(batches.count, generator=gen)
                chosen, order = order[:n].sort().values, order[n:]
                loss = 0.0
                for x, kw, y, rows in batches.take(chosen):
                    with torch.enable_grad():  # the pass (and callers) may run under no_grad
                        weights = {f"{p}.weight": r.fake_quant() for p, r in params.items()}
                        with ctx.autocast():
                            out = torch.func.functional_call(ctx.layer, weights, (x,), kw)
                        out = out[0] if isinstance(out, tuple) else out
                        part = (out.float() - y.float()).pow(2).mean() * (rows / n)
                        part.backward()
                    loss += float(part.detach())
                if scored is not None:  # the step's parameters scored on the fixed samples
                    loss = self._loss(ctx, params, batches, scored)
                if first is None:
                    first = loss
                if loss < best:
                    best = loss
                    for k, t in zip(kept, learnt):
                        k.copy_(t.detach())
                bar.set_postfix_str(f"loss {loss:.3g} best {best:.3g}")
                step_size = lr * (1 - step / iters)
                with torch.no_grad():
                    for t in learnt:
                        if t.grad is not None:
                            t.sub_(step_size * torch.sign(t.grad))
                            t.grad = None
                    for r in params.values():
                        r.clamp_()
        finally:
            bar.close()
            for q in frozen:
                q.requires_grad_(True)
            for t in learnt:
                t.requires_grad_(False)
                t.grad = None
        with torch.no_grad():
            for k, t in zip(kept, learnt):
                t.copy_(k)
        return first, best

    @torch.no_grad()
    def _loss(self, ctx: LayerContext, params: dict[str, _Rounding], batches: _Samples, chosen: torch.Tensor) -> float:
        """The layer's output error with the current parameters on the samples ``chosen``."""
        weights = {f"{p}.weight": r.fake_quant() for p, r in params.items()}
        loss = 0.0
        for x, kw, y, rows in batches.take(chosen):
            with ctx.autocast():
                out = torch.func.functional_call(ctx.layer, weights, (x,), kw)
            out = out[0] if isinstance(out, tuple) else out
            loss += float((out.float() - y.float()).pow(2).mean()) * rows / len(chosen)
        return loss


class _Rounding:
    """One linear's learnable rounding: offsets ``v`` and range factors ``alpha`` (max), ``beta`` (min)."""

    def __init__(self, w: torch.Tensor, scheme: QuantScheme):
        self.scheme = scheme
        self.w = w.float()
        n, k = self.w.shape
        self.gs = scheme.group_width(k)
        wg = self.w.reshape(n, k // self.gs, self.gs)
        self.wmin, self.wmax = wg.amin(dim=-1), wg.amax(dim=-1)
        self.v = torch.zeros_like(self.w)
        self.alpha = torch.ones_like(self.wmax)
        self.beta = torch.ones_like(self.wmin)

    def clamp_(self) -> None:
        self.alpha.clamp_(*RANGE_FACTORS)
        self.beta.clamp_(*RANGE_FACTORS)

    def fake_quant(self) -> torch.Tensor:
        """The quantized-dequantized weight, differentiable in ``v``, ``alpha`` and ``beta``."""
        scheme = self.scheme
        n, k = self.w.shape
        wg = self.w.reshape(n, -1, self.gs)
        lo, hi = self.wmin * self.beta, self.wmax * self.alpha
        if scheme.sym:
            s = (2 * torch.maximum(lo.abs(), hi.abs()) / scheme.maxq).clamp(min=_MIN_SCALE)
            z = torch.full_like(s, float(1 << (scheme.bits - 1)))
        else:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            s = ((hi - lo) / scheme.maxq).clamp(min=_MIN_SCALE)
            z = _round_ste(-lo / s).clamp(0, scheme.maxq)
        s, z = s[..., None], z[..., None]
        q = (_round_ste(wg / s + self.v.reshape(n, -1, self.gs)) + z).clamp(0, scheme.maxq)
        return ((q - z) * s).reshape(n, k)

    @torch.no_grad()
    def emit(self, bias: torch.Tensor | None) -> QuantizedWeight:
        """Codes, fp16 scales and zeros for the learnt values, chosen as RTN chooses them for a range."""
        scheme = self.scheme
        n, k = self.w.shape
        exact, zeros = exact_qparams(self.w, scheme, xmin=self.wmin * self.beta, xmax=self.wmax * self.alpha)
        wg = self.w.reshape(n, -1, self.gs)
        q = (wg / exact[..., None] + self.v.reshape(n, -1, self.gs)).round_()
        codes = q.add_(zeros.float()[..., None]).clamp_(0, scheme.maxq).to(torch.uint8).reshape(n, k)
        return QuantizedWeight(codes=codes, scales=exact.half(), zeros=zeros, scheme=scheme, bias=bias)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class _Samples:
    """The layer's calibration samples (rows of the pass's batches), taken a few at a time.

    When every batch's keyword arguments are the same and broadcast over the batch (a llama's
    position embeddings ``[1, seq, d]``, no mask), the chosen rows from any batches form one batch;
    otherwise the rows are taken batch by batch, with the keyword tensors whose first dimension is
    the batch cut to those rows."""

    def __init__(self, inputs: list[torch.Tensor], kwargs: list[dict[str, Any]], targets: list[torch.Tensor]):
        self.inputs, self.kwargs, self.targets = inputs, kwargs, targets
        self.where = [(b, r) for b, x in enumerate(inputs) for r in range(x.shape[0])]
        self.count = len(self.where)
        self.shared = all(_broadcast(kw) for kw in kwargs) and all(_same(kwargs[0], kw) for kw in kwargs[1:])
        if self.shared:
            self.x = torch.cat(inputs)
            self.y = torch.cat(targets)

    def take(self, chosen: torch.Tensor):
        """(inputs, kwargs, targets, number of rows) per forward for the samples ``chosen``."""
        if self.shared:
            yield self.x[chosen], self.kwargs[0], self.y[chosen], len(chosen)
            return
        by_batch: dict[int, list[int]] = {}
        for i in chosen.tolist():
            b, r = self.where[i]
            by_batch.setdefault(b, []).append(r)
        for b, rows in by_batch.items():
            idx = torch.tensor(rows)
            size = self.inputs[b].shape[0]
            yield self.inputs[b][idx], _cut(self.kwargs[b], idx, size), self.targets[b][idx], len(rows)


def _broadcast(v: Any) -> bool:
    """True when no tensor in ``v`` has a batch dimension above 1 (tensors of 2 or more dimensions)."""
    if isinstance(v, torch.Tensor):  # 1-D tensors are per position (cache_position), not per sample
        return v.dim() < 2 or v.shape[0] == 1
    if isinstance(v, (tuple, list)):
        return all(_broadcast(x) for x in v)
    if isinstance(v, dict):
        return all(_broadcast(x) for x in v.values())
    return True


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def _cut(v: Any, idx: torch.Tensor, size: int) -> Any:
    """``v`` with every tensor (of 2 or more dimensions) whose first dimension is the batch ``size`` cut to rows ``idx``."""
    if isinstance(v, torch.Tensor):
        return v[idx] if v.dim() > 1 and v.shape[0] == size and size > 1 else v
    if isinstance(v, tuple):
        return tuple(_cut(x, idx, size) for x in v)
    if isinstance(v, list):
        return [_cut(x, idx, size) for x in v]
    if isinstance(v, dict):
        return {k: _cut(x, idx, size) for k, x in v.items()}
    return v
