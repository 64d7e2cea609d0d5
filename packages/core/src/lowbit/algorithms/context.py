"""What a recipe step works on: the linear groups of a decoder layer and the LayerContext that runs
the layer over its calibration inputs, including the replay of finished blocks (a block whose
output is one linear's output is computed from that linear's captured inputs instead of run)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..finite import check_activation
from ..qweight import QuantizedWeight
from ..scheme import QuantScheme


@dataclass
class LinearGroup:
    """Linears that read the same input, and the op that produces it.

    :param prev: path (inside the layer) of the op whose output feeds ``linears`` (a norm or a
        linear), or None when no op can absorb a per-channel scale. Nothing but ``linears`` (and
        ``inspect``, which holds them) reads that output: AWQ folds scales into it, and a replayed
        ``inspect`` block skips it.
    :param linears: paths inside the layer, as the architecture adapter names them (a family's q,
        k and v projections, say).
    :param inspect: path of the module whose output measures the group's error (AWQ), e.g. the
        attention block; None means the linears themselves.
    """

    prev: str | None
    linears: list[str]
    inspect: str | None = None
    #: ``prev`` is a norm computing ``x̂ · (offset + w)`` (Gemma: 1.0); folding a scale ``s`` into it
    #: must give ``(offset + w) / s``, i.e. ``w' = (offset + w) / s - offset``
    norm_offset: float = 0.0
    #: module whose input is the group's input, when it is not the first linear's (a MoE block: each
    #: expert sees only its routed tokens, the block sees them all)
    source: str | None = None
    #: float linears that also read ``prev``'s output (a MoE router): AWQ scales their input columns
    #: with the group's, so the float layer computes the same function; they are never quantized
    also_scaled: tuple[str, ...] = ()
    #: True when only linears under one parent module share an input (MoE experts): GPTQ then takes
    #: one Hessian per parent instead of one for the group
    inputs_per_parent: bool = False
    #: groups with the same label have inputs that do not depend on each other's linears (one MoE
    #: expert's down projection and another's): GPTQ quantizes them in one calibration pass; None: own pass
    stage: str | None = None

    def input_sets(self) -> list[list[str]]:
        """The linears grouped by the input they actually read (one set unless ``inputs_per_parent``)."""
        if not self.inputs_per_parent:
            return [list(self.linears)]
        sets: dict[str, list[str]] = {}
        for p in self.linears:
            sets.setdefault(p.rpartition(".")[0], []).append(p)
        return list(sets.values())


class StopForward(Exception):
    """Raised by a hook to end a forward pass early, once what it needed has been seen."""


@dataclass
class Replay:
    """A block (attention, MLP) whose output is its output linear applied to inputs captured
    earlier, one tensor per calibration batch: valid once every other linear of the block is final.

    The pass then computes ``linear(inputs[batch])`` instead of the whole block, once per batch:
    the output replaces the captured input and serves every later forward while the linear's
    weight is unchanged. The op feeding the block (its group's ``prev``, a norm) is skipped too,
    since only the block reads it. Whether the block's output really is the linear's output is
    checked once: on the batch a step saw the block return (:meth:`LayerContext.check_block`), or
    else on the first call, which runs the block for real. On disagreement, or an output carrying
    more than the hidden state, the replay turns itself off."""

    linear: str
    inputs: list[torch.Tensor | None]
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    version: int = -1  # the linear's weight._version the outputs hold
    width: int = 0  # the block returns a tensor (0) or a tuple of that many, all but the first None
    state: str = "unchecked"  # unchecked | on | off


@dataclass
class LayerContext:
    """One decoder layer during the pass.

    :param inputs: the layer's calibration inputs, a list of ``[batch, seqlen, hidden]`` tensors.
    :param kwargs: per input batch, the keyword arguments the model passed to the layer
        (position embeddings, attention mask, ...).
    :param blocks: block path → its output linear (an MLP → its down projection): blocks whose
        output is that linear's output, which a step may :meth:`replay` from captured inputs.
    """

    index: int
    prefix: str
    layer: nn.Module
    groups: list[LinearGroup]
    scheme: QuantScheme
    inputs: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    qweights: dict[str, QuantizedWeight] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    compute_dtype: torch.dtype = torch.float32
    blocks: dict[str, str] = field(default_factory=dict)
    replays: dict[str, Replay] = field(default_factory=dict)
    batch: int = 0
    reference: list[torch.Tensor] | None = None  # the float layer's outputs on the first report batches
    float_outputs: list[torch.Tensor] | None = None  # on every batch, for steps that need them (before any step)
    report_batches: int | None = None
    #: nothing runs this layer after its steps (no calibration) and its float weights are streamed: a quantized
    #: linear's float weight is dropped at once instead of being overwritten by its dequantized values
    drop_quantized: bool = False

    def module(self, path: str) -> nn.Module:
        return self.layer.get_submodule(path)

    def linear_paths(self) -> list[str]:
        return [p for g in self.groups for p in g.linears]

    def unquantized(self) -> list[str]:
        return [p for p in self.linear_paths() if self.prefix + p not in self.qweights]

    def set_quantized(self, path: str, qw: QuantizedWeight) -> None:
        """Record ``qw`` for the linear at ``path`` and put its dequantized weight in the layer (with
        ``drop_quantized``: put the weight back on the meta device, freeing it)."""
        lin = self.module(path)
        if self.drop_quantized:
            lin.weight = nn.Parameter(lin.weight.detach().to("meta"), requires_grad=False)
        else:
            with torch.no_grad():
                lin.weight.copy_(qw.dequantize(lin.weight.dtype))
        self.qweights[self.prefix + path] = qw
        for block, rp in list(self.replays.items()):  # a captured input upstream of ``path`` is stale
            if path.startswith(block + ".") and path != rp.linear:
                del self.replays[block]

    # -- replaying finished blocks ----------------------------------------------------------------

    def block_of(self, linear: str) -> str | None:
        """The block whose output ``linear`` produces, if the adapter declared one."""
        return next((b for b, lin in self.blocks.items() if lin == linear), None)

    def replayable(self, linear: str) -> bool:
        """True when ``linear``'s input is final: it closes a block whose other linears are quantized."""
        block = self.block_of(linear)
        if block is None:
            return False
        inside = [p for p in self.linear_paths() if p.startswith(block + ".") and p != linear]
        return all(self.prefix + p in self.qweights for p in inside)

    def replay(self, linear: str, inputs: list[torch.Tensor], checked: tuple[bool, int] | None = None) -> None:
        """From now on compute ``linear``'s block as ``linear(inputs[batch])`` (see :class:`Replay`);
        ``checked`` is :meth:`check_block`'s verdict, if a step took one."""
        block = self.block_of(linear)
        try:
            self.module(block or "")
        except AttributeError:  # an adapter that declares a block its layers lack: no replay
            return
        if checked is not None and not checked[0]:  # the block's output is not the linear's: no replay
            return
        if block and len(inputs) == len(self.inputs):
            rp = Replay(linear, list(inputs), version=self.module(linear).weight._version)
            if checked is not None:
                rp.state, rp.width = "on", checked[1]
            self.replays[block] = rp

    @torch.no_grad()
    def check_block(self, linear: str, block_output: Any, linear_input: torch.Tensor) -> tuple[bool, int]:
        """Whether ``linear``'s block returned ``linear(linear_input)`` (``block_output``, from the same
        batch and weights): (agrees, the tuple width of the block's output, 0 for a tensor)."""
        with self.autocast():
            y = self.module(linear)(linear_input)
        return _agrees(block_output, y)

    def feed_of(self, block: str) -> str | None:
        """The op whose output only ``block`` reads: the ``prev`` of the group ``block`` inspects."""
        return next((g.prev for g in self.groups if g.inspect == block), None)

    def _replay_forward(self, block: nn.Module, rp: Replay):
        original = block.forward
        lin = self.module(rp.linear)

        def output(b: int) -> torch.Tensor:
            y = rp.outputs.get(b)
            if y is None:
                y = rp.outputs[b] = lin(rp.inputs[b])
                rp.inputs[b] = None  # the output serves from now on
            return y

        def forward(*args, **kwargs):
            if rp.state == "off" or rp.state == "on" and not self._replay_valid(rp):
                return original(*args, **kwargs)
            y = output(self.batch)
            if rp.state == "on":
                return (y, *[None] * (rp.width - 1)) if rp.width else y
            out = original(*args, **kwargs)
            ok, rp.width = _agrees(out, y)
            rp.state = "on" if ok else "off"
            return out

        return forward

    def _replay_valid(self, rp: Replay) -> bool:
        """False (and the replay off) once its linear's weight changed after the capture."""
        if self.module(rp.linear).weight._version != rp.version:
            rp.state = "off"
        return rp.state != "off"

    def _skipped_while_on(self, op: nn.Module, rp: Replay):
        """``op``'s forward, returning its input untouched while ``rp`` replays the block it feeds."""
        original = op.forward

        def forward(*args, **kwargs):
            if rp.state == "on" and self._replay_valid(rp):
                return args[0] if args else kwargs["hidden_states"]
            return original(*args, **kwargs)

        return forward

    @contextmanager
    def _replaying(self):
        patched: list[tuple[nn.Module, Any]] = []  # (module, the forward it had on the instance or None)

        def patch(mod: nn.Module, forward) -> None:
            patched.append((mod, mod.__dict__.get("forward")))
            mod.forward = forward

        try:
            for path, rp in self.replays.items():
                block = self.module(path)
                patch(block, self._replay_forward(block, rp))
                feed = self.feed_of(path)
                if feed is not None:
                    op = self.module(feed)
                    patch(op, self._skipped_while_on(op, rp))
            yield
        finally:
            for mod, before in reversed(patched):  # an instance's own forward (accelerate's hooks) stays
                if before is None:
                    del mod.forward
                else:
                    mod.forward = before

    # -- running the layer --------------------------------------------------------------------------

    def _batches(self, batches: int | None):
        with self.autocast(), self._replaying():
            for b, (x, kw) in enumerate(list(zip(self.inputs, self.kwargs))[:batches]):
                self.batch = b
                yield x, kw

    def autocast(self):
        """Matmuls in ``compute_dtype`` (bf16 → AMX on Xeon) when it is not float32."""
        enabled = self.compute_dtype != torch.float32
        device_type = next(self.layer.parameters()).device.type
        return torch.autocast(device_type, dtype=self.compute_dtype, enabled=enabled)

    @torch.no_grad()
    def forward(self, batches: int | None = None) -> list[torch.Tensor]:
        """The layer's outputs over every input batch, or the first ``batches`` (with the layer as it is now)."""
        outs = []
        for x, kw in self._batches(batches):
            out = self.layer(x, **kw)
            out = out[0] if isinstance(out, tuple) else out
            check_activation(out, f"the output of layer {self.index} (calibration batch {self.batch})")
            outs.append(out.to(x.dtype))
        return outs

    @torch.no_grad()
    def reference_outputs(self) -> list[torch.Tensor]:
        """The float layer's outputs on the first ``report_batches`` batches, for the error report:
        recorded by a step's :meth:`stream` (``reference=True``) or computed now."""
        if self.reference is None:
            self.reference = self.forward(self.report_batches)
        return self.reference

    @torch.no_grad()
    def stream(self, hooks: dict[str, Callable[[int, tuple, dict], None]], stop_when_all_seen: bool = True,
               reference: bool = False, first_outputs: dict[str, Callable[[Any], None]] | None = None) -> None:
        """Run the layer over every calibration batch, calling ``hooks[path](batch, args, kwargs)``
        with the inputs reaching each module; a batch's forward stops as soon as every hooked
        module has fired (the rest of the layer is not computed). ``first_outputs[path](output)``
        gets each listed module's output on the first batch, which runs on until they all returned.
        With ``reference`` (a step streaming the untouched float layer) the report batches run to
        the end and their outputs become :attr:`reference`, which then costs no forward of its own."""
        seen: set[str] = set()
        handles = []
        record = reference and self.reference is None
        n_ref = len(self.inputs) if self.report_batches is None else self.report_batches
        outs: list[torch.Tensor] = []
        first_outputs = first_outputs or {}

        def stop() -> None:
            need = len(hooks) + (len(first_outputs) if self.batch == 0 else 0)
            if stop_when_all_seen and len(seen) == need and not (record and self.batch < n_ref):
                raise StopForward

        def make(path, fn):
            def hook(_mod, args, kwargs):
                check_activation(args[0] if args else kwargs.get("hidden_states"),
                                 f"the input of layer {self.index}'s {path} (calibration batch {self.batch})")
                fn(self.batch, args, kwargs)
                seen.add(path)
                stop()
            return hook

        def make_after(path, fn):
            def hook(_mod, _args, output):
                if self.batch == 0:
                    fn(output)
                    seen.add(path + " (output)")
                    stop()
            return hook

        for path, fn in hooks.items():
            handles.append(self.module(path).register_forward_pre_hook(make(path, fn), with_kwargs=True))
        for path, fn in first_outputs.items():
            handles.append(self.module(path).register_forward_hook(make_after(path, fn)))
        try:
            for x, kw in self._batches(None):
                seen.clear()
                try:
                    out = self.layer(x, **kw)
                except StopForward:
                    continue
                if record and self.batch < n_ref:
                    out = out[0] if isinstance(out, tuple) else out
                    check_activation(out, f"the output of layer {self.index} (calibration batch {self.batch})")
                    outs.append(out.to(x.dtype))
        finally:
            for h in handles:
                h.remove()
        if record:
            self.reference = outs


def _agrees(block_output: Any, y: torch.Tensor) -> tuple[bool, int]:
    """(``block_output`` is ``y``, or a tuple of ``y`` and Nones; the tuple's width, 0 for a tensor)."""
    first = block_output[0] if isinstance(block_output, tuple) else block_output
    plain = not isinstance(block_output, tuple) or all(o is None for o in block_output[1:])
    ok = (plain and isinstance(first, torch.Tensor) and first.shape == y.shape
          and torch.allclose(first, y, rtol=1e-5, atol=1e-6))
    return ok, len(block_output) if isinstance(block_output, tuple) else 0
