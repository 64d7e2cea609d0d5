"""AutoAWQ checkpoints: GEMM (``version: gemm``, interleaved nibbles; what every AWQ consumer
reads) and GEMV (``version: gemv``, sequential nibbles, padded zeros/scales). formats.md §1.

Two exporters: ``autoawq`` writes GEMM, ``autoawq-gemv`` writes GEMV; either reader reads both
(the ``version`` key says which). 4-bit only, no act-order (the format has no g_idx).

Symmetric schemes are written the way GPTQModel writes them (formats.md §1.1): codes
``q_signed + 8`` with a constant zero 8 in ``qzeros`` and ``"zero_point": false``. Every reader then
agrees: GEMM/GEMV kernels subtract the stored 8, AWQ-Marlin (``zero_point: false`` → uint4b8)
subtracts a built-in 8. Reading ``zero_point: false`` with any zero other than 8 is an error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import torch

from lowbit import CheckpointError, QuantizedModel, QuantizedWeight, QuantScheme, UnsupportedSchemeError
from lowbit.exporting import with_adapter
from lowbit.packing import Packer, pack_bits, unpack_bits

from ._common import HFQuantFormat, first, make_scheme, quant_config, shape_problem, unquantized_block_linears

#: logical column stored at nibble i of an AWQ-GEMM word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: nibble that holds logical column c (AutoAWQ's AWQ_REVERSE_ORDER)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _check_awq(scheme: QuantScheme) -> str | None:
    if scheme.bits != 4:
        return f"AutoAWQ holds 4-bit weights only, got {scheme.bits}-bit; use --format gptq-v2 (or gptq with --sym) for 2/3/8 bits"
    if scheme.act_order:
        return "AutoAWQ has no g_idx, so it cannot hold act-order; quantize without act-order or use gptq"
    return None


def _missing(tensors: dict, parts=("qweight", "qzeros", "scales")) -> None:
    missing = [p for p in parts if p not in tensors]
    if missing:
        raise CheckpointError(f"missing {', '.join(missing)}; the checkpoint is incomplete")


def _expect(tensors: dict, expect: dict, scheme: QuantScheme, k: int, n: int) -> None:
    for part, (shape, dtype) in expect.items():
        t = tensors[part]
        ok_dtype = t.is_floating_point() if dtype == "float" else t.dtype == dtype
        if list(t.shape) != shape or not ok_dtype:
            raise CheckpointError(f"{part} is {t.dtype} {list(t.shape)}, expected {dtype} {shape} for "
                                  f"{scheme.describe()} with K={k}, N={n}; config and tensors disagree")


def gemv_zeros_width(k: int, group_size: int) -> int:
    """AutoAWQ's ``calculate_zeros_width``: int32 words of zeros per output row (G ∈ {32, 64, ≥128})."""
    m = 1 if group_size >= 128 else {64: 2, 32: 4}[group_size]
    groups = math.ceil(k / group_size)
    base = math.ceil(groups / 8)
    return math.ceil(base / m) * m


