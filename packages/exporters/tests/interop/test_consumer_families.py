"""Every family lowbit lists through the real loaders (opt-in tox env ``interop``).

For each model type a built-in adapter serves, a tiny seeded random model of that family
(:func:`lowbit.testing.models.save_tiny_model`, the builders the integration tests use) is quantized
by lowbit's pipeline (RTN W4 g32 symmetric: a scheme both AutoAWQ GEMM and GPTQ v1 hold) into lowbit's
own checkpoint plus the AutoAWQ GEMM and GPTQ exports. Each export is loaded on the CPU in fp16 by
the two loaders people use:

* ``transformers``: ``AutoModelForCausalLM.from_pretrained``, which hands both ``quant_method`` s to
  gptqmodel's kernels;
* ``gptqmodel``: ``GPTQModel.load``, gptqmodel's own loader (its model definitions, and for MoE
  families defuser, which splits transformers 5's fused experts into one linear per expert).

A loader must use every tensor of the export and initialize nothing itself, and its logits on a
fixed prompt must equal those of lowbit's own runtime (``runner_for``, the transformers path with
lowbit's kernels, fp32) on the lowbit checkpoint within fp16 tolerance (:func:`assert_logits_close`).

Where a loader cannot load a family, the test does not pretend: :data:`CANNOT_LOAD` says what the
loader does instead, as measured here; the test checks that this is still what happens (the same
tensors left unused or uninitialized) and then xfails with the loader's own words, so a consumer
release that fixes it turns the case into a failure to update. packages/exporters/README.md has
the table.
"""

from __future__ import annotations

import multiprocessing
import re
from dataclasses import dataclass

import pytest
import torch
from interop_consumers import assert_logits_close, moe_routes, needs_gptqmodel, run_in_gptqmodel, run_in_transformers

from lowbit import pipeline, read_checkpoint
from lowbit.models import BUILTIN
from lowbit.run.engine import runner_for
from lowbit.scheme import QuantScheme
from lowbit.testing.models import save_tiny_model

#: every model type a built-in adapter serves (a new adapter or model type is tested without editing this file)
FAMILIES = sorted({mt for adapter in BUILTIN for mt in adapter.model_types})
FORMATS = ("autoawq", "gptq")
LOADERS = ("transformers", "gptqmodel")
SCHEME = QuantScheme(4, 32, sym=True)
#: token ids below the tiny Gemma 3's image tokens (380–382) and the vocabulary (384)
PROMPT = torch.tensor([[1, 5, 9, 23, 77, 120, 3, 44, 300, 17, 250, 61]])


@dataclass(frozen=True)
class CannotLoad:
    """What a loader does with a family's export instead of loading it, as measured here."""

    #: why, in a line (the loader's own message where it gives one)
    why: str
    #: every tensor the loader left unused or initialized itself matches this (and there is at least one)
    tensors: str = ""
    #: or: the start of the exception the loader raises
    error: str = ""


_TRANSFORMERS_MOE = CannotLoad(
    "transformers 5 keeps MoE experts fused (3-D gate_up_proj/down_proj, not nn.Linear), so its gptq/awq "
    "quantizer converts none of them: the per-expert qweight/qzeros/scales are UNEXPECTED and the fused "
    "experts MISSING (randomly initialized)",
    tensors=r"\.(experts\.\d+\.\w+\.(qweight|qzeros|scales|g_idx)|experts\.(gate_up_proj|down_proj))$")
_GPTQMODEL_PHI3 = ("gptqmodel 7.6's Phi-3 definition splits gate_up_proj into gate_proj/up_proj (its own Phi-3 "
                   "checkpoints hold those); Phi-3 checkpoints, transformers, AutoAWQ and vLLM hold the fused gate_up_proj")
_GPTQMODEL_MIXTRAL = ("gptqmodel 7.6's defused Mixtral reads mlp.experts.E.gate_proj/up_proj/down_proj and mlp.gate "
                      "and maps the names Mixtral checkpoints use (block_sparse_moe.experts.E.w1/w3/w2, which AutoAWQ "
                      "and vLLM read) for float weights only")
