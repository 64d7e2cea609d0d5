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

import threading

import torch

from lowbit.kernels.base import Kernel, KernelSpec

from .. import cpuinfo, native, tuning
from .avx2_int4 import SMALL_WORK, Avx2Int4Kernel
from .common import float_bias, group_of, sort_act_order


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


class VnniInt8Kernel(Kernel):
    """cpu.vnni_int8: 8-bit weights x int8 activations on AVX-512 VNNI (decode), for 8-bit checkpoints and
    an lm_head quantized to int8 at load time (``lowbit.run.nn.quantize_lm_head``).

    Same activation rounding, tolerance argument and bf16-only rule as :class:`VnniInt4Kernel`; the weight
    is the uint8 codes as they are (1 byte per weight), one 512-bit VPDPBUSD per 64 columns. From
    ``PREFILL_MIN_BATCH`` rows on, row blocks of the weight are dequantized to bf16 in torch and run by
    one matmul each (oneDNN, AMX where present).
    """

    name = "cpu.vnni_int8"
    priority = 35
    device_types = ("cpu",)
    supported_bits = (8,)
    supported_group_sizes = (64, 128, -1)
    supported_dtypes = (torch.bfloat16,)
    description = "AVX-512 VNNI 8-bit x int8-activation GEMV for decode (bf16 activations); bf16 matmul for prefill"
    PREFILL_ROWS = 4096  # weight rows dequantized per prefill block

    @classmethod
    def probe(cls, device: torch.device) -> str | None:
        return super().probe(device) or native.vnni_unavailable_reason()

    @classmethod
    def can_implement(cls, spec: KernelSpec) -> str | None:
        reason = super().can_implement(spec)
        if reason is not None and "group sizes" in reason:
            reason += " (activations are quantized per 64 columns, so groups must hold whole runs of 64)"
        if reason is None and spec.in_features % 64:
            reason = f"needs in_features to be a multiple of 64, got {spec.in_features}"
        return reason

    def __init__(self, qweight, device: torch.device, dtype: torch.dtype):
        super().__init__(qweight, device, dtype)
        self.codes, self.perm = sort_act_order(qweight)
        self.group = group_of(qweight)
        self.scales = qweight.scales.float().contiguous()
        self.zs = (qweight.zeros.float() * self.scales).contiguous()
        self.bias = float_bias(qweight)
        self.prefill_min_batch = tuning.prefill_min_batch(cpuinfo.has_fast_bf16_matmul(), dtype)
        native.vnni_library()
        self._local = threading.local()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

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
            y = self._prefill(x2.to(self.dtype).contiguous())
        else:
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            threads = 1 if m * self.out_features * self.in_features < SMALL_WORK else torch.get_num_threads()
            y = native.linear_vnni(x2, self.codes, self.scales, self.zs, self.bias, self.group, threads, self.dtype,
                                   self._scratch(m), bits=8)
        return y.reshape(*lead, self.out_features)

    def _prefill(self, x2: torch.Tensor) -> torch.Tensor:
        n, gs = self.out_features, self.group
        y = torch.empty(x2.shape[0], n, dtype=self.dtype)
        for n0 in range(0, n, self.PREFILL_ROWS):
            n1 = min(n, n0 + self.PREFILL_ROWS)
            s = self.scales[n0:n1].repeat_interleave(gs, dim=1)
            zs = self.zs[n0:n1].repeat_interleave(gs, dim=1)
            w = (self.codes[n0:n1].float() * s - zs).to(self.dtype)
            y[:, n0:n1] = torch.mm(x2, w.t())
        if self.bias is not None:
            y = (y.float() + self.bias).to(self.dtype)
        return y
