"""The native kernels in ``csrc/``: compiled on first use, loaded with ctypes.

``int4_avx2.c`` (AVX2/FMA/F16C: the fused GEMV and the prefill tile dequantization) and
``int4_vnni.c`` (AVX-512 VNNI: int8-activation GEMV) are separate shared objects, each built with
its own ISA flags, so the AVX2 one never contains AVX-512 instructions; the VNNI one is built and
loaded only where the CPU reports the instructions it uses (picked at run time, not at install).

The C file needs no Python or torch headers, so it builds in about a second with any gcc or
clang (``$CC``, else ``cc``/``gcc``/``clang`` on PATH). The shared object is cached under
lowbit's cache (``$LOWBIT_CACHE``, default ``~/.cache/lowbit``; a private temporary directory when
``LOWBIT_CACHE=off``), named by the hash of source and flags, and
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
VNNI_SOURCE = Path(__file__).parent / "csrc" / "int4_vnni.c"
VNNI_CFLAGS = [*CFLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
ENGINE_SOURCE = Path(__file__).parent / "csrc" / "engine.c"
# the decoder's AVX-512 build also holds its AMX prompt path (int8 matrices, bf16 attention) (run only where amx_unavailable_reason is None)
ENGINE_VNNI_CFLAGS = [*VNNI_CFLAGS, "-mamx-tile", "-mamx-int8", "-mamx-bf16"]
# /proc/cpuinfo flags of the AMX-INT8 tiles
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
# /proc/cpuinfo flags the VNNI kernel's instructions need
VNNI_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "lowbit_int4_linear_f32": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _P, ctypes.c_int],
    "lowbit_int4_dequant": [_P, _P, _P, _P, _I, _I, _I, _I, ctypes.c_int],
    "lowbit_int4_dequant_bf16": [_P, _P, _P, _P, _I, _I, _I, _I, ctypes.c_int],
    "lowbit_quant_x_i16": [_P, ctypes.c_int, _P, _P, _P, _I, _I, _I, _I],
    "lowbit_int4_linear_i16": [_P, ctypes.c_int, _P, ctypes.c_int, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P,
                               ctypes.c_int],
}
_VNNI_SIGNATURES = {
    "lowbit_vnni_quant_x": [_P, ctypes.c_int, _P, _P, _P, _I, _I, _I, ctypes.c_int],
    "lowbit_int8_linear_vnni": [_P, ctypes.c_int, _P, ctypes.c_int, _P, _P, _P, _P, _I, _I, _I, _I, _P, ctypes.c_int],
    "lowbit_int4_linear_vnni": [_P, ctypes.c_int, _P, ctypes.c_int, _P, _P, _P, _P, _I, _I, _I, _I, _P, ctypes.c_int],
    "lowbit_int4_dequant_bf16_vnni": [_P, _P, _P, _P, _I, _I, _I, _I, ctypes.c_int],
}


def cache_dir() -> Path:
    """Where the shared objects are kept: lowbit's one cache (:func:`lowbit.loading.cache_root`)."""
    from lowbit.loading import cache_root

    root = cache_root()
    return root if root is not None else Path(tempfile.gettempdir()) / f"lowbit-native-{os.getuid()}"


def compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _library_path(source: Path = SOURCE, cflags: list[str] = CFLAGS) -> Path:
    digest = hashlib.sha256(source.read_bytes() + " ".join(cflags).encode()).hexdigest()[:16]
    return cache_dir() / f"lowbit_{source.stem}-{digest}.so"


def unavailable_reason() -> str | None:
    """None when the AVX2 kernels can be built (or are cached) and run here, else why not."""
    if not cpuinfo.is_x86_64():
        return "needs an x86-64 CPU"
    if not cpuinfo.has_avx2_fma():
        return f"needs AVX2, FMA and F16C; this CPU is {cpuinfo.describe()}"
    if not _library_path().exists() and compiler() is None:
        return "needs a C compiler to build its AVX2 kernels once (install gcc, or set CC)"
    return None


