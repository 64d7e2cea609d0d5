"""Launch configurations of the Triton kernels, kept as data per GPU.

``CONFIGS[device_name][kernel]`` is a list of ``(max_batch, config)`` rows in increasing
``max_batch`` (``None`` = any larger batch); the launcher takes the first row whose ``max_batch``
is at least the call's batch (rows of flattened activations, ``M``). ``device_name`` is
``torch.cuda.get_device_name()``; a GPU with no entry uses ``"default"``. Add a GPU by running
``benchmarks/cuda/bench_triton.py --tune`` on it and pasting the printed entry here.

Config keys: ``BLOCK_M/BLOCK_N/BLOCK_K`` tile sizes (powers of two; the launcher clamps
``BLOCK_K`` to the group size so a K tile never straddles two groups), ``SPLIT_K`` (programs
sharing one output tile's K range, reduced by fp32 atomics; ``0`` = pick from the SM count so the
grid covers about two waves), ``GROUP_M`` (GEMM: row-blocks per L2-friendly launch group),
``num_warps``, ``num_stages``.

The ``default`` rows are starting points reasoned from the shapes (decode is memory bound: narrow N
tiles and split K to fill the SMs; prefill is compute bound: 64-128 wide tiles on tensor cores);
they have not been tuned on a GPU yet (none was lent when they were written).
"""

from __future__ import annotations

GEMV_MAX_BATCH = 16  # batches up to this go to the split-K GEMV kernel, larger ones to the GEMM

CONFIGS: dict[str, dict[str, list[tuple[int | None, dict]]]] = {
    "default": {
        "gemv": [
            (1, dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=0, num_warps=4, num_stages=2)),
            (16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=0, num_warps=4, num_stages=3)),
        ],
        "gemm": [
            (64, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8, num_warps=4, num_stages=4)),
            (None, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8, num_warps=8, num_stages=3)),
        ],
    },
}


def lookup(kernel: str, batch: int, device_name: str = "default") -> dict:
    """The config row for ``kernel`` (``"gemv"`` or ``"gemm"``) at ``batch`` rows on ``device_name``."""
    table = CONFIGS.get(device_name, CONFIGS["default"])
    rows = table.get(kernel) or CONFIGS["default"][kernel]
    for max_batch, config in rows:
        if max_batch is None or batch <= max_batch:
            return dict(config)
    return dict(rows[-1][1])
