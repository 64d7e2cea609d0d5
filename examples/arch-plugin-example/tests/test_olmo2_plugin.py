"""The OLMo-2 adapter, found through its entry point only, on a tiny random OLMo-2."""

import json

import pytest
import torch

from lowbit import pipeline, read_checkpoint
from lowbit.cli import main
from lowbit.errors import ModelLoadError
from lowbit.plugins import registry, reset_plugin_manager
from lowbit.recipe import Recipe
from lowbit.run.nn import build_float_model, build_model
from lowbit.scheme import QuantScheme
from lowbit.testing.models import save_tiny_model, tiny_model


@pytest.fixture(autouse=True)
def _fresh_plugins():
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(scope="module")
def olmo2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "olmo2", "olmo2")


def test_registered_through_the_entry_point():
    assert "olmo2" in registry("architectures")
    assert registry("architectures").origin("olmo2") == "example-olmo2"


def test_disabled_plugin_leaves_olmo2_unknown(monkeypatch, olmo2_dir):
    monkeypatch.setenv("LOWBIT_DISABLED_PLUGINS", "example-olmo2")
    reset_plugin_manager()
    with pytest.raises(ModelLoadError, match="'olmo2' is not supported; supported: .*llama"):
        pipeline.plan(str(olmo2_dir), Recipe("rtn", QuantScheme(4, 32)))


def test_shapes_and_groups_match_the_model():
    model = tiny_model("olmo2")
    adapter = registry("architectures").get("olmo2")
    for layer in adapter.layers(model):
        paths = [p for g in adapter.groups(layer) for p in g.linears]
        assert {p: tuple(layer.get_submodule(p).weight.shape) for p in paths} == adapter.linear_shapes(model.config)


def test_roles_name_quantized_linears():
    """AWQ leaves the q and k roles unclipped; every role names one of the quantized linears."""
    model = tiny_model("olmo2")
    adapter = registry("architectures").get("olmo2")
    roles = adapter.layer_roles(model.config)
    assert {"q", "k", "v", "o", "gate", "up", "down"} == set(roles)
    assert set(roles.values()) == set(adapter.linear_shapes(model.config))
    for path in (adapter.embedding, adapter.final_norm, adapter.lm_head):
        model.get_submodule(path)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantize_export_verify(olmo2_dir, tmp_path, capsys, method):
    out = tmp_path / "q"
    qm = pipeline.quantize(str(olmo2_dir), method=method, scheme=QuantScheme(4, 32, sym=True), nsamples=4, seqlen=32,
                           batch_size=4, formats=["autoawq", "gptq"], out=out, progress=False)
    assert len(qm.qweights) == 2 * 7
    assert main(["verify", str(out / "lowbit"), str(out / "autoawq"), str(out / "gptq"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["identical"] is True
    loaded = read_checkpoint(out / "autoawq")
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = build_model(loaded, dtype=torch.float32)(ids).logits
        want = build_float_model(loaded, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
