"""Perplexity by the protocol: exp(mean token NLL) over non-overlapping windows."""

from __future__ import annotations

import math

import torch

from lowbit.run.evaluate import perplexity
from lowbit.testing.models import tiny_llama


def test_perplexity_is_exp_mean_token_nll_and_windows_add_up():
    model = tiny_llama(0).eval()
    windows = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, windows=windows, progress=False, per_window=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, windows[:, 1:, None])[..., 0]  # [3, 15]
    assert res["windows"] == 3 and res["tokens"] == 45
    assert math.isclose(res["ppl"], math.exp(float(nll.mean())), rel_tol=1e-5)
    assert [round(x, 5) for x in res["window_nll"]] == [round(float(x), 5) for x in nll.mean(1)]
    first = perplexity(model, windows=windows, max_windows=1, progress=False)
    assert math.isclose(first["ppl"], math.exp(res["window_nll"][0]), rel_tol=1e-6)
    assert "window_nll" not in first
