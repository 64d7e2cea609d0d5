"""Why the Triton kernels cannot run on a device (None when they can). Cheap; never on the hot path."""

from __future__ import annotations

import importlib.util

import torch

MIN_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores and the tl.dot shapes the configs use


def probe_cuda(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"runs on cuda, not {device.type}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed; pip install triton"
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"no CUDA device: this torch ({torch.__version__}) is a CPU-only build"
        return "no CUDA device: torch.cuda.is_available() is False"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        return f"no CUDA device {index}: {torch.cuda.device_count()} visible"
    cap = torch.cuda.get_device_capability(index)
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        return (
            f"needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ampere or newer), "
            f"{name} has {cap[0]}.{cap[1]}"
        )
    return None
