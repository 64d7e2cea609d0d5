"""The native AVX2 kernels in ``csrc/int4_avx2.c``: compiled on first use, loaded with ctypes.

The C file needs no Python or torch headers, so it builds in about a second with any gcc or
clang (``$CC``, else ``cc``/``gcc``/``clang`` on PATH). The shared object is cached under
``$LOWBIT_CACHE_DIR`` (default ``~/.cache/lowbit``), named by the hash of source and flags, and
written atomically so concurrent processes can build it at once. OpenMP comes from the process's
already-loaded ``libgomp.so.1`` (torch's), so the kernels share torch's thread runtime.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from lowbit.errors import MissingDependencyError

from . import cpuinfo

SOURCE = Path(__file__).parent / "csrc" / "int4_avx2.c"
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "lowbit_int4_linear_f32": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _P, ctypes.c_int],
    "lowbit_int4_dequant": [_P, _P, _P, _P, _I, _I, _I, _I, ctypes.c_int],
    "lowbit_quant_x_i16": [_P, ctypes.c_int, _P, _P, _P, _I, _I, _I, _I],
    "lowbit_int4_linear_i16": [_P, ctypes.c_int, _P, ctypes.c_int, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P,
                               ctypes.c_int],
}


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE_DIR") or Path.home() / ".cache" / "lowbit")


def compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    return cache_dir() / f"lowbit_int4_avx2-{digest}.so"


def unavailable_reason() -> str | None:
    """None when the native kernels can be built (or are cached) and run here, else why not."""
    if not cpuinfo.is_x86_64():
        return "needs an x86-64 CPU"
    if not cpuinfo.has_avx2_fma():
        return f"needs AVX2, FMA and F16C; this CPU is {cpuinfo.describe()}"
    if not _library_path().exists() and compiler() is None:
        return "needs a C compiler to build its AVX2 kernels once (install gcc, or set CC)"
    return None


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """Build (once, cached on disk) and load the kernels."""
    reason = unavailable_reason()
    if reason is not None:
        raise MissingDependencyError(f"lowbit-backend-cpu native kernels: {reason}.")
    path = _library_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        cmd = [compiler(), *CFLAGS, "-o", tmp, str(SOURCE)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise MissingDependencyError(
                    f"building the AVX2 kernels failed ({' '.join(cmd)}): {proc.stderr.strip()[:500]}; "
                    "set CC to a working gcc/clang or disable the kernel with LOWBIT_DISABLED_KERNELS=cpu.avx2_int4."
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    torch.empty(0)  # torch (and its libgomp.so.1) is loaded before the library resolves its OpenMP symbols
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    return lib


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K]`` codes (0..15, K % 64 == 0) → ``uint8 [N, K/2]`` in the kernels' "nib64" layout.

    Each run of 64 columns becomes 32 bytes read as 16 little-endian uint16 lanes; lane j holds
    columns j, 16+j, 32+j, 48+j of the run in bits 0-3, 4-7, 8-11, 12-15. So byte 2j is
    ``c[j] | c[16+j] << 4`` and byte 2j+1 is ``c[32+j] | c[48+j] << 4``: a run with c[k] = k % 16
    packs to 0x00, 0x00, 0x11, 0x11, ..., 0xFF, 0xFF.
    """
    n, k = codes.shape
    c = codes.reshape(n, k // 64, 4, 16)
    lo = c[:, :, 0] | (c[:, :, 1] << 4)
    hi = c[:, :, 2] | (c[:, :, 3] << 4)
    return torch.stack([lo, hi], dim=-1).contiguous().reshape(n, k // 2)


def linear_f32(x: torch.Tensor, packed, scales, zs, bias: torch.Tensor | None, group: int,
               threads: int) -> torch.Tensor:
    """``x`` float32 contiguous ``[M, K]`` → float32 ``[M, N]`` with bias, float FMAs throughout."""
    m, k = x.shape
    n = packed.shape[0]
    scratch = torch.empty(m * (k // group), dtype=torch.float32)
    y = torch.empty(m, n, dtype=torch.float32)
    library().lowbit_int4_linear_f32(x.data_ptr(), y.data_ptr(), None if bias is None else bias.data_ptr(),
                                     packed.data_ptr(), scales.data_ptr(), zs.data_ptr(), m, n, k, group,
                                     scratch.data_ptr(), threads)
    return y


DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def linear_i16(x: torch.Tensor, packed, scales, zs, bias: torch.Tensor | None, group: int, block: int,
               threads: int, out_dtype: torch.dtype, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` contiguous ``[M, K]`` (fp32/bf16/fp16) → ``[M, N]`` in ``out_dtype``, bias added, in one
    native call: x rounded to int16 per block of ``block`` columns, int32 dot products, fp32
    accumulation, one rounding to ``out_dtype`` at the end. ``scratch``: a uint8 buffer of at
    least ``scratch_bytes_i16(M, K, group, block)`` bytes (allocated when None)."""
    m, k = x.shape
    n = packed.shape[0]
    if scratch is None:
        scratch = torch.empty(scratch_bytes_i16(m, k, group, block), dtype=torch.uint8)
    y = torch.empty(m, n, dtype=out_dtype)
    library().lowbit_int4_linear_i16(
        x.data_ptr(), DTYPE_CODES[x.dtype], y.data_ptr(), DTYPE_CODES[out_dtype],
        None if bias is None else bias.data_ptr(), packed.data_ptr(), scales.data_ptr(), zs.data_ptr(),
        m, n, k, group, block, scratch.data_ptr(), threads)
    return y


def scratch_bytes_i16(m: int, k: int, group: int, block: int) -> int:
    return m * k * 2 + m * (k // block + k // group) * 4


def dequant_rows(packed, scales, zs, out: torch.Tensor, n0: int, n1: int, group: int, threads: int) -> torch.Tensor:
    """Rows ``n0:n1`` of the float32 weight into ``out`` (contiguous ``[n1 - n0, K]``)."""
    k = packed.shape[1] * 2
    library().lowbit_int4_dequant(packed.data_ptr(), scales.data_ptr(), zs.data_ptr(), out.data_ptr(), n0, n1, k,
                                  group, threads)
    return out
