"""GPTQ: quantize one column at a time, pushing each column's error onto the columns not yet
quantized through the inverse Hessian (Frantar et al., 2022).

=================  ==========================================================================
Hessian            ``H = 2 XᵀX / n`` over every calibration token reaching the linear
dead columns       ``H[k, k] == 0`` → ``H[k, k] = 1`` and ``W[:, k] = 0``
dampening          ``H += damp · mean(diag H) · I`` (retried ×10 when Cholesky still fails)
inverse            ``U = chol(H⁻¹)ᵀ`` (upper); column ``j``'s error ``(w - q) / U[j, j]``
                   updates ``W[:, j:] -= err ⊗ U[j, j:]``, lazily per ``block_size`` columns
column order       ``hessian`` (default): columns in order of decreasing ``diag H``, each
                   group's scales/zeros fixed up front from the original weight, so the
                   checkpoint keeps plain group order and every format holds it
                   (llm-compressor's ``actorder=static``); ``columns``: the weight's own order,
                   scales/zeros found when a group's first column comes up, from the current
                   (already error-compensated) columns (AutoGPTQ's ``desc_act=False``)
act-order          (``scheme.act_order``, desc_act) ``diag H`` order with dynamic groups: a
                   column's group is its rank // group_size, stored as ``g_idx``;
                   ``static_groups`` fixes the groups up front instead (trivial ``g_idx``)
per channel        (group size ``-1``) scales/zeros always found up front
true-sequential    inside a layer, groups are quantized in order (q/k/v, o, gate/up, down),
                   each Hessian taken from the layer with the earlier groups already quantized;
                   once o (down) is quantized the attention (MLP) block is replayed from
                   o's (down's) captured inputs instead of being recomputed by later stages
                   and by the pass's forward to the next layer, and the norm feeding it is
                   skipped: each linear runs once per calibration batch (plus the first
                   batch's check of each replay and the error report's float reference)
shared Hessian     linears reading one input (q/k/v, gate/up) are quantized in one sweep of
                   the columns (:func:`gptq_quantize_many`)
=================  ==========================================================================

Scales and zeros come from :func:`lowbit.primitives.choose_qparams` (fp16 scales) and codes are
computed against exactly those stored scales, so ``QuantizedWeight.dequantize()`` reproduces the
values GPTQ compensated for.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..argtypes import nonnegative_float, positive_int
from ..errors import LowbitError, UnsupportedSchemeError
from ..heap import return_freed_memory
from ..primitives import choose_qparams
from ..qweight import QuantizedWeight
from ..scheme import QuantScheme
from .awq import _first_input
from .base import OBSERVER, LayerContext, Option, Quantizer, check_observer


class GPTQ(Quantizer):
    """GPTQ (a quantizing step). Options: ``damp`` (relative dampening, 0 < damp < 1),
    ``block_size`` (lazy-update block), ``column_order`` (``hessian`` or ``columns``),
    ``static_groups`` (with act-order), ``true_sequential``, ``hessian_memory``."""

    name = "gptq"
    quantizes = True
    supports_act_order = True
    needs_calibration = True
    description = "second-order error compensation (Hessian from calibration inputs)"
    column_orders = ("hessian", "columns")
    options = (
        Option("damp", 0.01, type=nonnegative_float, flag="--damp",
               help="dampening added to the Hessian diagonal, as a fraction of its mean"),
        Option("block_size", 128, type=positive_int, flag="--block-size", help="columns per error-compensation block"),
        Option("column_order", "hessian", choices=column_orders, flag="--column-order",
               help="hessian: quantize columns by decreasing Hessian diagonal with each group's scales fixed up "
               "front, so the checkpoint keeps plain group order (llm-compressor's actorder=static); columns: the "
               "weight's own order (AutoGPTQ's desc_act=False)"),
        Option("static_groups", False, flag="--static-groups",
               help="with --act-order, fix each group's qparams before reordering"),
        Option("true_sequential", True, help="quantize a layer's linears in execution order, each on inputs through "
               "the already quantized ones (off: each on the float layer's inputs)"),
        Option("hessian_memory", 512.0, type=nonnegative_float,
               help="MiB of Hessians one calibration pass accumulates: a stage of linears with inputs of their own "
               "(a MoE layer's experts) that needs more runs one pass per part, with the same results (0: one "
               "input per pass; with true_sequential only)"),
        OBSERVER,
    )

    def check(self, scheme: QuantScheme) -> None:
        super().check(scheme)
        damp = self.opts["damp"]
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise UnsupportedSchemeError(f"gptq damp must be a number with 0 < damp < 1, got {damp!r}; "
                                         "pass --damp 0.01 (the usual value).")
        bs = self.opts["block_size"]
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise UnsupportedSchemeError(f"gptq block_size must be a positive integer, got {bs!r}; "
                                         "pass --block-size 128.")
        if self.opts["column_order"] not in self.column_orders:
            raise UnsupportedSchemeError(f"gptq column_order must be one of {', '.join(self.column_orders)}, "
                                         f"got {self.opts['column_order']!r}.")
        mem = self.opts["hessian_memory"]
        if isinstance(mem, bool) or not isinstance(mem, (int, float)) or not mem >= 0:
            raise UnsupportedSchemeError(f"gptq hessian_memory must be a number of MiB >= 0, got {mem!r}; "
                                         "pass --gptq-hessian-memory 512.")
        check_observer(self)

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        t0 = time.perf_counter()
        if not ctx.inputs:
            raise LowbitError("gptq needs calibration data; got no calibration batches (pass --nsamples 128).")
        todo = set(ctx.unquantized())
        # stages of sets of linears that read one input (and share a Hessian)
        stages: list[list[list[str]]] = []
        label = None
        for g in ctx.groups:
            sets = [[p for p in linears if p in todo] for linears in g.input_sets()]
            sets = [s for s in sets if s]
            if not sets:
                continue
            if stages and g.stage is not None and g.stage == label:
                stages[-1].extend(sets)
            else:
                stages.append(sets)
            label = g.stage
        for stage in stages:
            for g in stage:
                for p in g:
                    self.scheme.check_shape(ctx.module(p).in_features, ctx.prefix + p)
        if not self.opts["true_sequential"]:
            stages = [[g for stage in stages for g in stage]]
        else:  # a stage's inputs do not depend on its own linears: parts of it see what the whole would
            budget = float(self.opts["hessian_memory"]) * 2**20
            stages = [part for readers in stages for part in
                      hessian_parts(readers, [ctx.module(g[0]).in_features for g in readers], budget)]
        errs = {}
        for readers in stages:
            hess, kept, checked = self._hessians(ctx, [g[0] for g in readers])
            for g in readers:  # linears reading one input share a Hessian: one sweep of the columns
                lins = [ctx.module(p) for p in g]
                qws, losses = gptq_quantize_many(
                    [lin.weight.detach() for lin in lins], hess.pop(g[0]), self.scheme,
                    damp=float(self.opts["damp"]), block_size=self.opts["block_size"],
                    column_order=self.opts["column_order"], static_groups=bool(self.opts["static_groups"]),
                    observer=self.opts["observer"],
                    biases=[None if lin.bias is None else lin.bias.detach().clone() for lin in lins])
                for p, qw, loss in zip(g, qws, losses):
                    errs[p] = loss
                    ctx.set_quantized(p, qw)
                    if p in kept:  # its block's output is now final: later stages skip the block
                        ctx.replay(p, kept[p], checked.get(p))
                if len(readers) > 1:  # many inputs (experts): give each one's temporaries back before the next
                    return_freed_memory()
        leaves = [p.rsplit(".", 1)[-1] for p in errs]  # MoE experts repeat leaf names: keep their paths
        ctx.report["gptq_loss"] = {(p.rsplit(".", 1)[-1] if leaves.count(p.rsplit(".", 1)[-1]) == 1 else p):
                                   float(f"{v:.4g}") for p, v in errs.items()}
        ctx.report["gptq_seconds"] = round(time.perf_counter() - t0, 2)

    def _hessians(self, ctx: LayerContext, paths: list[str]) -> tuple[dict, dict, dict]:
        """``2 XᵀX / n`` for the input of each module in ``paths``, in one (early-stopped) pass; the
        inputs themselves of those that close a block (``ctx.replayable``), to replay it; and for
        those, whether the block's output is the linear's (``ctx.check_block``), from the first
        batch, which runs on to the block's end (one more GEMM, not a forward of the block later)."""
        acc: dict[str, torch.Tensor] = {}
        count: dict[str, int] = {}
        kept: dict[str, list[torch.Tensor]] = {p: [] for p in paths if ctx.replayable(p)}
        outputs: dict[str, Any] = {}

        def make(p):
            def fn(_b, args, kwargs):
                x = _first_input(args, kwargs)
                if p in kept:
                    kept[p].append(x)
                with torch.autocast(x.device.type, enabled=False):
                    x2 = x.reshape(-1, x.shape[-1]).float()
                    if p not in acc:
                        acc[p] = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
                    add_gram_upper(acc[p], x2)
                count[p] = count.get(p, 0) + x2.shape[0]
            return fn

        blocks = {ctx.block_of(p): p for p in kept}
        ctx.stream({p: make(p) for p in paths},
                   first_outputs={b: (lambda out, p=p: outputs.__setitem__(p, out)) for b, p in blocks.items()})
        checked = {p: ctx.check_block(p, out, kept[p][0]) for p, out in outputs.items() if kept[p]}
        hess = {}
        for p in paths:
            if p in acc:  # in place: a Hessian of a wide input (11008 columns: 485 MB) is held once
                hess[p] = symmetric_from_upper(acc.pop(p), inplace=True).mul_(2.0 / count[p])
            else:  # no calibration token reached it (a MoE expert nobody routed to): H = I, i.e. RTN
                hess[p] = torch.eye(ctx.module(p).in_features)
                ctx.report.setdefault("gptq_unrouted", []).append(p)
        return hess, kept, checked