def _missing(flags: tuple[str, ...], what: str) -> str | None:
    """Why ``what`` cannot run here when this CPU lacks some of ``flags``, else None."""
    missing = [f for f in flags if f not in cpuinfo.cpu_flags()]
    return f"needs {what} ({', '.join(missing)} missing); this CPU is {cpuinfo.describe()}" if missing else None


def vnni_unavailable_reason() -> str | None:
    """None when the AVX-512 VNNI kernel can be built (or is cached) and run here, else why not."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    missing = _missing(VNNI_FLAGS, "AVX-512 VNNI")
    if missing:
        return missing
    if not _library_path(VNNI_SOURCE, VNNI_CFLAGS).exists() and compiler() is None:
        return "needs a C compiler to build its AVX-512 VNNI kernel once (install gcc, or set CC)"
    return None


def build(source: Path, cflags: list[str], out: Path) -> None:
    """Compile ``source`` into the shared object ``out``, atomically (a temporary file, then a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cc = compiler()
    if cc is None:
        raise MissingDependencyError(f"building {source.name} needs a C compiler (install gcc, or set CC).")
    cmd = [cc, *cflags, "-o", tmp, str(source)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise MissingDependencyError(
                f"building {source.name} failed ({' '.join(cmd)}): {proc.stderr.strip()[:500]}; "
                "set CC to a working gcc/clang or disable the kernel with LOWBIT_DISABLED_KERNELS."
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(source: Path, cflags: list[str], signatures: dict) -> ctypes.CDLL:
    path = _library_path(source, cflags)
    if not path.exists():
        build(source, cflags, path)
    torch.empty(0)  # torch (and its libgomp.so.1) is loaded before the library resolves its OpenMP symbols
    lib = ctypes.CDLL(str(path))
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    return lib


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """Build (once, cached on disk) and load the AVX2 kernels."""
    reason = unavailable_reason()
    if reason is not None:
        raise MissingDependencyError(f"lowbit-backend-cpu native kernels: {reason}.")
    return _load(SOURCE, CFLAGS, _SIGNATURES)


@functools.lru_cache(maxsize=1)
def vnni_library() -> ctypes.CDLL:
    """Build (once, cached on disk) and load the AVX-512 VNNI kernel; only where the CPU has it."""
    reason = vnni_unavailable_reason()
    if reason is not None:
        raise MissingDependencyError(f"lowbit-backend-cpu VNNI kernel: {reason}.")
    return _load(VNNI_SOURCE, VNNI_CFLAGS, _VNNI_SIGNATURES)


@functools.lru_cache(maxsize=2)
def engine_library(vnni: bool) -> ctypes.CDLL:
    """Build (once, cached on disk) and load the native decoder (``csrc/engine.c``): the AVX-512 VNNI build
    where ``vnni`` (the caller checks the CPU), else the AVX2 one, which holds no AVX-512 instruction."""
    reason = vnni_unavailable_reason() if vnni else unavailable_reason()
    if reason is not None:
        raise MissingDependencyError(f"lowbit-backend-cpu native decoder: {reason}.")
    if vnni:
        try:
            lib = _load(ENGINE_SOURCE, ENGINE_VNNI_CFLAGS, {})
        except MissingDependencyError:  # a compiler without AMX intrinsics: the VNNI build without the AMX path
            lib = _load(ENGINE_SOURCE, VNNI_CFLAGS, {})
    else:
        lib = _load(ENGINE_SOURCE, CFLAGS, {})
    lib.lowbit_engine_scratch_bytes.argtypes = [_P, _I, ctypes.c_int]
    lib.lowbit_engine_scratch_bytes.restype = _I
    lib.lowbit_engine_forward.argtypes = [_P, _P, _I, _I, _I, _P, ctypes.c_int, ctypes.c_int, _P]
    lib.lowbit_engine_forward.restype = ctypes.c_int
    lib.lowbit_engine_forward_rows.argtypes = [_P, _P, _I, _P, _P, _P, ctypes.c_int, _P]
    lib.lowbit_engine_forward_rows.restype = ctypes.c_int
    lib.lowbit_engine_isa.argtypes = []
    lib.lowbit_engine_isa.restype = ctypes.c_int
    lib.lowbit_engine_amx_init.argtypes = []
    lib.lowbit_engine_amx_init.restype = ctypes.c_int
    lib.lowbit_engine_amx_built.argtypes = []
    lib.lowbit_engine_amx_built.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def amx_unavailable_reason() -> str | None:
    """None when the native decoder's AMX prompt path runs here: AVX-512 VNNI, the AMX-TILE, AMX-INT8 and AMX-BF16
    flags, and Linux granting this process the tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``, asked once)."""
    reason = vnni_unavailable_reason()
    if reason is not None:
        return reason
    missing = _missing(AMX_FLAGS, "AMX-INT8 and AMX-BF16")
    if missing:
        return missing
    if not engine_library(True).lowbit_engine_amx_built():
        return f"the native decoder was built without AMX ({compiler()} lacks -mamx-tile/-mamx-int8/-mamx-bf16)"
    if not engine_library(True).lowbit_engine_amx_init():
        return "Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM; kernel older than 5.16?)"
    return None


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


def dequant_rows(packed, scales, zs, out: torch.Tensor, n0: int, n1: int, group: int, threads: int,
                 lookup: bool = False) -> torch.Tensor:
    """Rows ``n0:n1`` of the weight into ``out`` (contiguous ``[n1 - n0, K]``, float32 or bfloat16);
    ``lookup``: bf16 through the AVX-512 table lookup of the VNNI library (same values, faster)."""
    k = packed.shape[1] * 2
    if out.dtype == torch.bfloat16:
        fn = vnni_library().lowbit_int4_dequant_bf16_vnni if lookup else library().lowbit_int4_dequant_bf16
    else:
        fn = library().lowbit_int4_dequant
    fn(packed.data_ptr(), scales.data_ptr(), zs.data_ptr(), out.data_ptr(), n0, n1, k,
                                  group, threads)
    return out


def vnni_scratch_bytes(m: int, k: int, group: int) -> int:
    return m * k + m * (k // 64 + k // group) * 4


def linear_vnni(x: torch.Tensor, packed, scales, zs, bias: torch.Tensor | None, group: int, threads: int,
                out_dtype: torch.dtype, scratch: torch.Tensor | None = None, bits: int = 4) -> torch.Tensor:
    """``x`` contiguous ``[M, K]`` (fp32/bf16/fp16) → ``[M, N]`` in ``out_dtype``, bias added, in one native
    call: x rounded to int8 per run of 64 columns (scale max|x|/127), VPDPBUSD int32 dot products with
    the int4 codes (``packed``, nib64 layout) or, with ``bits=8``, the uint8 codes ``[N, K]``; fp32
    accumulation. ``scratch``: uint8, at least ``vnni_scratch_bytes(M, K, group)``."""
    m, k = x.shape
    n = packed.shape[0]
    if scratch is None:
        scratch = torch.empty(vnni_scratch_bytes(m, k, group), dtype=torch.uint8)
    y = torch.empty(m, n, dtype=out_dtype)
    lib = vnni_library()
    fn = lib.lowbit_int8_linear_vnni if bits == 8 else lib.lowbit_int4_linear_vnni
    fn(
        x.data_ptr(), DTYPE_CODES[x.dtype], y.data_ptr(), DTYPE_CODES[out_dtype],
        None if bias is None else bias.data_ptr(), packed.data_ptr(), scales.data_ptr(), zs.data_ptr(),
        m, n, k, group, scratch.data_ptr(), threads)
    return y


def quant_x_vnni(x: torch.Tensor, group: int, natural: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The VNNI kernels' activation quantization alone (for tests): ``(x8 [M, K] int8 in the int4 kernel's
    permuted order, or column order with ``natural``, run scales [M, K/64], group sums [M, K/group])``."""
    m, k = x.shape
    x8 = torch.empty(m, k, dtype=torch.int8)
    xs = torch.empty(m, k // 64, dtype=torch.float32)
    xsum = torch.empty(m, k // group, dtype=torch.float32)
    vnni_library().lowbit_vnni_quant_x(x.data_ptr(), DTYPE_CODES[x.dtype], x8.data_ptr(), xs.data_ptr(),
                                       xsum.data_ptr(), m, k, group, int(natural))
    return x8, xs, xsum
