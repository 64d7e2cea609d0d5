"""cpu.ipex_woq: intel-extension-for-pytorch's weight-only-quantized linear (optional).

IPEX's int4 WoQ linear (``ipex.llm.quantization.IPEXWeightOnlyQuantizedLinear``) has AVX-512 /
AMX micro-kernels and is the anchor CPU kernel on Xeon. IPEX is retired at 2.8 and pins torch
2.8, so it is never a dependency: the kernel is chosen only where ``intel_extension_for_pytorch``
imports, and is tested in the opt-in ``tox -e cpu-ipex`` env.

Prepare packs the weight the AutoGPTQ v1 way (the layout IPEX's ``GPTQ_GEMM`` path converts
from; formats.md §2): qweight ``int32 [K/8, N]`` LSB-first along K, qzeros ``int32 [NG, N/8]``
holding ``z - 1`` LSB-first along N, scales ``fp16 [NG, N]``, and g_idx for act-order.
Compute: fp32 activations in fp32, bf16 in bf16, fp16 in fp16 (``WoqLowpMode``); the faster
int8-activation mode (``lowp_mode="int8"``) rounds activations to 8 bits and is opt-in through
``LOWBIT_IPEX_LOWP=int8``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.base import Kernel, KernelSpec
from lowbit.packing import pack_bits
from lowbit.qweight import QuantizedWeight


def ipex_unavailable_reason() -> str | None:
    if importlib.util.find_spec("intel_extension_for_pytorch") is None:
        return ("intel_extension_for_pytorch is not installed (optional; it pins torch 2.8: "
                "use `tox -e cpu-ipex`, or pip install intel-extension-for-pytorch==2.8.* with torch==2.8.*)")
    try:
        import intel_extension_for_pytorch as ipex  # noqa: F401
    except Exception as err:  # IPEX raises on a torch version mismatch
        return f"intel_extension_for_pytorch does not import: {type(err).__name__}: {str(err)[:200]}"
    if not hasattr(ipex, "llm") or not hasattr(ipex.llm, "quantization"):
        return f"intel_extension_for_pytorch {getattr(ipex, '__version__', '?')} has no llm.quantization (needs >= 2.4)"
    return None


def pack_gptq_v1(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight int32 [K/8, N], qzeros int32 [NG, N/8] of z - 1, scales fp16 [NG, N]) for 4-bit:
    GPTQ v1's layout (formats.md §2), through the one bit-packing primitive."""
    qweight = pack_bits(qw.codes, 4).t().contiguous()  # codes packed along K, eight per word
    qzeros = pack_bits((qw.zeros.t().to(torch.int64) - 1) & 0xF, 4)  # v1 stores z - 1, along N
    return qweight, qzeros, qw.scales.t().to(torch.float16).contiguous()


class IpexWoqKernel(Kernel):
    name = "cpu.ipex_woq"
    priority = 40
    device_types = ("cpu",)
    supported_bits = (4,)
    supported_group_sizes = (32, 64, 128, -1)
    description = "intel-extension-for-pytorch weight-only int4 linear (optional, torch 2.8 only)"

    @classmethod
    def probe(cls, device: torch.device) -> str | None:
        return super().probe(device) or ipex_unavailable_reason()

    @classmethod
    def can_implement(cls, spec: KernelSpec) -> str | None:
        reason = super().can_implement(spec)
        if reason is None and (spec.in_features % 8 or spec.out_features % 8):
            reason = f"needs in and out features that are multiples of 8, got {spec.in_features}x{spec.out_features}"
        return reason

    def __init__(self, qweight: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__(qweight, device, dtype)
        import intel_extension_for_pytorch as ipex

        q = ipex.quantization
        lowp = os.environ.get("LOWBIT_IPEX_LOWP", "").strip().lower()
        modes = {"": None, "int8": q.WoqLowpMode.INT8, "bf16": q.WoqLowpMode.BF16, "fp16": q.WoqLowpMode.FP16,
                 "none": q.WoqLowpMode.NONE}
        if lowp not in modes:
            raise LowbitError(f"LOWBIT_IPEX_LOWP={lowp!r} is not known; use one of int8, bf16, fp16, none.")
        mode = modes[lowp] or {torch.bfloat16: q.WoqLowpMode.BF16, torch.float16: q.WoqLowpMode.FP16}.get(
            dtype, q.WoqLowpMode.NONE)
        qconfig = q.get_weight_only_quant_qconfig_mapping(
            weight_dtype=q.WoqWeightDtype.INT4, lowp_mode=mode,
            act_quant_mode=q.WoqActQuantMode.PER_BATCH_IC_BLOCK,
            group_size=qweight.scheme.group_size,  # -1 per channel, as IPEX spells it too
        )
        qweight_i32, qzeros, scales = pack_gptq_v1(qweight)
        g_idx = None if qweight.has_trivial_g_idx() else qweight.g_idx.to(torch.int32)
        bias = None if qweight.bias is None else qweight.bias.to(dtype)
        self.linear = ipex.llm.quantization.IPEXWeightOnlyQuantizedLinear.from_weight(
            qweight_i32, scales, qzeros, self.in_features, self.out_features, qconfig=qconfig, bias=bias,
            group_size=qweight.scheme.group_size, g_idx=g_idx,
            quant_method=ipex.llm.quantization.QuantMethod.GPTQ_GEMM,
            dtype=ipex.llm.quantization.QuantDtype.INT4,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.linear(x.reshape(-1, self.in_features).to(self.dtype))
        return y.to(self.dtype).reshape(*lead, self.out_features)
