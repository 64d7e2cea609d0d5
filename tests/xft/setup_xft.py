"""Prepare the interpreter that runs xFasterTransformer 2.0.0 for ``tox -e xft-runtime``.

xFT 2.0.0 needs torch 2.3 (lowbit needs >= 2.6), so it lives in a venv of its own at DIR, beside the
tox env, with ``constraints/xft.txt`` instead of CI's torch pin. torch 2.3 from PyPI is a CUDA build
(about 3 GB with its nvidia wheels), so nothing is installed on a machine where xFT cannot run: it
refuses CPUs that are not Intel and needs AVX512-FP16 or AMX. There the reason is written to
DIR.skip and the tests skip with it.

Usage: ``python setup_xft.py DIR``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["torch", "xfastertransformer", "numpy"]


def why_not() -> str | None:
    """Why xFT cannot run on this machine, or None."""
    from lowbit.cpuinfo import _cpuinfo_field, cpu_flags, is_x86_64

    if not sys.platform.startswith("linux") or not is_x86_64():
        return f"xFT runs on x86-64 Linux only (this is {sys.platform}, not x86-64)"
    vendor = _cpuinfo_field("vendor_id") or "unknown"
    if vendor != "GenuineIntel":
        return f"xFT refuses CPUs that are not Intel (this one is {vendor})"
    if not {"amx_bf16", "avx512_fp16"} & cpu_flags():
        return "xFT needs AVX512-FP16 or AMX, which this Intel CPU lacks"
    return None


def main(target: str) -> int:
    target_dir = Path(target)
    skip = target_dir.with_suffix(".skip")
    reason = why_not()
    if reason:
        skip.write_text(reason + "\n", encoding="utf-8")
        print(f"xft-runtime: not installing xFT: {reason}")
        return 0
    skip.unlink(missing_ok=True)
    python = target_dir / "bin" / "python"
    if not python.exists():
        shutil.rmtree(target_dir, ignore_errors=True)
        venv.create(target_dir, with_pip=True)
    env = dict(os.environ, PIP_CONSTRAINT=str(ROOT / "constraints" / "xft.txt"))
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
