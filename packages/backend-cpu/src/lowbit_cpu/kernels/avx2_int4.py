"""cpu.avx2_int4: lowbit's own int4 kernel for x86-64 CPUs with AVX2 (Zen, Xeon).

Two paths, picked per call by the number of activation rows M (``tuning.PREFILL_MIN_BATCH``):

- decode (M small): a fused GEMV in C (csrc/int4_avx2.c) that reads the packed nibbles once and
  never materializes the weight. bf16/fp16 activations are rounded to int16 per block of <= 128
  columns and multiplied with ``vpmaddwd`` (relative error <= 2^-16 of the block's max |x|,
  far below the activations' own bf16/fp16 precision); fp32 activations use float FMAs.
- prefill (M large): the weight is dequantized tile by tile (about 8 MiB of rows at a time, at
  most 8 tiles, in C) into one reused float buffer, and each tile goes through one BLAS matmul: bf16 where the CPU
  has AMX (through oneDNN), else fp32 (MKL), since without AMX bf16 matmul is slower than fp32
  (emulated on AVX2, ~0.6x fp32 with AVX512-BF16 alone). Memory: the 4-bit weight plus one tile;
  no float copy of the weight is kept.

Accumulation is fp32 on both paths; the result is cast to the activation dtype once at the end.
"""

from __future__ import annotations

import threading

import torch

from lowbit.kernels.base import Kernel, KernelSpec
from lowbit.qweight import QuantizedWeight

from .. import cpuinfo, native, tuning
from .common import float_bias, group_of, sort_act_order

SMALL_WORK = 1 << 17  # rows x out x in below which the fused path runs on one thread

# One prefill tile buffer per thread, shared by every layer (they run one after another): a fresh
# multi-MiB allocation per call is returned to the OS and page-faulted back in each time, which cost
# as much as dequantizing the tile.
_tiles = threading.local()


def _tile_buffer(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    buf = getattr(_tiles, str(dtype), None)
    if buf is None or buf.numel() < rows * k:
        buf = torch.empty(rows * k, dtype=dtype)
        setattr(_tiles, str(dtype), buf)
    return buf[: rows * k].view(rows, k)


class Avx2Int4Kernel(Kernel):
    name = "cpu.avx2_int4"
    priority = 30
    device_types = ("cpu",)
    supported_bits = (4,)
    supported_group_sizes = (32, 64, 128, -1)
    description = "fused AVX2 int4 GEMV for decode; per-call tile dequant + BLAS matmul (bf16 on AMX) for prefill"

    @classmethod
    def probe(cls, device: torch.device) -> str | None:
        return super().probe(device) or native.unavailable_reason()

    @classmethod
    def can_implement(cls, spec: KernelSpec) -> str | None:
        reason = super().can_implement(spec)
        if reason is None and spec.in_features % 64:
            reason = f"needs in_features to be a multiple of 64, got {spec.in_features}"
        return reason

    def __init__(self, qweight: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__(qweight, device, dtype)
        codes, self.perm = sort_act_order(qweight)
        self.group = group_of(qweight)
        k = self.in_features
        # activation rounding block (one int16 scale each): the group, or 128/64 columns per channel
        self.block = self.group if self.group <= 128 else (128 if k % 128 == 0 else 64)
        self.packed = native.pack_nibbles(codes)
        self.scales = qweight.scales.float().contiguous()
        self.zs = (qweight.zeros.float() * self.scales).contiguous()
        self.bias = float_bias(qweight)
        native_bf16 = cpuinfo.has_fast_bf16_matmul()
        self.prefill_dtype = torch.bfloat16 if native_bf16 and dtype == torch.bfloat16 else torch.float32
        self.prefill_min_batch = tuning.prefill_min_batch(native_bf16, dtype)
        self.tile_rows = tuning.tile_rows(self.out_features, k)
        self.lookup_dequant = False  # bf16 tiles by table lookup (AVX-512, cpu.vnni_int4 only)
        native.library()  # build once now, not on the first forward
        self._local = threading.local()  # per-thread scratch of the decode path, reused across calls

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle: the per-thread scratch is not state
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _scratch(self, m: int) -> torch.Tensor:
        need = native.scratch_bytes_i16(m, self.in_features, self.group, self.block)
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
        # one thread for small products: a parallel region costs a few microseconds
        threads = 1 if m * self.out_features * self.in_features < SMALL_WORK else torch.get_num_threads()
        if m < self.prefill_min_batch:
            if x2.dtype != self.dtype:
                x2 = x2.to(self.dtype)
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            if self.dtype != torch.float32:
                y = native.linear_i16(x2, self.packed, self.scales, self.zs, self.bias, self.group, self.block,
                                      threads, self.dtype, self._scratch(m))
            else:
                y = native.linear_f32(x2, self.packed, self.scales, self.zs, self.bias, self.group, threads)
            return y if x.dim() == 2 else y.reshape(*lead, self.out_features)
        y = self._prefill(x2, torch.get_num_threads())
        if self.bias is not None:
            y = y.float() + self.bias
        return y.to(self.dtype).reshape(*lead, self.out_features)

    def _prefill(self, x2: torch.Tensor, threads: int) -> torch.Tensor:
        """``[M, N]`` in the tile dtype: each tile dequantized straight into the matmul's dtype (bf16 on
        AMX: one pass, half the bytes) in a shared buffer, then one BLAS matmul per tile."""
        n, k = self.out_features, self.in_features
        xc = x2.to(self.prefill_dtype).contiguous()
        buf = _tile_buffer(min(self.tile_rows, n), k, self.prefill_dtype)
        if n <= self.tile_rows:  # one tile: x @ w^T straight into [M, N]
            w = native.dequant_rows(self.packed, self.scales, self.zs, buf, 0, n, self.group, threads,
                                    self.lookup_dequant)
            return torch.mm(xc, w.t())
        yt = torch.empty(n, xc.shape[0], dtype=self.prefill_dtype)
        for n0 in range(0, n, self.tile_rows):
            n1 = min(n, n0 + self.tile_rows)
            w = native.dequant_rows(self.packed, self.scales, self.zs, buf[: n1 - n0], n0, n1, self.group, threads,
                                    self.lookup_dequant)
            torch.mm(w, xc.t(), out=yt[n0:n1])
        return yt.t().contiguous()