def hessian_parts(readers: list, widths: list[int], budget: float) -> list[list]:
    """``readers`` cut into consecutive parts whose Hessians (``width²`` float32 each) total at most ``budget``
    bytes; a reader whose Hessian alone exceeds it is a part by itself."""
    parts: list[list] = []
    size = 0
    for reader, k in zip(readers, widths, strict=True):
        b = 4 * k * k
        if parts and size + b <= budget:
            parts[-1].append(reader)
            size += b
        else:
            parts.append([reader])
            size = b
    return parts


def add_gram_upper(acc: torch.Tensor, x: torch.Tensor, block: int = 128) -> None:
    """``acc += xᵀx`` on the upper block triangle only (column blocks of ``block``); :func:`symmetric_from_upper`
    mirrors it (about two thirds of the full product's time; benchmarks/NOTES.md)."""
    k = x.shape[1]
    for i in range(0, k, block):
        acc[i:i + block, i:].addmm_(x[:, i:i + block].T, x[:, i:])


def symmetric_from_upper(acc: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``acc``'s (``inplace``: written into ``acc``,
    with one strict triangle's copy as the only temporary; the same values either way)."""
    if not inplace:
        return torch.triu(acc) + torch.triu(acc, 1).T
    lower = torch.triu(acc, 1).T
    return acc.triu_().add_(lower)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, *, damp: float = 0.01,
                  block_size: int = 128, column_order: str = "hessian", static_groups: bool = False,
                  observer: str = "minmax", bias: torch.Tensor | None = None) -> tuple[QuantizedWeight, float]:
    """GPTQ one ``[N, K]`` weight against ``hessian`` ``[K, K]``; returns the QuantizedWeight and the
    summed proxy loss ``Σ (w - q)² / U[j, j]²`` (GPTQ's own error measure)."""
    qws, losses = gptq_quantize_many([w], hessian, scheme, damp=damp, block_size=block_size,
                                     column_order=column_order, static_groups=static_groups, observer=observer,
                                     biases=[bias])
    return qws[0], losses[0]


