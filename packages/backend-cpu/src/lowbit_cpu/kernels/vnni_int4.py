"""cpu.vnni_int4: int4 weights x int8 activations on AVX-512 VNNI (Xeon since Cascade Lake, Zen 4+).

Decode (fewer than ``tuning.PREFILL_MIN_BATCH`` rows): bf16 activations are quantized on the fly to
int8, one symmetric scale per row and run of 64 columns (``max|x| / 127``), and multiplied with the
4-bit codes by VPDPBUSD (csrc/int4_vnni.c): 64 products per instruction, against 16 for the AVX2
kernel's ``vpmaddwd`` on int16 activations. The weight layout is the AVX2 kernel's ("nib64"), so
prefill is unchanged: tile dequantization and one bf16 matmul per tile (oneDNN on AMX where present).

Error: int8 rounding adds at most ``max|x| / 254`` per element of a 64-column run; for runs of
Gaussian-like activations (max|x| ~ 2.5 sigma) the relative RMS error of each element is about
2.5 / (127 * sqrt(12)) ~ 0.6 %, and the output's relative error is of the same order: about three
times the bf16 rounding of the activations themselves (2^-9 / sqrt(3) ~ 0.1 % ... 0.2 %). That is why
this kernel takes bf16 activations only (fp16/fp32 callers ask for more precision and get
``cpu.avx2_int4``), and why its conformance tolerance is the bf16 one (1.6e-2); llama.cpp's CPU
path quantizes activations the same way (8 bits per block of 32).
"""

from __future__ import annotations

import torch

from lowbit.kernels.base import KernelSpec

from .. import native
from .avx2_int4 import SMALL_WORK, Avx2Int4Kernel


class VnniInt4Kernel(Avx2Int4Kernel):
    name = "cpu.vnni_int4"
    priority = 35
    supported_group_sizes = (64, 128, -1)
    supported_dtypes = (torch.bfloat16,)
    description = ("AVX-512 VNNI int4 x int8-activation GEMV for decode (bf16 activations); "
                   "tile dequant + BLAS matmul (bf16 on AMX) for prefill")

    @classmethod
    def probe(cls, device: torch.device) -> str | None:
        return super().probe(device) or native.vnni_unavailable_reason()

    @classmethod
    def can_implement(cls, spec: KernelSpec) -> str | None:
        reason = super().can_implement(spec)
        if reason is not None and "group sizes" in reason:
            reason += " (activations are quantized per 64 columns, so groups must hold whole runs of 64)"
        return reason

    def __init__(self, qweight, device: torch.device, dtype: torch.dtype):
        super().__init__(qweight, device, dtype)
        native.vnni_library()  # build once now, not on the first forward
        self.lookup_dequant = True

    def _scratch(self, m: int) -> torch.Tensor:
        need = native.vnni_scratch_bytes(m, self.in_features, self.group)
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < need:
            buf = self._local.buf = torch.empty(need, dtype=torch.uint8)
        return buf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        m = x2.shape[0]
        if m >= self.prefill_min_batch:
            y = self._prefill(x2, torch.get_num_threads())
            if self.bias is not None:
                y = y.float() + self.bias
            return y.to(self.dtype).reshape(*lead, self.out_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        threads = 1 if m * self.out_features * self.in_features < SMALL_WORK else torch.get_num_threads()
        y = native.linear_vnni(x2, self.packed, self.scales, self.zs, self.bias, self.group, threads, self.dtype,
                               self._scratch(m))
        return y if x.dim() == 2 else y.reshape(*lead, self.out_features)
