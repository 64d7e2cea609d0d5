"""AWQ: activation-aware weight scaling and clipping (Lin et al., 2023), as AutoAWQ / llm-awq do it.

A transform step: it changes the float layer and leaves quantizing to the next step (RTN or GPTQ).
For every :class:`~lowbit.algorithms.base.LinearGroup` of a decoder layer:

=================  =========================================================================
statistics         ``x_mean[k] = mean |x[:, k]|`` over every calibration token of the group's
                   input; the Gram matrix ``G = XᵀX`` over a strided token subsample
scale search       ``s = x_mean**α`` (duo scaling: ``x_mean**α / w_mean**(1-α)``), normalised so
                   ``sqrt(max(s)·min(s)) = 1``, for ``α = i / n_grid``, ``i < n_grid``; the loss is
                   the inspect module's output error with the linears replaced by ``Q(W·s) / s``.
                   A linear inspect module (``up → down``, ``v → o``) is scored exactly from the
                   Gram matrix, ``Σ (ΔW G) ∘ ΔW``; a norm-fed group (attention, MLP) by
                   running the module on ``search_tokens`` tokens.  ``α = 0`` is plain RTN, so the
                   chosen scales never score worse than RTN.
fold               the previous op's output is divided by ``s`` (norm weight, or the previous
                   linear's output rows and bias), the linears' input columns multiplied by ``s``:
                   the float layer computes the same function.
clip search        (not q/k: attention scores are too sensitive) per output row and input group,
                   ``max |w|`` shrunk by ``(1 - i / n_grid)`` for ``i < n_grid / 2``; the loss is
                   the group's partial output error ``δ G_gg δᵀ``, exact from the Gram block
                   (groups whose scales are not scored by a Gram keep only its diagonal blocks);
                   weights are clamped to ``[-max, max]``.
=================  =========================================================================

``dump`` writes the searched scales and clip values (awq_results.py: which model, scheme and options
they were made for); ``load`` applies such a file instead of searching, after checking it was made
for this model and scheme.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..argtypes import int_range, positive_int, probability
from ..argtypes import path as path_arg
from ..errors import CheckpointError, LowbitError, UnsupportedSchemeError
from ..primitives import exact_qparams
from ..scheme import QuantScheme
from .awq_results import (
    FORMAT,
    FORMAT_VERSION,
    check_identity,
    check_scheme,
    model_identity,
    read_results,
    write_results,
)
from .base import Option, Quantizer
from .context import LayerContext, LinearGroup

#: the roles (:meth:`lowbit.models.Adapter.layer_roles`) whose linears AWQ never clips, as AutoAWQ:
#: the query and key projections, whose errors the attention scores multiply
NO_CLIP_ROLES = ("q", "k")


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def gram(x: torch.Tensor, stride: int = 1, group_size: int | None = None) -> torch.Tensor:
    """``XᵀX`` in float32 over every ``stride``-th token of ``x`` (``[..., K]``), autocast off.

    With ``group_size`` only the diagonal blocks, ``[K / gs, gs, gs]``: all the clip search reads,
    at ``gs / K`` of the cost."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)[::stride].float().contiguous()  # a strided operand runs ~2x slower
    with torch.autocast(x.device.type, enabled=False):
        if group_size is None or group_size == k:
            return x2.T @ x2 if group_size is None else (x2.T @ x2)[None]
        xb = x2.view(-1, k // group_size, group_size).transpose(0, 1)  # [NG, T, gs]
        return torch.bmm(xb.transpose(1, 2), xb)


def _fq(w: torch.Tensor, scheme: QuantScheme, xmin: torch.Tensor | None = None,
        xmax: torch.Tensor | None = None) -> torch.Tensor:
    """``fake_quantize(w)`` (same qparams, same fp32 arithmetic, same values) without building a
    QuantizedWeight or gathering per-column scales, in place on one fresh buffer: the search calls
    it hundreds of times. ``xmin``/``xmax`` ([N, NG]) give the group ranges when they are known."""
    n, k = w.shape
    gs = scheme.group_width(k)
    exact, zeros = exact_qparams(w, scheme, xmin=xmin, xmax=xmax)
    z = zeros.float()[..., None]
    q = w.float().reshape(n, k // gs, gs).div(exact[..., None]).round_().add_(z).clamp_(0, scheme.maxq)
    return q.sub_(z).mul_(exact.half().float()[..., None]).reshape(n, k)


class _GroupStats:
    """What one group's input tells AWQ: mean |x|, Gram on a subsample, inspect calls to replay."""

    def __init__(self, k: int, block: int | None):
        self.abs_sum = torch.zeros(k, dtype=torch.float64)
        self.tokens = 0
        self.block = block  # None: the full Gram (a linear inspect scores scales with it); else diagonal blocks
        self.gram = torch.zeros(k, k) if block is None else torch.zeros(k // block, block, block)
        self.gram_tokens = 0
        self.calls: list[tuple[tuple, dict]] = []

    def add(self, xf: torch.Tensor, stride: int) -> None:
        # per batch in float32 (a few thousand tokens), accumulated in float64: an fp64 reduction
        # over the batch costs ~8x the fp32 one
        if self.abs_sum.device != xf.device:  # calibration on a GPU (--device)
            self.abs_sum, self.gram = self.abs_sum.to(xf.device), self.gram.to(xf.device)
        self.abs_sum += xf.abs().sum(0)
        self.tokens += xf.shape[0]
        self.gram += gram(xf, stride, self.block)
        self.gram_tokens += xf[::stride].shape[0]

    def unscale(self, s: torch.Tensor) -> None:
        """The Gram of ``x / s`` (after the scales are folded)."""
        if self.block is None:
            self.gram /= s[:, None] * s[None, :]
        else:
            sb = s.view(-1, self.block)
            self.gram /= sb[:, :, None] * sb[:, None, :]

    def diagonal_blocks(self, group_size: int) -> torch.Tensor:
        """``[K / gs, gs, gs]``, the Gram's diagonal blocks (what the clip search needs)."""
        if self.block is not None:
            return self.gram
        gs = group_size
        return torch.stack([self.gram[i * gs:(i + 1) * gs, i * gs:(i + 1) * gs] for i in range(self.gram.shape[0] // gs)])


class AWQ(Quantizer):
    """Activation-aware scaling + clipping search (a transform step; follow it with rtn, gptq or signround).

    Options: ``n_grid`` points of the α grid (and of the clip grid), ``duo_scaling``, ``clip``,
    ``dump`` (path to write the search results), ``load`` (path of results to apply instead of
    searching), ``search_tokens`` (tokens the norm-fed groups' inspect module is run on per grid
    point: whole samples, from evenly spaced batches or the first rows of one; benchmarks/NOTES.md),
    ``gram_tokens`` (tokens of the Gram matrices), ``max_shrink`` (largest clip shrink).
    """

    name = "awq"
    quantizes = False
    needs_calibration = True
    description = "activation-aware scale search + clipping (transform; then rtn, gptq or signround)"
    options = (
        Option("n_grid", 20, flag="--awq-grid", help="scale search grid points",
               type=int_range(2, 1000, "each point is a search over every group; finer grids change nothing")),
        Option("duo_scaling", False, help="use both activation and weight statistics"),
        Option("clip", True, help="search each linear's clipping range (off: keep the full range)"),
        Option("search_tokens", 2048, type=positive_int, metavar="N",
               help="calibration tokens (whole samples) each scale-search grid point is scored on; the statistics "
               "always use every token"),
        Option("gram_tokens", 16384, type=positive_int, metavar="N", help="tokens of the Gram matrices"),
        Option("max_shrink", 0.5, type=probability, help="largest fraction the clipping search shrinks a range by"),
        Option("dump", None, flag="--dump-awq", metavar="FILE", type=path_arg,
               help="save the search results (safetensors + json) to FILE"),
        Option("load", None, flag="--load-awq", metavar="FILE", type=path_arg,
               help="apply results saved with --dump-awq instead of searching"),
    )

    def __init__(self, scheme: QuantScheme, **options: Any):
        self._identity: dict | None = None
        self._probe: torch.Tensor | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._layers: dict[str, dict] = {}
        self._loaded: tuple[dict[str, torch.Tensor], dict] | None = None
        self._no_clip: set[str] = set()  # paths inside a layer; prepare() asks the adapter
        super().__init__(scheme, **options)  # runs check(), which reads a load-awq file

    def check(self, scheme: QuantScheme) -> None:
        super().check(scheme)
        o = self.opts
        if not isinstance(o["n_grid"], int) or o["n_grid"] < 2:
            raise UnsupportedSchemeError(f"awq n_grid must be an integer >= 2, got {o['n_grid']!r}; pass --awq-grid 20.")
        if not 0 <= float(o["max_shrink"]) < 1:
            raise UnsupportedSchemeError(f"awq max_shrink must be in [0, 1), got {o['max_shrink']!r}; default 0.5.")
        for k in ("search_tokens", "gram_tokens"):
            if not isinstance(o[k], int) or o[k] < 1:
                raise UnsupportedSchemeError(f"awq {k} must be a positive integer, got {o[k]!r}.")
        if o["dump"] is not None and o["load"] is not None:
            raise UnsupportedSchemeError("--dump-awq and --load-awq exclude each other: search and dump, or load.")
        self.records_reference = o["load"] is None  # the statistics pass streams the float layer
        if o["load"] is not None:
            self._loaded = read_results(o["load"])
            check_scheme(self._loaded[1], scheme, o["load"])

    # -- whole-model hooks ------------------------------------------------------------------------

    def prepare(self, model: nn.Module, adapter: Any) -> None:
        roles = adapter.layer_roles(model.config)
        self._no_clip = {roles[r] for r in NO_CLIP_ROLES if r in roles}
        self._identity, self._probe = model_identity(model, adapter)
        if self._loaded is not None:
            check_identity(self._loaded, self._identity, self._probe, self.opts["load"])

    def finish(self) -> None:
        if self.opts["dump"] is not None:
            meta = {
                "format": FORMAT, "version": FORMAT_VERSION, "scheme": self.scheme.to_dict(),
                "options": {k: self.opts[k] for k in ("n_grid", "duo_scaling", "clip", "search_tokens",
                                                      "gram_tokens", "max_shrink")},
                "model": self._identity, "layers": self._layers,
            }
            tensors = dict(self._tensors)
            if self._probe is not None:
                tensors["probe.weight"] = self._probe
            write_results(self.opts["dump"], tensors, meta)

    # -- one layer --------------------------------------------------------------------------------

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        t0 = time.perf_counter()
        if self._loaded is not None:
            self._apply_loaded(ctx)
            ctx.report["awq_seconds"] = round(time.perf_counter() - t0, 2)
            return
        for path in ctx.linear_paths():
            self.scheme.check_shape(ctx.module(path).in_features, ctx.prefix + path)
        stats = self._collect(ctx)
        record: dict[str, Any] = {"groups": [], "clip": {}}
        chosen = []
        for gi, g in enumerate(ctx.groups):
            if g.prev is None:
                continue
            s, alpha, loss0, loss = self._search_scales(ctx, g, stats[gi])
            chosen.append((gi, g, s))
            key = f"{ctx.prefix}{g.prev}.awq_scales"
            self._tensors[key] = s.clone()
            record["groups"].append({"prev": g.prev, "linears": g.linears, "alpha": alpha, "scales": key,
                                     "loss_rtn": loss0, "loss": loss})
        for gi, g, s in chosen:
            fold_scales(ctx, g, s)
            stats[gi].unscale(s)
        if self.opts["clip"]:
            for gi, g in enumerate(ctx.groups):
                for path in g.linears:
                    if path in self._no_clip:
                        continue
                    lin = ctx.module(path)
                    blocks = stats[gi].diagonal_blocks(self.scheme.group_width(lin.in_features))
                    mv = clip_search(lin.weight, blocks, self.scheme, self.opts["n_grid"],
                                     float(self.opts["max_shrink"]))
                    apply_clip(lin.weight, mv, self.scheme)
                    key = f"{ctx.prefix}{path}.awq_clip"
                    self._tensors[key] = mv
                    record["clip"][path] = key
        self._layers[str(ctx.index)] = {"prefix": ctx.prefix, **record}
        ctx.report["awq_alpha"] = {g["prev"]: g["alpha"] for g in record["groups"]}
        ctx.report["awq_seconds"] = round(time.perf_counter() - t0, 2)

    def _collect(self, ctx: LayerContext) -> list[_GroupStats]:
        """One pass over the calibration batches: statistics of each group's input, and the calls
        of each norm-fed group's inspect module on a few evenly spaced batches."""
        n_batches = len(ctx.inputs)
        if n_batches == 0:
            raise LowbitError("awq needs calibration data; got no calibration batches (pass --nsamples 128).")
        tokens_per_batch = ctx.inputs[0].shape[0] * ctx.inputs[0].shape[1]
        total = tokens_per_batch * n_batches
        stride = max(1, total // self.opts["gram_tokens"])
        n_sel = min(n_batches, max(1, math.ceil(self.opts["search_tokens"] / tokens_per_batch)))
        # fewer tokens than a batch: the first rows (whole sequences) of the one selected batch
        batch_rows = ctx.inputs[0].shape[0]
        rows = min(batch_rows, math.ceil(self.opts["search_tokens"] / ctx.inputs[0].shape[1]))
        selected = {round(i * (n_batches - 1) / max(1, n_sel - 1)) for i in range(n_sel)} if n_sel > 1 else {0}
        stats = []
        for g in ctx.groups:
            k = ctx.module(g.linears[0]).in_features
            full = g.prev is not None and _linear_inspect(g)  # its scale search reads the whole Gram
            stats.append(_GroupStats(k, None if full else self.scheme.group_width(k)))
        hooks: dict[str, Callable] = {}
        for gi, g in enumerate(ctx.groups):
            st = stats[gi]

            def on_linear(b, args, kwargs, st=st):
                x = _first_input(args, kwargs)
                with torch.autocast(x.device.type, enabled=False):
                    st.add(x.reshape(-1, x.shape[-1]).float(), stride)

            _add_hook(hooks, g.source or g.linears[0], on_linear)
            if g.prev is not None and not _linear_inspect(g):

                def on_inspect(b, args, kwargs, st=st):
                    if b in selected:
                        st.calls.append(_take_rows(args, kwargs, rows, batch_rows))

                _add_hook(hooks, g.inspect, on_inspect)
        ctx.stream(hooks, reference=True)
        return stats

    def _search_scales(self, ctx: LayerContext, g: LinearGroup, st: _GroupStats):
        x_mean = (st.abs_sum / max(st.tokens, 1)).float()
        lins = [ctx.module(p) for p in g.linears]
        orig = [lin.weight.detach().clone() for lin in lins]
        w_mean = _weight_mean(orig, self.scheme) if self.opts["duo_scaling"] else None
        n_grid = self.opts["n_grid"]
        if _linear_inspect(g):
            def loss_of(s):
                total = 0.0
                with torch.autocast(st.gram.device.type, enabled=False):
                    for w in orig:
                        d = w.float() - _fq(w.float() * s, self.scheme) / s
                        total += float(((d @ st.gram) * d).sum())
                return total
        else:
            mod = ctx.module(g.inspect)
            with ctx.autocast():
                refs = [_out(mod(*a, **kw)).float() for a, kw in st.calls]

            def loss_of(s):
                for lin, w in zip(lins, orig):
                    lin.weight.copy_(_fq(w.float() * s, self.scheme) / s)
                total = 0.0
                with ctx.autocast():
                    for (a, kw), ref in zip(st.calls, refs):
                        total += float((_out(mod(*a, **kw)).float() - ref).pow(2).sum())
                return total

        best, best_alpha, loss0 = None, 0.0, None
        best_loss = math.inf
        try:
            for i in range(n_grid):
                alpha = i / n_grid
                s = awq_scales(x_mean, w_mean, alpha)
                loss = loss_of(s)
                if loss0 is None:
                    loss0 = loss
                if loss < best_loss:
                    best_loss, best, best_alpha = loss, s, alpha
        finally:
            for lin, w in zip(lins, orig):
                lin.weight.copy_(w)
        st.calls = []
        if best is None:
            raise LowbitError(f"awq found no finite loss for {ctx.prefix}{g.prev} (non-finite activations?).")
        return best, best_alpha, loss0, best_loss

    def _apply_loaded(self, ctx: LayerContext) -> None:
        tensors, meta = self._loaded
        path = self.opts["load"]
        rec = meta["layers"].get(str(ctx.index))
        if rec is None:
            raise CheckpointError(f"load-awq file {path} has no results for layer {ctx.index}; "
                                  "it was made for another model: search again without --load-awq.")
        by_prev = {g["prev"]: g for g in rec["groups"]}
        for g in ctx.groups:
            if g.prev is None:
                continue
            entry = by_prev.get(g.prev)
            if entry is None or entry["linears"] != g.linears:
                raise CheckpointError(f"load-awq file {path} has no scales for {ctx.prefix}{g.prev} -> "
                                      f"{', '.join(g.linears)}; it was made for another model.")
            s = tensors[entry["scales"]]
            if s.shape != (ctx.module(g.linears[0]).in_features,):
                raise CheckpointError(f"load-awq file {path}: {entry['scales']} has shape {list(s.shape)}, the "
                                      "model needs another; it was made for another model.")
            fold_scales(ctx, g, s)
        for lpath, key in rec["clip"].items():
            w = ctx.module(lpath).weight
            mv = tensors[key]
            if mv.shape != (w.shape[0], self.scheme.num_groups(w.shape[1])):
                raise CheckpointError(f"load-awq file {path}: {key} has shape {list(mv.shape)}, which does not fit "
                                      f"{ctx.prefix}{lpath}; it was made for another model or group size.")
            apply_clip(w, mv, self.scheme)
        ctx.report["awq_alpha"] = {g["prev"]: g["alpha"] for g in rec["groups"]}


def _take_rows(args: tuple, kwargs: dict, rows: int, batch: int) -> tuple[tuple, dict]:
    """A module call's arguments cut to the first ``rows`` sequences of the batch: tensors (also
    inside tuples, e.g. position embeddings) whose first dimension is the batch size are sliced,
    others (broadcast masks, ``[1, seq, ...]`` positions, flags) are passed as they are."""
    if rows >= batch:
        return args, dict(kwargs)

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return v[:rows]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _add_hook(hooks: dict, path: str, fn: Callable) -> None:
    prev = hooks.get(path)
    if prev is None:
        hooks[path] = fn
    else:
        def both(b, a, kw, f1=prev, f2=fn):
            f1(b, a, kw)
            f2(b, a, kw)
        hooks[path] = both


def _linear_inspect(g: LinearGroup) -> bool:
    return g.inspect is None or (len(g.linears) == 1 and g.inspect == g.linears[0])


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _weight_mean(weights: list[torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    """Duo scaling's weight statistic: mean over rows of ``|w| / max|w|`` within each group."""
    w = torch.cat([x.float() for x in weights], dim=0)
    k = w.shape[1]
    gs = scheme.group_width(k)
    wg = w.abs().reshape(-1, gs)
    wg = wg / (wg.amax(dim=1, keepdim=True) + 1e-6)
    return wg.reshape(w.shape).mean(0)


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """The per-input-channel scales for one grid point, normalised so ``sqrt(max·min) = 1``."""
    if w_mean is None:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    else:
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    s[~torch.isfinite(s)] = 1.0
    return s.float()


@torch.no_grad()
def fold_scales(ctx: LayerContext, g: LinearGroup, s: torch.Tensor) -> None:
    """Divide the previous op's output by ``s`` and multiply the linears' input columns by ``s``."""
    prev = ctx.module(g.prev)
    n = s.numel()
    if isinstance(prev, nn.Linear):
        prev.weight[-n:].div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias[-n:].div_(s.to(prev.bias.dtype))
    else:
        weight = getattr(prev, "weight", None)
        if weight is None or weight.dim() != 1 or weight.numel() != n:
            raise UnsupportedSchemeError(
                f"awq cannot fold scales into {ctx.prefix}{g.prev} ({type(prev).__name__}): it needs a norm with a "
                f"[{n}] weight or a linear; use --method gptq or rtn for this architecture.")
        if g.norm_offset:  # x̂·(offset + w) / s = x̂·(offset + w'), w' = (offset + w) / s - offset
            weight.add_(g.norm_offset).div_(s.to(weight.dtype)).sub_(g.norm_offset)
        else:
            weight.div_(s.to(weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for p in (*g.linears, *g.also_scaled):
        w = ctx.module(p).weight
        w.mul_(s.view(1, -1).to(w.dtype))


def clip_search(w: torch.Tensor, blocks: torch.Tensor, scheme: QuantScheme, n_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) clip value ``[N, NG]`` (float32) minimising each group's partial output
    error ``δ G_gg δᵀ`` (δ = w - Q(clamp(w)); ``blocks`` ``[NG, gs, gs]`` the diagonal blocks G_gg
    of the Gram matrix of the linear's input, see :func:`gram`)."""
    w = w.detach().float()
    n, k = w.shape
    gs = scheme.group_width(k)
    ng = k // gs
    if blocks.shape != (ng, gs, gs):
        raise ValueError(f"clip_search needs the Gram's diagonal blocks [{ng}, {gs}, {gs}], got {list(blocks.shape)}.")
    wg = w.reshape(n, ng, gs)
    blocks = blocks.float()
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    org_max = torch.maximum(lo.abs(), hi.abs())
    best = org_max.clone()
    best_err = torch.full_like(org_max, math.inf)
    with torch.autocast(w.device.type, enabled=False):
        for i in range(max(1, int(max_shrink * n_grid))):
            mv = org_max * (1 - i / n_grid)
            wc = torch.maximum(torch.minimum(wg, mv[..., None]), -mv[..., None]).reshape(n, k)
            # clamping is monotone, so the clamped groups' ranges are the clamped ranges: no pass over wc
            cmin, cmax = torch.maximum(torch.minimum(lo, mv), -mv), torch.maximum(torch.minimum(hi, mv), -mv)
            d = (_fq(wc, scheme, cmin, cmax).reshape(n, ng, gs) - wg).transpose(0, 1)  # [NG, N, gs]
            err = (torch.bmm(d, blocks) * d).sum(-1).T  # [N, NG]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, mv, best)
    return best


@torch.no_grad()
def apply_clip(weight: torch.Tensor, max_val: torch.Tensor, scheme: QuantScheme) -> None:
    """Clamp each (row, group) of ``weight`` to ``[-max_val, max_val]`` in place."""
    n, k = weight.shape
    gs = scheme.group_width(k)
    wg = weight.view(n, k // gs, gs)
    mv = max_val.to(weight.dtype)[..., None]
    wg.copy_(torch.maximum(torch.minimum(wg, mv), -mv))


# -- results files -----------------------------------------------------------------------------------