def gptq_quantize_many(weights: list[torch.Tensor], hessian: torch.Tensor, scheme: QuantScheme, *,
                       damp: float = 0.01, block_size: int = 128, column_order: str = "hessian",
                       static_groups: bool = False, observer: str = "minmax",
                       biases: list[torch.Tensor | None] | None = None) -> tuple[list[QuantizedWeight], list[float]]:
    """GPTQ several weights that read the same input (q/k/v, gate/up) against their shared Hessian in
    one sweep of the columns. Every step of GPTQ is row by row (a row's error moves only that row's
    later columns, scales are per row), so each weight gets what its own run gives, for the Python
    and BLAS-call overhead of one (q/k/v together: 65 ms against 143 ms one by one, 2 cores)."""
    rows = [w.shape[0] for w in weights]
    if len({w.shape[1] for w in weights}) != 1:
        raise ValueError(f"gptq_quantize_many needs weights of one input width, got {[list(w.shape) for w in weights]}.")
    W = torch.cat([w.detach().float() for w in weights])  # a new tensor: the weights stay untouched
    n, k = W.shape
    scheme.check_shape(k)
    H = hessian.detach().float().clone()
    del hessian  # a caller that handed its Hessian over (the pass) no longer holds two
    gs = scheme.group_width(k)
    ng = k // gs
    maxq = scheme.maxq

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    hessian_order = scheme.act_order or column_order == "hessian"
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if hessian_order else None
    # act-order keeps dynamic groups (g_idx) unless asked; the hessian column order alone fixes them
    static = static_groups or scheme.per_channel or not scheme.act_order and hessian_order
    scales = torch.zeros(n, ng, dtype=torch.float16, device=W.device)
    zeros = torch.zeros(n, ng, dtype=torch.uint8, device=W.device)
    if static:
        scales, zeros = choose_qparams(W, scheme, observer=observer)
    if perm is not None:
        W = W[:, perm]
        H = H[perm]  # two steps: the unpermuted matrix is freed before the second copy is made
        H = H[:, perm]
    # group of the column at each (possibly permuted) position
    orig_col = perm if perm is not None else torch.arange(k, device=W.device)
    pos_group = (orig_col // gs if static else torch.arange(k) // gs).tolist()

    Hinv = _inverse_cholesky(H, damp)
    del H
    # work on Wᵀ so that a column of W is a contiguous row (rank-1 updates are GEMMs)
    Wt = W.T.contiguous()
    codes_t = torch.zeros(k, n, dtype=torch.uint8, device=W.device)
    s_t = scales.float().T.contiguous()  # [NG, N]
    z_t = zeros.float().T.contiguous()
    row_loss = torch.zeros(n, dtype=torch.float64, device=W.device)
    s_rows, z_rows = s_t.unbind(0), z_t.unbind(0)  # views: one dispatch each, not one per column
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        cnt = i2 - i1
        W1 = Wt[i1:i2].clone()
        Q1 = torch.empty(cnt, n, device=W.device)  # the block's codes, as floats
        Err1 = torch.empty(cnt, n, device=W.device)
        Hinv1 = Hinv[i1:i2, i1:i2]
        neg_inv_diag = (-1 / torch.diag(Hinv1)).tolist()
        cols, qs, errs = W1.unbind(0), Q1.unbind(0), Err1.unbind(0)
        for i in range(cnt):
            j = i1 + i
            if not static and j % gs == 0:
                cur = torch.cat([W1[i:], Wt[i2:j + gs]], dim=0)[:gs].T
                gsc, gz = choose_qparams(cur, QuantScheme(scheme.bits, -1, scheme.sym), observer=observer)
                g = j // gs
                scales[:, g], zeros[:, g] = gsc[:, 0], gz[:, 0]
                s_t[g], z_t[g] = gsc[:, 0].float(), gz[:, 0].float()
            g = pos_group[j]
            col, q, err, s, z = cols[i], qs[i], errs[i], s_rows[g], z_rows[g]
            torch.div(col, s, out=q).round_().add_(z).clamp_(0, maxq)
            # err = (col - (q - z) s) / d, the error GPTQ moves onto the later columns
            torch.sub(q, z, out=err).mul_(s).sub_(col).mul_(neg_inv_diag[i])
            if i + 1 < cnt:
                # a rank-1 GEMM: BLAS-threaded (torch's elementwise addr_ is much slower on a busy CPU)
                W1[i + 1:].addmm_(Hinv1[i, i + 1:, None], err[None], alpha=-1)
        codes_t[i1:i2] = Q1.to(torch.uint8)
        row_loss += Err1.double().pow(2).sum(0)
        if i2 < k:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)
    codes = codes_t.T

    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if not static:
            g_idx = (invperm // gs).to(torch.int32)
    biases = biases or [None] * len(weights)
    qws, losses, r0 = [], [], 0
    for r, bias in zip(rows, biases, strict=True):
        qws.append(QuantizedWeight(codes=codes[r0:r0 + r].contiguous(), scales=scales[r0:r0 + r].contiguous(),
                                   zeros=zeros[r0:r0 + r].contiguous(), scheme=scheme, g_idx=g_idx, bias=bias))
        losses.append(float(row_loss[r0:r0 + r].sum()) / 2)
        r0 += r
    return qws, losses


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, λ = damp · mean(diag H), raising λ ×10 up to 3
    times when the factorisation fails. ``H``'s diagonal is damped in place (restored before a
    retry), so at most three matrices of its size are held at once."""
    diag = torch.diag(H).clone()
    mean_diag = float(diag.mean())
    for attempt in range(4):
        lam = damp * (10 ** attempt) * mean_diag
        H.diagonal().copy_(diag + lam)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            eye = torch.eye(H.shape[0], device=H.device)
            Hinv = torch.cholesky_solve(eye, L)  # = cholesky_inverse(L), much slower on CPU
            del eye, L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise LowbitError(f"gptq: the Hessian is not positive definite even with damp={damp * 1000:g}; "
                      "the calibration inputs are degenerate: use more or other calibration text, or --method rtn.")
