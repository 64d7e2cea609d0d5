"""Perplexity by the project's protocol: join the text, tokenize once, cut into non-overlapping
windows of ``seqlen`` tokens (2048 unless the model's context is shorter), drop the last partial
window, report exp(mean token NLL over all windows)."""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..calibration import EVAL_TEXT, builtin_text
from ..errors import LowbitError


def eval_text() -> str:
    """The WikiText-2 test split shipped with lowbit (CC BY-SA 3.0)."""
    return builtin_text(EVAL_TEXT)


def window_ids(tokenizer, text: str, seqlen: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // seqlen
    return ids[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def perplexity(model, tokenizer=None, text: str | None = None, seqlen: int = 2048, max_windows: int | None = None,
               progress: bool = True, windows: torch.Tensor | None = None, per_window: bool = False) -> dict:
    """``{"ppl", "windows", "tokens", "seconds", "seqlen"}`` over the first ``max_windows`` windows (all
    if None); ``per_window`` adds ``"window_nll"``, each window's mean token NLL (so the perplexity of
    any prefix of the windows can be read off one full pass)."""
    ctx = getattr(model.config, "max_position_embeddings", seqlen) or seqlen
    seqlen = min(seqlen, ctx)
    if windows is None:
        windows = window_ids(tokenizer, text if text is not None else eval_text(), seqlen)
    if max_windows is not None:
        windows = windows[:max_windows]
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise LowbitError(f"no window of {seqlen} tokens to score: the text is shorter than one window, or a window "
                          "holds fewer than 2 tokens. Give more text, a --seqlen of at least 2, or --windows ≥ 1.")
    t0 = time.perf_counter()
    nll, count, per = 0.0, 0, []
    for w in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        logits = model(w[None], use_cache=False).logits[0, :-1].float()
        window = float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        if not math.isfinite(window):
            raise LowbitError(f"perplexity window {len(per)} gave a non-finite loss ({window}): the model's logits hold "
                              "NaN or infinity, so no perplexity can be reported. Check the checkpoint's float tensors; "
                              "if a 16-bit --dtype overflows, use --dtype fp32.")
        nll += window
        count += w.numel() - 1
        per.append(window / (w.numel() - 1))
    res = {"ppl": math.exp(nll / count), "windows": int(windows.shape[0]), "tokens": count,
           "seconds": time.perf_counter() - t0, "seqlen": seqlen}
    if per_window:
        res["window_nll"] = per
    return res
