"""The streaming pass: layers read one at a time from safetensors shards, results written shard by shard."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit import pipeline
from lowbit.checkpoint import CheckpointWriter, LowbitCheckpoint
from lowbit.errors import ModelLoadError
from lowbit.loading import load_model, resolve
from lowbit.models import adapter_for
from lowbit.plugins import registry
from lowbit.recipe import Recipe
from lowbit.scheme import QuantScheme
from lowbit.testing.models import save_tiny_llama, tiny_llama, tiny_tokenizer
from lowbit.weights import is_materialized


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """A 4-layer tiny llama saved in bf16 as 3 safetensors shards (plus index) with its tokenizer."""
    path = tmp_path_factory.mktemp("models") / "sharded"
    model = tiny_llama(seed=3, num_hidden_layers=4).to(torch.bfloat16)
    model.save_pretrained(str(path), safe_serialization=True, max_shard_size="500KB")
    tiny_tokenizer().save_pretrained(str(path))
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) == 3, [s.name for s in shards]
    return path


def _in_memory(path, method, scheme, **options):
    """The same recipe on the whole float model in memory (the pass with no source)."""
    src = resolve(str(path))
    from lowbit.calibration import load_text, samples
    from lowbit.loading import load_tokenizer

    model = load_model(src)
    ids = samples(load_tokenizer(src), load_text("wikitext2"), 8, 64)
    recipe = Recipe(method, scheme, options, batch_size=4)
    qweights, _ = pipeline.run_pass(model, adapter_for(model.config, registry("architectures")),
                                    pipeline.make_steps(recipe), recipe, ids, progress=False)
    return qweights, pipeline.float_tensors_of(model, qweights)


@pytest.mark.parametrize("method", ["rtn", "awq+gptq"])
def test_streamed_equals_in_memory(sharded_dir, tmp_path, method):
    scheme = QuantScheme(4, 32)
    qm = pipeline.quantize(str(sharded_dir), method=method, scheme=scheme, nsamples=8, seqlen=64, batch_size=4,
                           out=tmp_path / "o", progress=False)
    assert not isinstance(qm.qweights, dict)  # read back lazily from the written shards
    want_q, want_f = _in_memory(sharded_dir, method, scheme)
    got = LowbitCheckpoint().read(tmp_path / "o" / "lowbit")
    assert sorted(got.qweights) == sorted(want_q) and len(want_q) == 4 * 7
    for name, qw in want_q.items():
        assert qw.equal(got.qweights[name]), (name, qw.diff(got.qweights[name]))
    assert sorted(got.float_tensors) == sorted(want_f)
    for name, t in want_f.items():
        assert torch.equal(got.float_tensors[name], t), name
    layers = json.loads((tmp_path / "o" / "lowbit" / "lowbit.json").read_text())["report"]["layers"]
    assert [r["layer"] for r in layers] == [0, 1, 2, 3]
    assert all(r["seconds"] >= 0 and r["peak_rss_mib"] >= r["rss_mib"] > 0 for r in layers)


def test_never_more_than_two_layers_in_memory(sharded_dir, tmp_path, monkeypatch):
    seen = []
    original = pipeline.materialize

    def counting(module, prefix, source, *args, **kwargs):
        model_layers = counting.layers
        seen.append(sum(is_materialized(layer) for layer in model_layers))
        original(module, prefix, source, *args, **kwargs)
        seen.append(sum(is_materialized(layer) for layer in model_layers))

    original_weights_of = pipeline.weights_of

    def weights_of(*args, **kwargs):
        model, source = original_weights_of(*args, **kwargs)
        counting.layers = list(adapter_for(model.config, registry("architectures")).layers(model))
        assert source is not None, "a local sharded model should stream"
        assert not any(is_materialized(layer) for layer in counting.layers)
        return model, source

    monkeypatch.setattr(pipeline, "materialize", counting)
    monkeypatch.setattr(pipeline, "weights_of", weights_of)
    pipeline.quantize(str(sharded_dir), method="gptq", scheme=QuantScheme(4, 32), nsamples=4, seqlen=64,
                      batch_size=2, out=tmp_path / "o", progress=False)
    assert len(seen) == 8 and max(seen) <= 2, seen
    assert seen[1::2] == [1, 1, 1, 1]  # each layer is released before the next is read


def test_lowbit_checkpoint_in_shards_reads_back(sharded_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(CheckpointWriter, "max_shard_bytes", 100_000)
    qm = pipeline.quantize(str(sharded_dir), method="rtn", scheme=QuantScheme(4, 32), out=tmp_path / "o",
                           progress=False)
    out = tmp_path / "o" / "lowbit"
    layers = sorted(out.glob("layer-*.safetensors"))
    outer = sorted(out.glob("outer-*-of-*.safetensors"))  # embeddings, final norm, lm_head in small shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(layers) == 4 and len(outer) > 2
    assert set(index["weight_map"].values()) == {s.name for s in layers + outer} == {s.name for s in out.glob("*.safetensors")}
    full = LowbitCheckpoint().read(out)  # checks the manifest's tensor_hash
    assert full.tensor_hash() == qm.tensor_hash()
    assert not list(out.glob(".*"))  # no shard data files left behind


def test_missing_or_truncated_shard_is_one_line(sharded_dir, tmp_path, capsys):
    import shutil

    from lowbit.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(sharded_dir, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert main(["quantize", str(broken), "--out", str(tmp_path / "o1"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and shard.name in err and "truncated" in err
    shard.unlink()
    assert main(["quantize", str(broken), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and shard.name in err and "missing" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]


def test_checkpoint_whose_names_differ_loads_whole(tmp_path):
    """A checkpoint whose tensor names are not the modules' (here: renamed) cannot stream: the pass
    loads it through transformers instead, which then fails loudly rather than quantizing garbage."""
    path = save_tiny_llama(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    tensors = {k.replace("model.layers.1.", "model.layers.9."): v for k, v in load_file(str(f)).items()}
    save_file(tensors, str(f), metadata={"format": "pt"})
    model, source = pipeline.weights_of(resolve(str(path)), tiny_llama().config)
    assert source is None and is_materialized(model)


def test_device_is_checked_before_work(sharded_dir, tmp_path):
    from lowbit.errors import UnsupportedSchemeError

    with pytest.raises(UnsupportedSchemeError, match="no CUDA device|cuda"):
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
        pipeline.quantize(str(sharded_dir), out=tmp_path / "o", device="cuda", progress=False)
    with pytest.raises(UnsupportedSchemeError, match="not a device|not supported"):
        pipeline.quantize(str(sharded_dir), out=tmp_path / "o", device="tpu9", progress=False)
    assert not (tmp_path / "o").exists()


def test_source_missing_a_tensor_is_a_load_error(sharded_dir):
    from lowbit.weights import WeightSource, empty_model, materialize

    model = empty_model(tiny_llama(num_hidden_layers=4).config)
    source = {k: v for k, v in WeightSource.from_dir(sharded_dir).items() if "layers.2.mlp.up_proj" not in k}
    layer = adapter_for(model.config, registry("architectures")).layers(model)[2]
    with pytest.raises(ModelLoadError, match="layers.2.mlp.up_proj"):
        materialize(layer, "model.layers.2.", source)


@pytest.mark.parametrize("method", ["awq+gptq", "signround"])
def test_resume_after_kill_gives_identical_bits(sharded_dir, tmp_path, monkeypatch, method):
    """A run killed after layer 2 of 4 leaves its work directory; --resume finishes it from layer 2
    (layers 0 and 1 are not redone) with the same bits as an uninterrupted run (signround: its float
    stream, rebuilt through the float layers 0 and 1, is the one the uninterrupted run carried)."""
    from lowbit.workdir import WorkDir

    opts = dict(method=method, scheme=QuantScheme(4, 32), nsamples=8, seqlen=64, batch_size=4, progress=False,
                step_options={"signround": {"iters": 4}} if method == "signround" else {})
    whole = pipeline.quantize(str(sharded_dir), out=tmp_path / "whole", **opts)

    class Killed(BaseException):  # what SIGKILL leaves: nothing after this point runs
        pass

    save = WorkDir.save_layer

    def dies_after_two(self, index, *args):
        save(self, index, *args)
        if index == 1:
            raise Killed

    monkeypatch.setattr(WorkDir, "save_layer", dies_after_two)
    with pytest.raises(Killed):
        pipeline.quantize(str(sharded_dir), out=tmp_path / "o", **opts)
    assert not (tmp_path / "o").exists() and (tmp_path / ".o.work" / "state.json").is_file()
    monkeypatch.setattr(WorkDir, "save_layer", save)

    done = []
    original = pipeline.materialize
    monkeypatch.setattr(pipeline, "materialize", lambda m, prefix, *a, **k: (done.append(prefix), original(m, prefix, *a, **k)))
    with pytest.raises(Exception, match="other settings"):  # a resume with other settings is refused
        pipeline.quantize(str(sharded_dir), out=tmp_path / "o", resume=True, **{**opts, "nsamples": 4})
    done.clear()
    resumed = pipeline.quantize(str(sharded_dir), out=tmp_path / "o", resume=True, **opts)
    if method == "signround":  # the float stream runs the float layers before the resumed one, once each
        assert done.count("model.layers.0.") == 2 and done.count("model.layers.1.") == 1  # layer 0: + the probe
    else:
        assert "model.layers.0." in done and "model.layers.1." not in done  # layer 0 only for the steps' probe
    assert done.count("model.layers.2.") == 1 and done.count("model.layers.3.") == 1
    assert resumed.manifest["tensor_hash"] == whole.manifest["tensor_hash"]
    a, b = LowbitCheckpoint().read(tmp_path / "o" / "lowbit"), LowbitCheckpoint().read(tmp_path / "whole" / "lowbit")
    assert a.diff(b) == {} and all(torch.equal(a.float_tensors[k], b.float_tensors[k]) for k in b.float_tensors)
    assert not (tmp_path / ".o.work").exists()


@pytest.mark.parametrize("kind", ["bin", "renamed"])
def test_a_model_that_cannot_stream_loads_whole_only_if_it_fits(tmp_path, monkeypatch, capsys, kind):
    """pytorch_model.bin, or tensors not named as the modules, cannot stream: refused before loading,
    with one line saying why, when a whole load would not fit in memory; else loaded whole (never the
    pickle, which lowbit does not open)."""
    from lowbit import limits
    from lowbit.cli import main

    model = tiny_llama()
    path = tmp_path / "m"
    if kind == "bin":
        path.mkdir()
        model.config.save_pretrained(str(path))
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        tiny_tokenizer().save_pretrained(str(path))
        assert not list(path.glob("*.safetensors"))
    else:
        path = save_tiny_llama(path)
        from safetensors.torch import load_file, save_file

        f = path / "model.safetensors"
        renamed = {k.replace("model.layers.1.", "model.layers.9."): v for k, v in load_file(str(f)).items()}
        save_file(renamed, str(f), metadata={"format": "pt"})
    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 20)
    capsys.readouterr()
    code = main(["quantize", str(path), "--group-size", "32", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be streamed layer by layer" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 40)
    if kind == "bin":  # with room to load it whole, the pickle is still never opened
        with pytest.raises(ModelLoadError, match="model.safetensors"):
            pipeline.weights_of(resolve(str(path)), model.config)
    else:
        loaded, source = pipeline.weights_of(resolve(str(path)), model.config)
        assert source is None and is_materialized(loaded)


def test_export_compatible_streams_and_equals_the_whole_model_path(sharded_dir, tmp_path, monkeypatch):
    """--export-compatible on a streamable model writes each AWQ-transformed layer as it is done;
    the result is the float checkpoint the whole-model path (transformers' save_pretrained) writes."""
    from safetensors.torch import load_file

    from lowbit.hf import load_tensors

    opts = dict(method="awq", scheme=QuantScheme(4, 32), step_options={"awq": {"n_grid": 4}}, nsamples=4, seqlen=64,
                batch_size=2, progress=False)
    seen = []
    original = pipeline.weights_of
    monkeypatch.setattr(pipeline, "weights_of", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    pipeline.export_compatible(str(sharded_dir), tmp_path / "streamed", **opts)
    assert seen[0][1] is not None  # it streamed
    monkeypatch.setattr(pipeline, "weights_of", lambda src, *a, **k: (load_model(src), None))
    pipeline.export_compatible(str(sharded_dir), tmp_path / "whole", **opts)
    streamed, whole = load_tensors(tmp_path / "streamed"), load_tensors(tmp_path / "whole")
    assert set(streamed) == set(whole)
    assert all(torch.equal(streamed[k], whole[k]) for k in whole)
    original_weights = load_file(str(sorted(sharded_dir.glob("model-*.safetensors"))[0]))
    assert any(not torch.equal(streamed[k], v.float()) for k, v in original_weights.items() if "proj" in k)
    assert (tmp_path / "streamed" / "config.json").is_file() and (tmp_path / "streamed" / "tokenizer.json").is_file()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_moe_checkpoints_stream_expert_by_expert(tmp_path, model_type):
    """A MoE checkpoint (one tensor per expert linear on disk, as transformers saves it; Mixtral's under
    ``block_sparse_moe``) streams: the skeleton's fused experts are split on the meta device, each expert
    is read from the files when its layer comes up, and the result equals the pass over the whole model
    that transformers loads (and fuses) itself. Membership is answered from the names alone."""
    from lowbit import weights
    from lowbit.calibration import load_text, samples
    from lowbit.loading import load_tokenizer
    from lowbit.testing.models import save_tiny_model

    path = save_tiny_model(tmp_path / "m", model_type, seed=5)
    src = resolve(str(path))
    model = load_model(src)
    adapter = adapter_for(model.config, registry("architectures"))
    reads = []
    original = weights.check_source_tensor
    weights.check_source_tensor = lambda t, name, where: reads.append(name) or original(t, name, where)
    try:
        skeleton, source = pipeline.weights_of(src, model.config, adapter=adapter)
    finally:
        weights.check_source_tensor = original
    assert source is not None and not is_materialized(skeleton) and reads == []
    assert any(".experts.0." in n for n, _ in skeleton.named_parameters())

    scheme = QuantScheme(4, 32)
    recipe = Recipe("awq+gptq", scheme, {"awq": {"n_grid": 4}}, nsamples=8, seqlen=64, batch_size=4)
    qm = pipeline.quantize(str(path), recipe, out=tmp_path / "o", progress=False)
    ids = samples(load_tokenizer(src), load_text("wikitext2"), 8, 64)
    want_q, _ = pipeline.run_pass(model, adapter, pipeline.make_steps(recipe), recipe, ids, progress=False)
    want_f = pipeline.float_tensors_of(model, want_q)
    got = LowbitCheckpoint().read(tmp_path / "o" / "lowbit")
    assert sorted(got.qweights) == sorted(want_q) and any(".experts.3." in n for n in want_q)
    for name, qw in want_q.items():
        assert qw.equal(got.qweights[name]), (name, qw.diff(got.qweights[name]))
    assert sorted(got.float_tensors) == sorted(want_f)
    assert all(torch.equal(got.float_tensors[k], t) for k, t in want_f.items())
    assert qm.manifest["tensor_hash"] == got.manifest["tensor_hash"]


def test_moe_export_compatible_streams_under_the_checkpoint_names(tmp_path):
    """--export-compatible on Mixtral writes each transformed expert under the name it was read by
    (``block_sparse_moe.experts.E.w1``), so transformers loads the result with no missing or unexpected keys."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lowbit.hf import load_tensors
    from lowbit.testing.models import save_tiny_model

    path = save_tiny_model(tmp_path / "m", "mixtral", seed=2)
    out = pipeline.export_compatible(str(path), tmp_path / "x", method="awq", scheme=QuantScheme(4, 32),
                                     step_options={"awq": {"n_grid": 4}}, nsamples=4, seqlen=64, batch_size=2,
                                     progress=False)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    written = load_tensors(out)
    assert set(written) == names
    assert any(not torch.equal(written[k], load_tensors(path)[k]) for k in names if ".experts." in k)
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
