"""Loading a checkpoint to run: what ``lowbit eval``, ``generate`` and ``chat`` share."""

from __future__ import annotations

from typing import Any

from ..errors import LowbitError

#: activation dtype names the commands accept → torch dtype attribute
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def dtype_of(name: str):
    """The torch dtype called ``name`` (a key of :data:`DTYPES`)."""
    import torch

    return getattr(torch, DTYPES[name])


def load_runtime(path: str, dtype_name: str, kernel: str | None = None, lm_head: str = "float") -> tuple[Any, Any]:
    """(QuantizedModel, runnable CPU model) of the checkpoint at ``path``, any format lowbit reads;
    it must hold a tokenizer. ``lm_head``: keep it float or quantize it at load time (see
    :func:`lowbit.run.nn.build_model`)."""
    from ..exporting import read_checkpoint
    from .nn import build_model

    qm = read_checkpoint(path)
    if qm.tokenizer is None:
        raise LowbitError(f"{path} has no tokenizer files; copy the model's tokenizer into it.")
    return qm, build_model(qm, "cpu", dtype_of(dtype_name), kernel, lm_head=lm_head)