class AwqGemmPacker(Packer):
    """AutoAWQ GEMM layout (interleaved nibble order along N)."""

    name = "autoawq-gemm"
    supported_bits = (4,)
    supported_group_sizes = (32, 64, 128, -1)
    supports_act_order = False

    @classmethod
    def check(cls, scheme, in_features, out_features):
        reason = super().check(scheme, in_features, out_features)
        if reason is None and out_features % 8:
            reason = f"{cls.name} needs out_features that are multiples of 8, got {out_features}"
        return reason

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Pack into ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[NG, N/8]``, ``scales`` fp16 ``[NG, N]``.

        Row k of ``qweight`` holds ``Qt[k][n] = codes[n, k]`` eight output columns per word, nibble
        i (bits 4i..4i+3) taking logical column ``8j + AWQ_ORDER[i]``: bits 0-3 column 0, 4-7
        column 2, 8-11 column 4, 12-15 column 6, 16-19 column 1, … 28-31 column 7. So the row
        ``[0,1,2,3,4,5,6,7]`` becomes nibbles ``0,2,4,6,1,3,5,7`` → ``0x75316420`` (the same row
        is ``0x76543210`` in GPTQ/GEMV). ``qzeros`` uses the same interleave with raw zeros (no −1,
        no +8): ``[0,15,7,8,1,2,3,4]`` → nibbles ``0,7,1,3,15,8,2,4`` → ``0x428F3170``.
        """
        reason = self.check(qw.scheme, qw.in_features, qw.out_features)
        if reason:
            raise UnsupportedSchemeError(f"cannot pack {qw.scheme.describe()}: {reason}.")
        order = torch.tensor(AWQ_ORDER)

        def interleave(m: torch.Tensor) -> torch.Tensor:  # [R, N] → columns reordered within each 8
            r, n = m.shape
            return m.reshape(r, n // 8, 8)[:, :, order].reshape(r, n)

        return {
            "qweight": pack_bits(interleave(qw.codes.t()), 4),
            "qzeros": pack_bits(interleave(qw.zeros.t()), 4),
            "scales": qw.scales.t().contiguous().to(torch.float16),
        }

    def unpack(self, tensors, scheme, in_features, out_features) -> QuantizedWeight:
        _missing(tensors)
        k, n = in_features, out_features
        ng = scheme.num_groups(k)
        if n % 8:
            raise CheckpointError(f"out_features {n} is not a multiple of 8")
        _expect(tensors, {"qweight": ([k, n // 8], torch.int32), "qzeros": ([ng, n // 8], torch.int32),
                          "scales": ([ng, n], "float")}, scheme, k, n)
        inv = torch.tensor(AWQ_REVERSE_ORDER)

        def deinterleave(words: torch.Tensor) -> torch.Tensor:
            nib = unpack_bits(words, 4)  # [R, N] in stored (interleaved) order
            r = nib.shape[0]
            return nib.reshape(r, n // 8, 8)[:, :, inv].reshape(r, n)

        return QuantizedWeight(codes=deinterleave(tensors["qweight"]).t().contiguous(),
                               scales=tensors["scales"].t().contiguous().to(torch.float16),
                               zeros=deinterleave(tensors["qzeros"]).t().contiguous(),
                               scheme=scheme, bias=tensors.get("bias"))


class AwqGemvPacker(Packer):
    """AutoAWQ GEMV layout (sequential nibbles along K, zeros and scales padded)."""

    name = "autoawq-gemv"
    supported_bits = (4,)
    supported_group_sizes = (32, 64, 128)
    supports_act_order = False

    @classmethod
    def check(cls, scheme, in_features, out_features):
        reason = super().check(scheme, in_features, out_features)
        if reason is None and in_features % 8:
            reason = f"{cls.name} needs in_features that are multiples of 8, got {in_features}"
        return reason

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Pack into ``qweight`` int32 ``[N, K/8]``, ``qzeros`` int32 ``[N, zw]``, ``scales`` fp16 ``[N, zw·8]``.

        Row n packs ``codes[n, 8j..8j+7]`` sequentially (nibble i = k 8j+i): codes
        ``[1,6,11,0,5,10,15,4, 9,14,3,8,13,2,7,12]`` → ``0x4FA50B61, 0xC72D83E9``. Zeros: nibble i of
        word w is the zero of group 8w+i, padded with 0 to ``zw`` words where
        ``zw = ceil(ceil(ceil(K/G)/8)/m)·m`` with m = 1 (G ≥ 128), 2 (G = 64), 4 (G = 32): K=4096,
        G=128 → 32 groups, zw = 4; K=11008, G=128 → 86 groups, zw = 11 (scales ``[N, 88]``, 2 zero
        columns); zeros ``[2, 9]`` of a K=64, G=32 row → ``[0x00000092, 0, 0, 0]``. ``scales``
        columns ``0..NG-1`` are ``scales[n, g]``, the rest 0.
        """
        reason = self.check(qw.scheme, qw.in_features, qw.out_features)
        if reason:
            raise UnsupportedSchemeError(f"cannot pack {qw.scheme.describe()}: {reason}.")
        n, k = qw.codes.shape
        zw = gemv_zeros_width(k, qw.scheme.group_size)
        ng = qw.num_groups
        zeros = torch.zeros(n, zw * 8, dtype=torch.uint8)
        zeros[:, :ng] = qw.zeros
        scales = torch.zeros(n, zw * 8, dtype=torch.float16)
        scales[:, :ng] = qw.scales
        return {"qweight": pack_bits(qw.codes, 4), "qzeros": pack_bits(zeros, 4), "scales": scales}

    def unpack(self, tensors, scheme, in_features, out_features) -> QuantizedWeight:
        _missing(tensors)
        k, n = in_features, out_features
        ng = scheme.num_groups(k)
        zw = gemv_zeros_width(k, scheme.group_size)
        _expect(tensors, {"qweight": ([n, k // 8], torch.int32), "qzeros": ([n, zw], torch.int32),
                          "scales": ([n, zw * 8], "float")}, scheme, k, n)
        return QuantizedWeight(codes=unpack_bits(tensors["qweight"], 4, k),
                               scales=tensors["scales"][:, :ng].contiguous().to(torch.float16),
                               zeros=unpack_bits(tensors["qzeros"], 4, ng).contiguous(),
                               scheme=scheme, bias=tensors.get("bias"))


def modules_to_not_convert(qmodel: QuantizedModel) -> list[str]:
    """``modules_to_not_convert``: the float linears inside the decoder layers (a MoE router) as their
    path in a layer, and the float modules outside the layers (a vision tower) spelled twice.

    The readers match the entries differently. transformers 5 matches each entry from the model root
    (at a module boundary) or as a suffix of the module path, so a vision tower must be written as
    its whole path (``model.vision_tower``): the bare name matched nothing and transformers 5.23 made
    the tower's linears AWQ layers, then failed on their missing ``weight``. AutoAWQ and vLLM match
    substrings of their own module paths, and vLLM's multimodal models hold the tower at their root
    (``vision_tower.…``), so they need the bare name. A layer-relative path (``mlp.gate``) is a suffix
    and a substring, which every reader matches."""
    adapter = with_adapter(qmodel).adapter
    names = unquantized_block_linears(qmodel)
    outside = adapter.float_modules if adapter is not None else ()
    return names + [m.rpartition(".")[2] for m in outside if "." in m]


def _version_of(qc: dict) -> str:
    return str(first(qc, "version", "format", default="gemm")).lower()


class AutoAWQExporter(HFQuantFormat):
    """AutoAWQ GEMM: 4-bit, group 32/64/128 (or -1), sym or asym; read by AutoAWQ, vLLM,
    transformers + gptqmodel."""

    name = "autoawq"
    description = "AutoAWQ GEMM (vLLM/transformers+gptqmodel/AutoAWQ), 4-bit, interleaved nibbles"
    parts = ("qweight", "qzeros", "scales", "bias")
    layout: ClassVar[str] = AwqGemmPacker.name
    version: ClassVar[str] = "gemm"

    @classmethod
    def check(cls, scheme: QuantScheme, config=None) -> str | None:
        reason = _check_awq(scheme)
        if reason:
            return reason
        packer = cls.packer()
        if scheme.group_size not in packer.supported_group_sizes:
            return (f"AutoAWQ {cls.version.upper()} holds group sizes "
                    f"{', '.join(map(str, packer.supported_group_sizes))}, got {scheme.group_size}")
        return shape_problem(config, lambda n, k: packer.check(scheme, k, n), "AutoAWQ")

    @classmethod
    def detect(cls, path: Path) -> bool:
        qc = quant_config(Path(path))
        if not qc:
            return False
        method = str(first(qc, "quant_method", "method", default="")).lower()
        is_awq = method == "awq" or (not method and "w_bit" in qc and "q_group_size" in qc)
        return is_awq and _version_of(qc) == cls.version

    def quantization_config(self, qmodel: QuantizedModel) -> dict:
        s = qmodel.scheme
        return {
            "quant_method": "awq",
            "zero_point": not s.sym,
            "group_size": s.group_size,
            "bits": s.bits,
            "version": self.version,
            "modules_to_not_convert": modules_to_not_convert(qmodel) or None,
        }

    def parse(self, path, qc, packed):
        version = _version_of(qc)
        packers = {"gemm": AwqGemmPacker.name, "gemv": AwqGemvPacker.name}
        if version not in packers:
            raise CheckpointError(f"{path}: AutoAWQ version {version!r} is not readable by lowbit "
                                  f"(reads gemm, gemv); re-export it with AutoAWQ as gemm.")
        bits = first(qc, "bits", "w_bit", default=4)
        if int(bits) != 4:
            raise CheckpointError(f"{path}: quantization_config says {bits}-bit AWQ; AutoAWQ layouts are 4-bit only.")
        group = first(qc, "group_size", "q_group_size", default=128)
        zero_point = first(qc, "zero_point", default=None)
        if zero_point is None:
            zero_point = not first(qc, "sym", default=False)
        return make_scheme(path, bits, group, not zero_point, False), self.packer(packers[version])()

    def shape_of(self, parts, scheme, packer):
        if "qweight" not in parts or "scales" not in parts:
            raise CheckpointError("qweight or scales missing; the checkpoint is incomplete")
        qweight, scales = parts["qweight"], parts["scales"]
        if qweight.dim() != 2 or scales.dim() != 2:
            raise CheckpointError(f"qweight {list(qweight.shape)} / scales {list(scales.shape)} are not 2-D")
        if packer.name == AwqGemvPacker.name:  # qweight [N, K/8]
            return qweight.shape[1] * 8, qweight.shape[0]
        return qweight.shape[0], scales.shape[1]  # GEMM: qweight [K, N/8], scales [NG, N]

    def inspect(self, path: Path) -> dict:
        qm = self.read(path)
        qc = quant_config(Path(path)) or {}
        version = _version_of(qc)
        s = qm.scheme
        runtimes = {"lowbit": "yes", "AutoAWQ": "yes",
                    "xFT": "no: xFT reads its own config.ini/.bin layout; export with --format xft"}
        if version == "gemm":
            runtimes["transformers+gptqmodel"] = "yes"
            runtimes["vLLM"] = ("yes" if not s.per_channel else
                                "only through awq_marlin (the plain awq kernel sizes tensors K // group_size)")
        else:
            runtimes["transformers+gptqmodel"] = ("on CUDA only: gptqmodel 7.7 has no CPU GEMV kernel "
                                                  "('No valid quant linear'); export autoawq (GEMM) for CPU")
            runtimes["vLLM"] = "no: vLLM ignores version and would read this GEMV checkpoint as GEMM"
        return {"format": "autoawq" if version == "gemm" else "autoawq-gemv", "version": version,
                "pack_order": "interleaved [0,2,4,6,1,3,5,7] along N" if version == "gemm" else "sequential along K",
                "scheme": s.to_dict(), "modules": len(qm.qweights), "runtimes": runtimes}


class AutoAWQGemvExporter(AutoAWQExporter):
    """AutoAWQ GEMV: 4-bit, group 32/64/128; read by AutoAWQ and transformers + gptqmodel (not vLLM)."""

    name = "autoawq-gemv"
    description = "AutoAWQ GEMV (AutoAWQ/transformers+gptqmodel), 4-bit, sequential nibbles, padded zeros"
    layout = AwqGemvPacker.name
    version = "gemv"