#: (loader, model type, format) → what happens instead
CANNOT_LOAD: dict[tuple[str, str, str], CannotLoad] = {
    **{("transformers", mt, fmt): _TRANSFORMERS_MOE for mt in ("mixtral", "qwen2_moe", "qwen3_moe") for fmt in FORMATS},
    ("gptqmodel", "mixtral", "autoawq"): CannotLoad(
        _GPTQMODEL_MIXTRAL + ": 'Some weights of the model checkpoint ... were not used'",
        tensors=r"\.block_sparse_moe\.(experts\.\d+\.w[123]\.(qweight|qzeros|scales)|gate\.weight)$"),
    ("gptqmodel", "mixtral", "gptq"): CannotLoad(_GPTQMODEL_MIXTRAL, error="Missing required quantized weights in checkpoint"),
    ("gptqmodel", "phi3", "autoawq"): CannotLoad(
        _GPTQMODEL_PHI3 + ": 'Some weights of the model checkpoint ... were not used' (gate_up_proj)",
        tensors=r"\.mlp\.gate_up_proj\.(qweight|qzeros|scales)$"),
    ("gptqmodel", "phi3", "gptq"): CannotLoad(
        _GPTQMODEL_PHI3, error="Missing required quantized weights in checkpoint"),
}
#: a router choice two runtimes must agree on: its k-th expert's probability is ahead of the next by this
CLEAR_ROUTE = 1e-2


@pytest.fixture(scope="session")
def gptqmodel_process():
    """One process for every GPTQModel.load (it patches transformers' MoE classes for good)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        yield pool


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """model type → directory holding ``lowbit``, ``autoawq`` and ``gptq`` (quantized once per module)."""
    root = tmp_path_factory.mktemp("families")
    done: dict[str, object] = {}

    def get(model_type: str):
        if model_type not in done:
            src = save_tiny_model(root / model_type / "src", model_type, seed=7)
            out = root / model_type / "q"
            pipeline.quantize(str(src), method="rtn", scheme=SCHEME, formats=list(FORMATS), out=out, progress=False)
            done[model_type] = out
        return done[model_type]

    return get


def lowbit_logits(path, routes: dict) -> tuple[torch.Tensor, list]:
    """Logits of lowbit's own runtime on its checkpoint (the transformers path, so the same in every env),
    routing each token as the consumer did (``routes``: see :func:`moe_routes`); and the choices where
    lowbit's router would clearly have routed otherwise."""
    runner = runner_for(read_checkpoint(path), torch.float32, runtime="transformers")
    with torch.no_grad(), moe_routes(runner.model, replace=routes) as own:
        logits = runner.model(PROMPT).logits
    disagree = []
    for name, r in own.items():
        theirs = routes.get(name)
        for t in range(r["indices"].shape[0]):
            same = theirs is not None and set(r["indices"][t].tolist()) == set(theirs["indices"][t].tolist())
            if not same and r["gap"][t] > CLEAR_ROUTE:
                disagree.append((name, t, r["indices"][t].tolist(), r["gap"][t].item()))
    return logits, disagree


@needs_gptqmodel
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_export_loads_and_matches_lowbit(exported, gptqmodel_process, model_type, fmt, loader):
    out = exported(model_type)
    known = CANNOT_LOAD.get((loader, model_type, fmt))
    path = str(out / fmt)
    try:
        if loader == "transformers":
            got, skipped, kinds, routes = run_in_transformers(path, PROMPT)
        else:
            got, skipped, kinds, routes = gptqmodel_process.apply(run_in_gptqmodel, (path, PROMPT))
    except Exception as err:
        line = (str(err).strip().splitlines() or [""])[0]
        if known is not None and known.error and line.startswith(known.error):
            pytest.xfail(f"{known.why}: {type(err).__name__}: {line[:160]}")
        raise
    print(f"{loader} loaded {model_type} {fmt} with {kinds or 'no quantized layers'}; "
          f"{len(skipped)} tensors unused or not loaded; {len(routes)} MoE routers")
    if known is not None:  # (compared with lowbit's own routing: the consumer's may come from a router it left unloaded)
        ref = lowbit_logits(out / "lowbit", {})[0]
        assert known.tensors and skipped and all(re.search(known.tensors, n) for n in skipped), \
            f"{loader} now loads {model_type} otherwise; update CANNOT_LOAD and the README table: {skipped[:6]}"
        err = (got.float() - ref).abs().max().item()
        pytest.xfail(f"{known.why} ({len(skipped)} tensors; logits off by {err:.3g} at scale "
                     f"{ref.abs().max().item():.3g})")
    assert not skipped, f"{loader} did not load {skipped[:6]}"
    ref, disagree = lowbit_logits(out / "lowbit", routes)
    near = sum(int((r["gap"] <= CLEAR_ROUTE).sum()) for r in routes.values())
    if routes:
        print(f"routes: {near} token choices within {CLEAR_ROUTE} of a tie; the consumer's routing is "
              f"replayed in lowbit's runtime")
    assert not disagree, f"the consumer's router chose otherwise where lowbit's choice is clear: {disagree[:4]}"
    assert got.shape == ref.shape
    assert_logits_close(got, ref)
