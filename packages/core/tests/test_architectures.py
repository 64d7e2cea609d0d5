"""Architecture adapters on tiny random models of every built-in family (no downloads)."""

import copy

import pytest
import torch

from lowbit.algorithms.awq import fold_scales
from lowbit.algorithms.base import LayerContext
from lowbit.errors import ModelLoadError
from lowbit.models import adapter_for
from lowbit.models._experts import Experts
from lowbit.plugins import registry
from lowbit.scheme import QuantScheme
from lowbit.testing.models import TINY_FAMILIES, tiny_config, tiny_model

FAMILIES = sorted(TINY_FAMILIES)
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def _ids():
    return torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", MOE)
def test_split_experts_compute_the_fused_forward_exactly(model_type):
    model = tiny_model(model_type)
    with torch.no_grad():
        fused = model(_ids()).logits
    layers = adapter_for(model.config, registry("architectures")).layers(model)  # splits the experts
    assert all(isinstance(layer.mlp.experts, Experts) for layer in layers)
    with torch.no_grad():
        split = model(_ids()).logits
    torch.testing.assert_close(split, fused, rtol=0, atol=0)  # same products, same addition order
    adapter_for(model.config, registry("architectures")).layers(model)  # idempotent
    assert not any(n.endswith("gate_up_proj") for n, _ in model.named_parameters())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_adapter_shapes_and_groups_cover_every_quantized_linear(model_type):
    model = tiny_model(model_type)
    adapter = adapter_for(model.config, registry("architectures"))
    shapes = adapter.linear_shapes(model.config)
    for layer in adapter.layers(model):
        paths = [p for g in adapter.groups(layer) for p in g.linears]
        assert len(paths) == len(set(paths))
        assert {p: tuple(layer.get_submodule(p).weight.shape) for p in paths} == shapes
        for g in adapter.groups(layer):  # routers and gates stay float: never among the quantized linears
            assert not set(g.also_scaled) & set(paths)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_folding_awq_scales_leaves_the_float_layer_unchanged(model_type):
    """For every group with a feeding op, dividing that op's output by s and multiplying the readers'
    input columns by s is the identity on the layer: checks Gemma's (1 + w) norms, Phi-3's fused
    gate_up (the up half takes the scales) and the MoE routers scaled as float readers."""
    model = tiny_model(model_type)
    adapter = adapter_for(model.config, registry("architectures"))
    layer = adapter.layers(model)[0]
    captured = {}

    def grab(_m, args, kwargs):
        drop = ("past_key_values", "past_key_value", "cache")
        captured["args"], captured["kwargs"] = args, {k: v for k, v in kwargs.items() if k not in drop}

    h = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(_ids(), use_cache=False)
    h.remove()
    with torch.no_grad():
        want = layer(*captured["args"], **captured["kwargs"])
    want = want[0] if isinstance(want, tuple) else want
    folded = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(1)
    ctx = LayerContext(0, adapter.layer_prefix(0), folded, adapter.groups(folded), QuantScheme(4, 32), [], [])
    n_groups = 0
    for g in ctx.groups:
        if g.prev is None:
            continue
        k = folded.get_submodule(g.linears[0]).in_features
        fold_scales(ctx, g, torch.rand(k, generator=gen) * 1.5 + 0.5)
        n_groups += 1
    assert n_groups >= 2
    with torch.no_grad():
        got = folded(*captured["args"], **captured["kwargs"])
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_gemma_norm_offset_is_what_makes_the_fold_exact():
    """Without the (1 + w) offset the fold changes a Gemma layer: the test above could fail."""
    model = tiny_model("gemma2")
    adapter = adapter_for(model.config, registry("architectures"))
    layer = adapter.layers(model)[0]
    g = adapter.groups(layer)[0]
    assert g.prev == "input_layernorm" and g.norm_offset == 1.0
    x = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(0))
    s = torch.full((128,), 2.0)
    norm = copy.deepcopy(layer.input_layernorm)
    with torch.no_grad():
        want = layer.input_layernorm(x) / s
        ctx = LayerContext(0, "model.layers.0.", layer, [g], QuantScheme(4, 32), [], [])
        fold_scales(ctx, g, s)
        torch.testing.assert_close(layer.input_layernorm(x), want, rtol=1e-5, atol=1e-6)
        norm.weight.div_(s)  # the llama fold, wrong here
        assert not torch.allclose(norm(x), want, rtol=1e-3, atol=1e-3)


def test_mixtral_checkpoint_names_round_trip():
    adapter = adapter_for(tiny_config("mixtral"), registry("architectures"))
    assert adapter.checkpoint_name("model.layers.3.mlp.experts.7.w1") == "model.layers.3.block_sparse_moe.experts.7.w1"
    assert adapter.checkpoint_name("model.layers.3.mlp.gate.weight") == "model.layers.3.block_sparse_moe.gate.weight"
    assert adapter.checkpoint_name("model.layers.3.self_attn.q_proj") == "model.layers.3.self_attn.q_proj"
    for name in ("model.layers.3.mlp.experts.7.w1", "model.layers.0.mlp.gate.weight", "model.norm.weight"):
        assert adapter.lowbit_name(adapter.checkpoint_name(name)) == name


def test_unknown_model_type_is_one_line_listing_the_known_ones():
    with pytest.raises(ModelLoadError) as err:
        adapter_for({"model_type": "mamba"}, registry("architectures"))
    msg = str(err.value)
    assert "\n" not in msg and "'mamba'" in msg
    for known in ("llama", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe"):
        assert known in msg


def test_in_features_name_the_linears_a_group_size_must_divide():
    cfg = tiny_config("qwen2_moe", moe_intermediate_size=96)
    widths = adapter_for(cfg, registry("architectures")).in_features(cfg)
    assert set(widths.values()) == {96, 128}
    name = next(n for n, k in widths.items() if k == 96)
    assert name.startswith("mlp.experts.0.down_proj") and "more" in name


@pytest.mark.parametrize("model_type", FAMILIES)
def test_adapter_roles_name_the_modules_they_say(model_type):
    """Each role is a module of every decoder layer: a projection's role one of the quantized linears,
    a norm's role the op that feeds the attention's (or the MLP's) first group; the embedding, final
    norm and lm_head paths exist in the model."""
    from lowbit.models import LAYER_ROLES

    model = tiny_model(model_type)
    adapter = adapter_for(model.config, registry("architectures"))
    roles = adapter.layer_roles(model.config)
    assert {"attn_norm", "mlp_norm", "o"} <= set(roles) <= set(LAYER_ROLES)
    linears = set(adapter.linear_shapes(model.config))
    for layer in adapter.layers(model):
        prev = {p: g.prev for g in adapter.groups(layer) for p in g.linears}
        for role, path in roles.items():
            layer.get_submodule(path)
            assert (path in linears) == (not role.endswith("norm")), (role, path)
        assert prev[roles.get("q") or roles["qkv"]] == roles["attn_norm"]
        if "gate" in roles or "gate_up" in roles:
            assert prev[roles.get("gate") or roles["gate_up"]] == roles["mlp_norm"]
    for path in (adapter.embedding, adapter.final_norm, adapter.lm_head):
        model.get_submodule(path)
    assert model.get_output_embeddings() is model.get_submodule(adapter.lm_head)
