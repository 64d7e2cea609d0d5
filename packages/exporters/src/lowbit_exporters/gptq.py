"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers): v1 (``checkpoint_format: gptq``, zeros
stored minus one) and v2 (``gptq_v2``, raw zeros). formats.md §2.

Per quantized linear (module path = the nn.Linear's): ``qweight`` int32 ``[K·b/32, N]`` (packed
along K), ``qzeros`` int32 ``[NG, N·b/32]`` (packed along N), ``scales`` fp16 ``[NG, N]``,
``g_idx`` int32 ``[K]`` (always written), ``bias`` fp16 ``[N]`` if any.

**Zero point 0 and v1.** v1 stores ``z − 1`` per field; a zero of 0 becomes the field ``2**b − 1``,
which the consumers decode differently (vLLM/exllama: 16, AutoGPTQ's writer smears 1s, GPTQModel
carries into the next field; formats.md §2.3). Only asymmetric schemes can produce a zero of 0, so
the ``gptq`` (v1) exporter refuses asymmetric schemes *before quantization starts* and points to
``gptq-v2`` (or ``--sym``) — the same split transformers/optimum make (asym → gptq_v2, sym → v1).
The v1 packer also refuses a zero of 0 outright. The reader decodes such a foreign field
per field modulo ``2**b`` (zero 0), and ``inspect`` says which runtimes read it differently.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from lowbit import CheckpointError, QuantizedModel, QuantizedWeight, QuantScheme, UnsupportedSchemeError
from lowbit.packing import Packer, pack_bits, unpack_bits

from ._common import (
    HFQuantFormat,
    checkpoint_name,
    first,
    layer_leaf,
    make_scheme,
    quant_config,
    shape_problem,
    unquantized_block_linears,
)

FORMAT_V1 = "gptq"
FORMAT_V2 = "gptq_v2"


def _shape_need(n: int, k: int) -> str | None:
    if k % 32:
        return f"needs in_features that are multiples of 32, got {k}"
    if n % 32:
        return f"needs out_features that are multiples of 32, got {n}"
    return None


