"""GPTQ checkpoints whose last group is partial, as GPTQModel writes them: K=576 at group size 128
is 5 groups (four of 128 columns, one of 64), ``g_idx`` 0..4, ``scales``/``qzeros`` with 5 rows.
The checkpoint here is packed by hand, independently of lowbit's packers (formats.md §2)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lowbit import QuantScheme, export, read_checkpoint
from lowbit.errors import UnsupportedSchemeError
from lowbit.run.nn import QuantLinear, build_model
from lowbit.scheme import QuantScheme as Scheme
from lowbit.testing.models import tiny_llama

K, G = 576, 128


def _pack_along(values: torch.Tensor, dim: int) -> torch.Tensor:
    """4-bit values packed 8 per int32 word along ``dim``, value i of a word at bits 4i..4i+3."""
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, 8)
    words = sum(v[..., i] << (4 * i) for i in range(8))
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def _gptqmodel_style(w: torch.Tensor):
    """Symmetric 4-bit RTN per 128 columns, the last group 64 wide; GPTQ v1 tensors and the weight they decode to."""
    n, k = w.shape
    groups = [(g, min(g + G, k)) for g in range(0, k, G)]
    scales = torch.stack([(w[:, a:b].abs().amax(1) / 7).clamp(min=1e-5) for a, b in groups], 1).half()
    g_idx = torch.arange(k) // G
    s = scales.float()[:, g_idx]
    codes = torch.clamp(torch.round(w / s) + 8, 0, 15).to(torch.uint8)
    deq = (codes.float() - 8) * s
    tensors = {"qweight": _pack_along(codes.t(), 0), "qzeros": _pack_along(torch.full((len(groups), n), 7), 1),
               "scales": scales.t().contiguous(), "g_idx": g_idx.to(torch.int32)}
    return tensors, deq


@pytest.fixture(scope="module")
def partial_checkpoint(tmp_path_factory):
    model = tiny_llama(hidden_size=K, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                       intermediate_size=256, num_hidden_layers=1)
    d = tmp_path_factory.mktemp("gptq576")
    tensors, want = {}, {}
    for name, t in model.state_dict().items():
        mod = name[: -len(".weight")]
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            packed, deq = _gptqmodel_style(t)
            tensors.update({f"{mod}.{leaf}": v for leaf, v in packed.items()})
            want[mod] = deq
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": False,
                                     "sym": True, "checkpoint_format": "gptq"}
    (d / "config.json").write_text(json.dumps(config))
    return d, model, want


def test_reads_partial_last_group_exactly(partial_checkpoint):
    d, _model, want = partial_checkpoint
    qm = read_checkpoint(d)
    assert qm.scheme.group_size == G and set(qm.qweights) == set(want)
    qkv = qm.qweights["model.layers.0.self_attn.q_proj"]
    assert qkv.num_groups == 5 and int(qkv.group_index().max()) == 4
    assert qm.qweights["model.layers.0.mlp.down_proj"].num_groups == 2  # K=256: two whole groups
    for mod, w in want.items():
        torch.testing.assert_close(qm.qweights[mod].dequantize(), w, rtol=0, atol=0)


def test_partial_groups_run_on_the_reference_kernel(partial_checkpoint):
    d, model, want = partial_checkpoint
    qm = read_checkpoint(d)
    qmodel = build_model(qm, dtype=torch.float32)
    partial = {m.kernel_name for m in qmodel.modules() if isinstance(m, QuantLinear) and m.in_features == K}
    assert partial == {"reference"}  # kernels without supports_partial_groups refuse a partial last group
    with torch.no_grad():
        for mod, w in want.items():
            model.get_submodule(mod).weight.copy_(w)
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(qmodel(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_partial_groups_re_export_identically(partial_checkpoint, tmp_path):
    d, _model, _want = partial_checkpoint
    qm = read_checkpoint(d)
    for fmt in ("gptq", "gptq-v2", "lowbit"):
        export(qm, fmt, tmp_path / fmt)
        assert read_checkpoint(tmp_path / fmt).diff(qm) == {}


def test_lowbit_still_quantizes_only_whole_groups():
    with pytest.raises(UnsupportedSchemeError, match="does not divide"):
        Scheme(4, G).check_shape(K, "q_proj")
    assert QuantScheme(4, G).num_groups(K) == 5 and QuantScheme(4, -1).num_groups(K) == 1
