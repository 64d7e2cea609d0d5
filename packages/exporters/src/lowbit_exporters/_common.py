"""Pieces the safetensors formats (AutoAWQ, GPTQ) and xFT share: model shapes from the HF config,
quantization_config lookup, grouping a state dict into quantized modules, and the write/read
skeleton of an HF-style quantized directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch

from lowbit import CheckpointError, Exporter, QuantizedModel, QuantizedWeight, QuantScheme, UnsupportedSchemeError
from lowbit.exporting import with_adapter
from lowbit.hf import (
    DEFAULT_SHARD_BYTES,
    checkpoint_file,
    load_config,
    load_extras,
    load_tensors,
    save_tensors,
    write_config,
    write_extras,
)
from lowbit.models import Adapter, adapter_or_none, config_get
from lowbit.packing import Packer
from lowbit.plugins import registry


def _get(config, key, default=None):
    return config_get(config, key, default)


def family(config) -> Adapter | None:
    """The installed architecture adapter serving ``config``'s model type, or None: what a format
    asks where it has a config but no QuantizedModel yet (``check()`` before quantizing, a reader
    before it builds one). A QuantizedModel carries its own (``qmodel.adapter``)."""
    return adapter_or_none(config, registry("architectures"))


def linear_shapes(adapter: Adapter | None, config) -> dict[str, tuple[int, int]]:
    """``(N, K)`` (out, in) of each quantized linear, keyed by its leaf path in a decoder layer, as
    the architecture adapter gives them; empty without an adapter (a model type no plugin serves)
    or when the config lacks the sizes (then callers check shapes per tensor instead)."""
    return adapter.linear_shapes(config) if adapter is not None else {}


def checkpoint_name(adapter: Adapter | None, name: str) -> str:
    """The name AutoAWQ / GPTQModel give lowbit's tensor or module ``name`` (the adapter's renames)."""
    return adapter.checkpoint_name(name) if adapter is not None else name


def lowbit_name(adapter: Adapter | None, name: str) -> str:
    """Inverse of :func:`checkpoint_name`."""
    return adapter.lowbit_name(name) if adapter is not None else name


def layer_leaf(adapter: Adapter | None, name: str) -> str | None:
    """``name``'s path inside its decoder layer, or None outside the decoder layers or without an
    adapter (only the adapter knows where a family's layers are)."""
    return adapter.layer_leaf(name) if adapter is not None else None


def shape_problem(config, need, what: str) -> str | None:
    """First linear of ``config`` for which ``need(n, k)`` returns a reason, phrased for check()."""
    for leaf, (n, k) in linear_shapes(family(config), config).items():
        reason = need(n, k)
        if reason:
            return f"{what} {reason} ({leaf} is {n}x{k} out x in)"
    return None


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, None if absent; CheckpointError if unreadable."""
    path = checkpoint_file(path.parent, path.name)  # never a link out of the directory, a FIFO or a device
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is damaged.") from err
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} holds {type(d).__name__}, not a JSON object; the checkpoint is damaged.")
    return d


def quant_config(path: Path) -> dict | None:
    """``config.json``'s ``quantization_config``, else ``quantize_config.json`` / ``quant_config.json``
    (older AutoGPTQ / AutoAWQ), else None. Never raises for a missing file (cheap, for detect)."""
    try:
        cfg = read_json(path / "config.json")
    except CheckpointError:
        cfg = None
    if cfg and isinstance(cfg.get("quantization_config"), dict):
        return cfg["quantization_config"]
    for name in ("quantize_config.json", "quant_config.json"):
        try:
            d = read_json(path / name)
        except CheckpointError:
            d = None
        if d:
            return d
    return None


def first(d: dict, *keys, default=None):
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def make_scheme(path: Path, bits, group_size, sym: bool, act_order: bool) -> QuantScheme:
    try:
        return QuantScheme(bits=int(bits), group_size=int(group_size), sym=bool(sym), act_order=bool(act_order))
    except (UnsupportedSchemeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its quantization config (bits={bits}, group_size={group_size}) is "
                              f"outside what lowbit holds: {err}") from err


def split_modules(tensors: dict[str, torch.Tensor], parts: tuple[str, ...], path: Path
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(module → its packed tensors, the remaining float tensors). A module is quantized when it
    has a ``qweight``; a stray ``qzeros``/``scales`` without one is an incomplete checkpoint."""
    mods = sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight"))
    packed: dict[str, dict[str, torch.Tensor]] = {m: {} for m in mods}
    floats = {}
    for name, t in tensors.items():
        mod, _, leaf = name.rpartition(".")
        if mod in packed and leaf in parts:
            packed[mod][leaf] = t
        elif leaf == "qzeros":  # (a lone ``scales`` is a float tensor, e.g. AutoAWQ's ScaledActivation)
            raise CheckpointError(f"{path}: {name} has no {mod}.qweight beside it; the checkpoint is incomplete.")
        elif mod in packed and leaf == "weight":
            raise CheckpointError(f"{path}: {mod} holds both a float weight and a qweight; which one is meant?")
        else:
            floats[name] = t
    return packed, floats


def check_module_shape(path: Path, adapter: Adapter | None, config, mod: str, n: int, k: int) -> None:
    """CheckpointError when a quantized module's (N, K) disagrees with the HF config."""
    leaf = layer_leaf(adapter, mod)
    if leaf is None:
        return
    expected = linear_shapes(adapter, config).get(leaf)
    if expected and expected != (n, k):
        raise CheckpointError(
            f"{path}: {mod} holds a {n}x{k} (out x in) weight but config.json implies {expected[0]}x{expected[1]}; "
            "config and tensors disagree."
        )


def strip_quantization_config(config) -> None:
    """Remove ``quantization_config`` from a loaded HF config so that building the float/quantized
    model from it does not ask transformers to quantize again."""
    if hasattr(config, "quantization_config"):
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None


def check_sym_zeros(qw: QuantizedWeight, where: str) -> None:
    """A symmetric weight must have every zero at ``2**(bits-1)`` (what sym readers assume)."""
    if qw.scheme.sym:
        mid = 1 << (qw.scheme.bits - 1)
        if qw.zeros.numel() and not bool((qw.zeros == mid).all()):
            raise CheckpointError(
                f"{where} is marked symmetric but has zero points other than {mid}; symmetric readers "
                f"(Marlin, vLLM) would ignore them. Mark it asymmetric or requantize."
            )


def unquantized_block_linears(qmodel: QuantizedModel) -> list[str]:
    """Leaf paths (as checkpoints name them) of 2-D float weights inside decoder layers: linears left
    in float, such as a MoE router; then the adapter's float modules outside the layers (a vision tower)."""
    adapter = with_adapter(qmodel).adapter
    out = set()
    for name in qmodel.float_tensors:  # names first: a lazily read model reads only the layers' weights
        leaf = layer_leaf(adapter, checkpoint_name(adapter, name))
        if leaf and name.endswith(".weight") and qmodel.float_tensors[name].dim() == 2:
            out.add(leaf[: -len(".weight")])
    return sorted(out) + list(adapter.float_modules if adapter is not None else ())


class HFQuantFormat(Exporter):
    """Skeleton of a format that is an HF directory with packed safetensors per quantized linear.

    Subclasses set ``layout`` (the name of the registered packer they write), ``parts`` and implement ``quantization_config`` (what goes to
    config.json) and ``parse`` (quantization config → scheme + packer).
    """

    #: the layout written: a packer's name in ``registry("packers")``, so a plugin's packer is used
    layout: ClassVar[str]
    parts: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales", "g_idx", "bias")
    max_shard_bytes: ClassVar[int] = DEFAULT_SHARD_BYTES
    #: the dtype biases are stored in (what the consumers' layers hold)
    bias_dtype: ClassVar[torch.dtype] = torch.float16

    @classmethod
    def packer(cls, layout: str | None = None) -> type[Packer]:
        """The registered packer of ``layout`` (default: the one this format writes)."""
        return registry("packers").get(layout or cls.layout)

    # -- subclass hooks ------------------------------------------------------------------------
    def quantization_config(self, qmodel: QuantizedModel) -> dict:
        raise NotImplementedError

    def parse(self, path: Path, qc: dict, packed: dict[str, dict[str, torch.Tensor]]) -> tuple[QuantScheme, Packer]:
        raise NotImplementedError

    def extra_files(self, qmodel: QuantizedModel, qc: dict, out_dir: Path) -> None:
        """Write format-specific side files (e.g. quantize_config.json)."""

    # -- write ---------------------------------------------------------------------------------
    def write(self, qmodel: QuantizedModel, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        reason = self.check(qmodel.scheme, qmodel.config)
        if reason:
            raise UnsupportedSchemeError(f"cannot write {qmodel.scheme.describe()} as {self.name}: {reason}.")
        packer = self.packer()()
        adapter = with_adapter(qmodel).adapter  # a model built by hand gets the installed one
        name = lambda n: checkpoint_name(adapter, n)  # noqa: E731
        for mod in sorted(qmodel.qweights):  # every check before any tensor is written
            qw = qmodel.qweights[mod]
            check_sym_zeros(qw, name(mod))
            reason = packer.check(qw.scheme, qw.in_features, qw.out_features)
            if reason:
                raise UnsupportedSchemeError(f"cannot write {name(mod)} as {self.name}: {reason}.")

        def tensors():  # one module's tensors in memory at a time (the model may be read lazily)
            for n in sorted(qmodel.float_tensors):
                mod, _, leaf = n.rpartition(".")
                if mod in qmodel.qweights and (leaf == "weight" or leaf == "bias" and qmodel.qweights[mod].bias is not None):
                    continue  # the packed weight (and the quantized module's own bias) replace it
                chunked = getattr(qmodel.float_tensors, "chunked", None)  # a lazily read model
                yield name(n), chunked(n) if chunked else qmodel.float_tensors[n]
            for mod in sorted(qmodel.qweights):
                qw = qmodel.qweights[mod]
                for leaf, t in packer.pack(qw).items():
                    yield f"{name(mod)}.{leaf}", t
                if qw.bias is not None:
                    yield f"{name(mod)}.bias", qw.bias.to(self.bias_dtype)

        qc = self.quantization_config(qmodel)
        save_tensors(tensors(), out_dir, max_shard_bytes=self.max_shard_bytes)
        write_config(qmodel.config, out_dir, quantization_config=qc)
        self.extra_files(qmodel, qc, out_dir)
        write_extras(qmodel, out_dir)

    # -- read ----------------------------------------------------------------------------------
    def read(self, path: Path) -> QuantizedModel:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a directory; point at an exported {self.name} checkpoint.")
        qc = quant_config(path)
        if qc is None:
            raise CheckpointError(f"{path} has no quantization_config in config.json (nor quantize_config.json); "
                                  f"it is not a {self.name} checkpoint.")
        config = load_config(path)
        adapter = family(config)
        tensors = load_tensors(path)
        packed, floats = split_modules(tensors, self.parts, path)
        packed = {lowbit_name(adapter, m): p for m, p in packed.items()}
        floats = {lowbit_name(adapter, n): t for n, t in floats.items()}
        if not packed:
            raise CheckpointError(f"{path} holds no quantized modules (no *.qweight tensors); "
                                  f"it is not a {self.name} checkpoint.")
        scheme, packer = self.parse(path, qc, packed)
        qweights = {}
        for mod, parts in packed.items():
            try:
                qw = packer.unpack(parts, scheme, *self.shape_of(parts, scheme, packer))
            except CheckpointError as err:
                raise CheckpointError(f"{path}: {mod}: {err}") from err
            except (ValueError, RuntimeError, KeyError, IndexError) as err:
                raise CheckpointError(f"{path}: {mod}: tensors do not match the {self.name} layout for "
                                      f"{scheme.describe()} ({type(err).__name__}: {err}).") from err
            check_module_shape(path, adapter, config, mod, qw.out_features, qw.in_features)
            check_sym_zeros(qw, f"{path}: {mod}")
            qweights[mod] = qw
        strip_quantization_config(config)
        qmodel = QuantizedModel(config, scheme, qweights, floats,
                                manifest={"source": {"format": self.name, "path": str(path), "quantization_config": qc}},
                                adapter=adapter)
        qmodel.tokenizer, qmodel.generation_config = load_extras(path)
        return qmodel

    def shape_of(self, parts: dict[str, torch.Tensor], scheme: QuantScheme, packer: Packer) -> tuple[int, int]:
        """(in_features, out_features) of one module from its packed tensors."""
        raise NotImplementedError
