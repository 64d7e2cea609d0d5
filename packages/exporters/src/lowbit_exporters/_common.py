"""Pieces the safetensors formats (AutoAWQ, GPTQ) and xFT share: model shapes from the HF config,
quantization_config lookup, grouping a state dict into quantized modules, and the write/read
skeleton of an HF-style quantized directory."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import ClassVar

import torch

from lowbit import CheckpointError, Exporter, QuantizedModel, QuantizedWeight, QuantScheme, UnsupportedSchemeError
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
from lowbit.packing import Packer

# Leaf names of a llama-family decoder layer's linears, relative to ``model.layers.<i>``.
LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _get(config, key, default=None):
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """``(N, K)`` (out, in) of each llama-family linear, keyed by its leaf path in a decoder layer;
    empty when the config lacks the fields (then callers check shapes per tensor instead)."""
    hidden = _get(config, "hidden_size")
    heads = _get(config, "num_attention_heads")
    inter = _get(config, "intermediate_size")
    if not (hidden and heads and inter):
        return {}
    kv = _get(config, "num_key_value_heads") or heads
    head_dim = _get(config, "head_dim") or hidden // heads
    q, kvd = heads * head_dim, kv * head_dim
    return {
        "self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kvd, hidden), "self_attn.v_proj": (kvd, hidden),
        "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def shape_problem(config, need, what: str) -> str | None:
    """First linear of ``config`` for which ``need(n, k)`` returns a reason, phrased for check()."""
    for leaf, (n, k) in linear_shapes(config).items():
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


def check_module_shape(path: Path, config, mod: str, n: int, k: int) -> None:
    """CheckpointError when a quantized module's (N, K) disagrees with the HF config."""
    m = _LAYER_RE.match(mod)
    if not m:
        return
    expected = linear_shapes(config).get(m.group(2))
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
    """Leaf paths of 2-D float weights inside decoder layers (linears left in float)."""
    out = set()
    for name, t in qmodel.float_tensors.items():
        m = _LAYER_RE.match(name)
        if m and name.endswith(".weight") and t.dim() == 2:
            out.add(m.group(2)[: -len(".weight")])
    return sorted(out)


class HFQuantFormat(Exporter):
    """Skeleton of a format that is an HF directory with packed safetensors per quantized linear.

    Subclasses set ``packer_cls``, ``parts`` and implement ``quantization_config`` (what goes to
    config.json) and ``parse`` (quantization config → scheme + packer).
    """

    packer_cls: ClassVar[type[Packer]]
    parts: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales", "g_idx", "bias")
    max_shard_bytes: ClassVar[int] = DEFAULT_SHARD_BYTES
    #: the dtype biases are stored in (what the consumers' layers hold)
    bias_dtype: ClassVar[torch.dtype] = torch.float16

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
        packer = self.packer_cls()
        tensors: dict[str, torch.Tensor] = dict(qmodel.float_tensors)
        for mod, qw in sorted(qmodel.qweights.items()):
            check_sym_zeros(qw, mod)
            reason = packer.check(qw.scheme, qw.in_features, qw.out_features)
            if reason:
                raise UnsupportedSchemeError(f"cannot write {mod} as {self.name}: {reason}.")
            for leaf, t in packer.pack(qw).items():
                tensors[f"{mod}.{leaf}"] = t
            if qw.bias is not None:
                tensors[f"{mod}.bias"] = qw.bias.to(self.bias_dtype)
            for leaf in ("weight",):
                tensors.pop(f"{mod}.{leaf}", None)
        qc = self.quantization_config(qmodel)
        save_tensors(tensors, out_dir, max_shard_bytes=self.max_shard_bytes)
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
        tensors = load_tensors(path)
        packed, floats = split_modules(tensors, self.parts, path)
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
            check_module_shape(path, config, mod, qw.out_features, qw.in_features)
            check_sym_zeros(qw, f"{path}: {mod}")
            qweights[mod] = qw
        strip_quantization_config(config)
        qmodel = QuantizedModel(config, scheme, qweights, floats,
                                manifest={"source": {"format": self.name, "path": str(path), "quantization_config": qc}})
        qmodel.tokenizer, qmodel.generation_config = load_extras(path)
        return qmodel

    def shape_of(self, parts: dict[str, torch.Tensor], scheme: QuantScheme, packer: Packer) -> tuple[int, int]:
        """(in_features, out_features) of one module from its packed tensors."""
        raise NotImplementedError
