"""Plausible sizes, checked before anything is allocated.

A config.json is a few numbers that decide every allocation that follows: a damaged or hostile one
(``hidden_size`` 10^9) would make the first allocation terabytes, which ends in a traceback or the
kernel's OOM killer, long after the start. So a config is checked first: its model is built on the
meta device (no memory), each parameter's shape is compared with the tensor stored under the same
name on disk, and the bytes the command is about to allocate are compared with the memory this
process can still get (:func:`available_memory`). Each check raises one line naming the numbers.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import LowbitError, one_line

#: config fields that count decoder layers (the model's own modules are built per layer, even on meta)
LAYER_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    out[key] = int(fields[0]) * 1024
    except OSError:
        pass
    return out


def _cgroup_room() -> int | None:
    """What the cgroup (v2) this process runs in still allows, or None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def _address_space_room() -> int | None:
    """What RLIMIT_AS still allows this process to map, or None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        used = 0
    return max(0, soft - used)


def available_memory() -> int | None:
    """Bytes this process can still allocate: the system's available memory and free swap, capped by
    a cgroup limit and by an address-space limit; None where none of them is known (not Linux)."""
    info = _meminfo()
    rooms = [r for r in (_cgroup_room(), _address_space_room()) if r is not None]
    if "MemAvailable" in info:
        rooms.append(info["MemAvailable"] + info.get("SwapFree", 0))
    return min(rooms) if rooms else None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def check_fits(nbytes: int, what: str, fix: str, error: type[LowbitError] = LowbitError) -> None:
    """Raise ``error`` when ``nbytes`` (what ``what`` needs at least) exceed :func:`available_memory`."""
    room = available_memory()
    if room is not None and nbytes > room:
        raise error(f"{what} needs at least {_gib(nbytes)} of memory, and {_gib(room)} is available here. {fix}")


def _layer_count(config) -> int | None:
    counts = [getattr(config, k) for k in LAYER_FIELDS if isinstance(getattr(config, k, None), int)]
    sub = getattr(config, "text_config", None)
    if sub is not None and sub is not config:
        counts += [c for c in [_layer_count(sub)] if c is not None]
    return max(counts) if counts else None


def meta_model(config, trust_remote_code: bool = False, error: type[LowbitError] = LowbitError,
               where: str = "the model", tensors_on_disk: int | None = None):
    """The causal LM ``config`` describes, every tensor on the meta device (no memory), after checking
    that its layer count is plausible: at most ``tensors_on_disk`` (each layer stores at least one
    tensor), else at most 10,000 (building millions of empty modules would exhaust memory too)."""
    from transformers import AutoModelForCausalLM

    layers = _layer_count(config)
    bound = tensors_on_disk if tensors_on_disk is not None else 10_000
    if layers is not None and not 0 <= layers <= bound:
        on_disk = f"its files hold {tensors_on_disk} tensors" if tensors_on_disk is not None else "the most lowbit builds is 10,000"
        raise error(f"the config of {where} declares {layers:,} decoder layers but {on_disk}; config.json is "
                    "damaged or belongs to another model. Restore the model's own config.json.")
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 — a config transformers cannot build, whatever it raises
        raise error(f"the config of {where} does not describe a model transformers can build: {one_line(err)}. "
                    "Restore the model's own config.json.") from err


def check_shapes(model: torch.nn.Module, shapes: Mapping[str, list[int]], where: str,
                 error: type[LowbitError] = LowbitError) -> None:
    """Every parameter of the (meta) ``model`` that ``shapes`` (name → shape stored on disk) also
    names must have that shape: a config that disagrees with its own weights is refused here, before
    a tensor of the config's size is allocated."""
    for name, p in model.named_parameters():
        disk = shapes.get(name)
        if disk is not None and list(disk) != list(p.shape):
            raise error(f"the config of {where} implies {name} of shape {list(p.shape)} but its files store "
                        f"{list(disk)}; config.json and the weights disagree. Restore the model's own config.json.")


def parameter_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(bytes of every parameter, bytes of the largest one) of ``model`` in ``dtype`` (default: as built)."""
    total = largest = 0
    for p in model.parameters():
        n = p.numel() * (dtype or p.dtype).itemsize
        total += n
        largest = max(largest, n)
    return total, largest


def check_activation_memory(config, ids: torch.Tensor) -> None:
    """Refuse calibration whose activations cannot fit: the layer-by-layer pass holds a layer's inputs
    and outputs for every sample at once, ``2 × samples × tokens × hidden`` float32 values."""
    from .errors import CalibrationError

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    if not isinstance(hidden, int) or ids.dim() != 2:
        return
    n, seqlen = ids.shape
    check_fits(2 * n * seqlen * hidden * 4, f"calibration on {n} samples × {seqlen} tokens (hidden size {hidden}: a "
               "layer's inputs and outputs in float32)", "Pass a smaller --nsamples or --seqlen.", CalibrationError)
