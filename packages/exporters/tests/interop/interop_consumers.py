"""What the interop tests share: whether each real consumer is importable here, and the logit check.

(A uniquely named module beside the tests, not conftest, so importing it never picks another
package's conftest.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    import gptqmodel  # noqa: F401
    import optimum  # noqa: F401

    GPTQMODEL_MISSING = None
except ImportError as err:  # pragma: no cover - depends on the environment
    GPTQMODEL_MISSING = f"transformers + gptqmodel not usable here: {type(err).__name__}: {err}"

try:
    from awq.utils.packing_utils import dequantize_gemm

    AUTOAWQ_MISSING = None
except ImportError as err:  # pragma: no cover
    dequantize_gemm = None
    AUTOAWQ_MISSING = f"AutoAWQ not usable here: {type(err).__name__}: {err}"

needs_gptqmodel = pytest.mark.skipif(GPTQMODEL_MISSING is not None, reason=GPTQMODEL_MISSING or "")
needs_autoawq = pytest.mark.skipif(AUTOAWQ_MISSING is not None, reason=AUTOAWQ_MISSING or "")


def assert_logits_close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-2) -> float:
    """The consumer's logits ``got`` equal ``ref`` within ``rel`` of the logit scale (at least 1), and
    the last position's argmax agrees; returns the max abs difference (printed too).

    Why 1e-2 of the scale: the consumer runs fp16. Measured on the tiny llama: GPTQ 7e-4, AWQ 9e-4
    (gptqmodel 7.7) / 4.5e-3 (7.6, whose CPU int4 kernel rounds its zero offsets) at logit scale
    ~0.9; the same model decoded with the wrong AWQ nibble order is off by 1.03, so 1e-2 of the scale
    separates right from wrong by 100x. On the 30-layer demo model (rel=2.5e-2) the CPU int4 kernel
    is off by 0.114 (gptqmodel 7.7) / 0.352 (7.6) at logit scale 29.3, identically for the GPTQ and
    the AWQ export (the same kernel runs both).
    """
    got, ref = got.float(), ref.float()
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    print(f"logits: max |consumer - reference| = {err:.3g} at logit scale {scale:.3g} (tolerance "
          f"{rel * max(scale, 1.0):.3g})")
    assert err <= rel * max(scale, 1.0), (err, scale)
    assert torch.equal(got[:, -1].argmax(-1), ref[:, -1].argmax(-1))
    return err


# -- running a prompt through a consumer --------------------------------------------------------------


@contextlib.contextmanager
def moe_routes(model, replace: dict | None = None):
    """Capture every MoE router's choice during a forward pass, or replace it by ``replace``'s.

    transformers 5's routers return ``(router logits, routing weights, expert indices)``; yields a dict
    module name → ``{"scores", "indices", "gap"}`` (``gap``: per token, the router's probability of its
    k-th expert minus that of the next one). With ``replace`` (such a dict from another model with the
    same router names), each router keeps its logits but routes as ``replace`` says, so two runtimes
    whose hidden states differ by kernel rounding still send each token to the same experts: a tiny
    random model's router is near uniform, and a difference of 1e-4 in a probability flips a choice.
    """
    routes: dict[str, dict] = {}

    def hook(name):
        def fn(module, args, out):
            if not (isinstance(out, tuple) and len(out) == 3 and not out[2].is_floating_point()):
                return None
            logits, scores, indices = out
            k = indices.shape[-1]
            probs = torch.softmax(logits.float(), -1).sort(-1, descending=True).values
            gap = probs[:, k - 1] - probs[:, k] if probs.shape[-1] > k else torch.ones(probs.shape[0])
            routes[name] = {"scores": scores.detach().float(), "indices": indices.detach(), "gap": gap}
            if replace is not None and name in replace:
                return logits, replace[name]["scores"].to(scores.dtype), replace[name]["indices"]
            return None
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        yield routes
    finally:
        for h in handles:
            h.remove()


def run_in_transformers(path: str, prompt: torch.Tensor):
    """(fp16 logits, tensors not loaded or not used, quantized layer classes, MoE routes) of
    ``AutoModelForCausalLM.from_pretrained(path)`` on the CPU."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="cpu",
                                                       output_loading_info=True)
    skipped = sorted(set(info["missing_keys"]) | set(info["unexpected_keys"]))
    return _run(model.eval(), prompt, skipped)


class _Unused(logging.Handler):
    """Collects the checkpoint tensors accelerate reports as not used (gptqmodel loads through it)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.names: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "were not used when initializing" in msg:
            self.names += re.findall(r"'([^']+)'", msg[msg.index("initializing"):])


def run_in_gptqmodel(path: str, prompt: torch.Tensor):
    """As :func:`run_in_transformers` for ``GPTQModel.load(path)``. gptqmodel patches transformers' MoE
    classes for good when it loads a MoE model (defuser), so run this in a process of its own."""
    from gptqmodel import GPTQModel

    handler = _Unused()
    log = logging.getLogger("accelerate.utils.modeling")
    log.addHandler(handler)
    try:
        model = GPTQModel.load(path, device="cpu", dtype=torch.float16)
    finally:
        log.removeHandler(handler)
    return _run(model.model.eval(), prompt, sorted(handler.names))


def _run(model, prompt, skipped):
    kinds = ", ".join(sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")}))
    with torch.no_grad(), moe_routes(model) as routes:
        logits = model(prompt).logits
    return logits, skipped, kinds, routes