class GPTQPacker(Packer):
    """GPTQ v1 layout: zeros stored minus one (``checkpoint_format: gptq``)."""

    name = "gptq"
    supported_bits = (2, 3, 4, 8)
    supported_group_sizes = (32, 64, 128, -1)
    supports_act_order = True
    #: what is subtracted from each zero before packing (v1: 1, v2: 0)
    zero_offset: ClassVar[int] = 1

    @classmethod
    def check(cls, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        return super().check(scheme, in_features, out_features) or _shape_need(out_features, in_features)

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Pack ``qw`` into ``qweight``, ``qzeros``, ``scales``, ``g_idx``.

        ``qweight`` column n is the LSB-first bitstream of ``codes[n, 0..K-1]`` cut into int32
        words, so 4-bit codes ``[0,1,2,…,7]`` down column 0 give ``qweight[0][0] = 0x76543210``
        (k=0 in bits 0-3, k=7 in bits 28-31). 8-bit ``[1,6,11,16]`` → ``0x100B0601``; 2-bit
        ``[1,2,3,0,…]`` → ``0x39393939``. 3-bit: 32 values fill 3 words, ``k=10`` straddles words
        0/1 (its low 2 bits at bits 30-31 of word 0, its high bit at bit 0 of word 1) and ``k=21``
        words 1/2; ``[1,6,3,0,5,2,7,4,…]`` → ``0xF19D50F1, 0x50F19D50, 0x9D50F19D``.

        ``qzeros`` row g packs ``zeros[0..N-1, g] − zero_offset`` along N the same way: v1
        symmetric 4-bit (z=8 → field 7) is ``0x77777777`` per word, v2 ``0x88888888``; zeros
        ``[1,2,…,8]`` → v1 ``0x76543210``, v2 ``0x87654321``. ``scales`` is ``[NG, N]`` (the
        transpose of QuantizedWeight's), ``g_idx[k]`` the group of input k (``k // G`` without
        act-order, all 0 per channel).
        """
        bits = qw.scheme.bits
        reason = self.check(qw.scheme, qw.in_features, qw.out_features)
        if reason:
            raise UnsupportedSchemeError(f"cannot pack {qw.scheme.describe()} as {self.name}: {reason}.")
        if self.zero_offset and qw.zeros.numel() and int(qw.zeros.min()) < self.zero_offset:
            raise UnsupportedSchemeError(
                "GPTQ v1 cannot store a zero point of 0 (it stores zero-1, and vLLM, AutoGPTQ and GPTQModel "
                "decode the wrapped field differently); write format gptq-v2 or quantize with --sym."
            )
        zeros = (qw.zeros.to(torch.int16) - self.zero_offset) & qw.scheme.maxq
        return {
            "qweight": pack_bits(qw.codes, bits).t().contiguous(),
            "qzeros": pack_bits(zeros.t().contiguous(), bits),
            "scales": qw.scales.t().contiguous().to(torch.float16),
            "g_idx": qw.group_index().to(torch.int32),
        }

    def unpack(self, tensors: dict[str, torch.Tensor], scheme: QuantScheme, in_features: int,
               out_features: int) -> QuantizedWeight:
        """Inverse of :meth:`pack`; zeros are read per field (``(field + zero_offset) mod 2**b``)."""
        missing = [p for p in ("qweight", "qzeros", "scales") if p not in tensors]
        if missing:
            raise CheckpointError(f"missing {', '.join(missing)}; the checkpoint is incomplete")
        bits, k, n = scheme.bits, in_features, out_features
        ng = scheme.num_groups(k)
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        expect = {"qweight": [k * bits // 32, n], "qzeros": [ng, n * bits // 32], "scales": [ng, n]}
        for part, shape in expect.items():
            t = tensors[part]
            if list(t.shape) != shape or (part != "scales" and t.dtype != torch.int32):
                raise CheckpointError(
                    f"{part} is {t.dtype} {list(t.shape)}, expected {'int32' if part != 'scales' else 'float'} "
                    f"{shape} for {scheme.describe()} with K={k}, N={n}; config and tensors disagree")
        if not scales.is_floating_point():
            raise CheckpointError(f"scales are {scales.dtype}, expected float16")
        codes = unpack_bits(qweight.t().contiguous(), bits, k)
        zeros = (unpack_bits(qzeros, bits, n).t().to(torch.int16) + self.zero_offset) & scheme.maxq
        g_idx = tensors.get("g_idx")
        if g_idx is not None:
            if list(g_idx.shape) != [k] or g_idx.is_floating_point():
                raise CheckpointError(f"g_idx is {g_idx.dtype} {list(g_idx.shape)}, expected int32 [{k}]")
            g_idx = g_idx.to(torch.int32)
        qw = QuantizedWeight(codes=codes, scales=scales.t().contiguous().to(torch.float16),
                             zeros=zeros.to(torch.uint8).contiguous(), scheme=scheme, g_idx=g_idx,
                             bias=tensors.get("bias"))
        if g_idx is not None and qw.has_trivial_g_idx():
            qw.g_idx = None
        elif g_idx is not None and not scheme.act_order:
            raise CheckpointError("g_idx is permuted but desc_act is false (kernels that trust desc_act would "
                                  "ignore g_idx); config and tensors disagree")
        return qw


class GPTQv2Packer(GPTQPacker):
    """GPTQ v2 layout: raw zeros (``checkpoint_format: gptq_v2``)."""

    name = "gptq-v2"
    zero_offset = 0


class GPTQExporter(HFQuantFormat):
    """GPTQ v1 (``checkpoint_format: gptq``), the format most consumers read. Symmetric schemes
    only: asymmetric zero points can be 0, which v1 cannot store unambiguously (use gptq-v2)."""

    name = "gptq"
    description = "GPTQ v1 (AutoGPTQ/GPTQModel/vLLM/transformers), zeros stored minus one; 2/3/4/8-bit, sym"
    layout: ClassVar[str] = GPTQPacker.name
    checkpoint_format: ClassVar[str] = FORMAT_V1

    @classmethod
    def check(cls, scheme: QuantScheme, config=None) -> str | None:
        if scheme.bits not in GPTQPacker.supported_bits:
            return f"GPTQ holds bits 2, 3, 4, 8, got {scheme.bits}"
        if cls.checkpoint_format == FORMAT_V1 and not scheme.sym:
            return ("GPTQ v1 stores zero-1 and readers disagree on a zero point of 0 (docs/formats.md, "
                    "Choosing a format), so it "
                    "holds symmetric schemes only; use --format gptq-v2 for asymmetric, or quantize with --sym")
        return shape_problem(config, _shape_need, "GPTQ")

    @classmethod
    def detect(cls, path: Path) -> bool:
        qc = quant_config(Path(path))
        if not qc or str(first(qc, "quant_method", "method", default="gptq")).lower() != "gptq":
            return False
        if "bits" not in qc and "w_bit" not in qc:
            return False
        return _format_of(qc) == cls.checkpoint_format

    def quantization_config(self, qmodel: QuantizedModel) -> dict:
        s = qmodel.scheme
        recipe = (qmodel.manifest or {}).get("recipe") or {}
        opts = {}
        for step in recipe.get("steps", []) or []:
            if step.get("name") == "gptq":
                opts = step.get("options") or {}
        qc = {
            "quant_method": "gptq",
            "checkpoint_format": self.checkpoint_format,
            "format": self.checkpoint_format,
            "bits": s.bits,
            "group_size": s.group_size,
            "desc_act": bool(s.act_order),
            "sym": bool(s.sym),
            "static_groups": bool(opts.get("static_groups", False)),
            "true_sequential": bool(opts.get("true_sequential", True)),
            "damp_percent": float(opts.get("damp", opts.get("damp_percent", 0.01))),
            "lm_head": False,
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"lowbit:{_version()}"]},
        }
        rest = unquantized_block_linears(qmodel)
        if rest:  # optimum replaces every Linear of a block unless told which ones are quantized
            adapter = qmodel.adapter  # unquantized_block_linears gave the model its adapter
            leaves = (layer_leaf(adapter, checkpoint_name(adapter, m)) for m in qmodel.qweights)
            layer0 = sorted({leaf for leaf in leaves if leaf})
            qc["modules_in_block_to_quantize"] = [layer0]
        return qc

    def extra_files(self, qmodel: QuantizedModel, qc: dict, out_dir: Path) -> None:
        import json

        (out_dir / "quantize_config.json").write_text(json.dumps(qc, indent=2, sort_keys=True) + "\n")

    def parse(self, path, qc, packed):
        fmt = _format_of(qc)
        if fmt not in (FORMAT_V1, FORMAT_V2):
            raise CheckpointError(f"{path}: GPTQ checkpoint_format {fmt!r} is not readable by lowbit "
                                  f"(reads {FORMAT_V1}, {FORMAT_V2}); convert it with GPTQModel first.")
        bits = first(qc, "bits", "w_bit")
        group = first(qc, "group_size", "q_group_size", default=-1)
        desc_act = bool(first(qc, "desc_act", default=False))
        packer = self.packer(GPTQv2Packer.name if fmt == FORMAT_V2 else GPTQPacker.name)()
        sym = qc.get("sym")
        if sym is None:  # infer from the zeros (GPTQModel would warn and assume sym)
            scheme = make_scheme(path, bits, group, False, desc_act)
            mid = 1 << (scheme.bits - 1)
            parts = next(iter(packed.values()))
            qw = packer.unpack(parts, scheme, *self.shape_of(parts, scheme, packer))
            sym = bool((qw.zeros == mid).all())
        return make_scheme(path, bits, group, sym, desc_act), packer

    def shape_of(self, parts, scheme, packer):
        if "qweight" not in parts or "scales" not in parts:
            raise CheckpointError("qweight or scales missing; the checkpoint is incomplete")
        n = parts["scales"].shape[-1]
        g_idx = parts.get("g_idx")
        k = g_idx.shape[0] if g_idx is not None and g_idx.dim() == 1 else parts["qweight"].shape[0] * 32 // scheme.bits
        return k, n

    def inspect(self, path: Path) -> dict:
        qm = self.read(path)
        qc = quant_config(Path(path)) or {}
        fmt = _format_of(qc)
        s = qm.scheme
        runtimes = {"lowbit": "yes", "AutoAWQ": "no: AutoAWQ reads only AWQ checkpoints",
                    "xFT": "no: xFT reads its own config.ini/.bin layout; export with --format xft"}
        wrapped = fmt == FORMAT_V1 and any(int(qw.zeros.min()) == 0 for qw in qm.qweights.values())
        if wrapped:
            why = ("v1 zero fields of 2**bits-1 (zero point 0) decode as 0 here, as 2**bits in vLLM/exllama and "
                   "carry into the next field in gptqmodel; re-export as gptq-v2")
            runtimes["vLLM"] = runtimes["transformers+gptqmodel"] = why
        else:
            runtimes["vLLM"] = "yes"
            runtimes["transformers+gptqmodel"] = "yes"
        return {"format": self.name if fmt == FORMAT_V1 else "gptq-v2", "version": fmt,
                "zeros": "stored minus one (v1)" if fmt == FORMAT_V1 else "raw (v2)",
                "scheme": s.to_dict(), "modules": len(qm.qweights), "runtimes": runtimes}


class GPTQv2Exporter(GPTQExporter):
    """GPTQ v2 (``checkpoint_format: gptq_v2``): raw zeros, any zero point, asymmetric schemes."""

    name = "gptq-v2"
    description = "GPTQ v2 (GPTQModel/transformers/vLLM), raw zeros; 2/3/4/8-bit, sym or asym"
    layout = GPTQv2Packer.name
    checkpoint_format = FORMAT_V2


def _format_of(qc: dict) -> str:
    fmt = first(qc, "checkpoint_format", "format", default=FORMAT_V1)
    return str(fmt).lower()


def _version() -> str:
    from . import __version__

    return __version__
