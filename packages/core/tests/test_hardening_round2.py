"""Hardening, round two (issue 25): outputs never overlap inputs, nothing is computed from NaN,
configs are checked for plausible sizes before any allocation, and bad arguments are one line.

Every case named in the issue has its own test here: one line on stderr, exit status 2, and the
inputs exactly as they were (a digest of each input tree before and after) with nothing new left
beside the output.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.testing.faults import bounded, tree_digest


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(code: int, err: str, *needles: str) -> None:
    """Exit status 2 and exactly one line on stderr, holding each of ``needles``."""
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


@pytest.fixture
def model(tiny_dir, tmp_path):
    """A private copy of the tiny float model (a test that went wrong could otherwise destroy the shared one)."""
    return shutil.copytree(tiny_dir, tmp_path / "m")


@pytest.fixture
def copy(ckpt, tmp_path):
    return shutil.copytree(ckpt, tmp_path / "c" / "lowbit")


def set_tensor(directory, name: str, fn) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    fn(tensors[name])
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def edit_config(directory, **values) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(values)
    (directory / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------ 1. outputs overlapping inputs
def _export_out(kind: str, c, tmp_path):
    """--out for ``export c``, spelled so that it overlaps the checkpoint ``c`` in the way ``kind`` says."""
    if kind == "same":
        return c
    if kind == "parent":
        return c.parent
    if kind == "child":
        return c / "sub"
    if kind == "dotdot":
        return c / ".." / c.name
    if kind == "symlink":
        (tmp_path / "link").symlink_to(c, target_is_directory=True)
        return tmp_path / "link"
    if kind == "through-symlinked-parent":
        (tmp_path / "plink").symlink_to(c.parent, target_is_directory=True)
        return tmp_path / "plink" / c.name
    if kind == "relative":  # (the tests run in tmp_path)
        return os.path.relpath(c, tmp_path)
    raise AssertionError(kind)


KINDS = ["same", "parent", "child", "dotdot", "symlink", "through-symlinked-parent", "relative"]


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "plain"])
@pytest.mark.parametrize("kind", KINDS)
def test_export_out_overlapping_the_checkpoint_is_refused(capsys, copy, tmp_path, monkeypatch, kind, overwrite):
    monkeypatch.chdir(tmp_path)
    out = _export_out(kind, copy, tmp_path)
    before, parent = tree_digest(copy), sorted(os.listdir(tmp_path))
    code, _, err = run(capsys, "export", copy, "--format", "lowbit", "--out", out, *(["--overwrite"] * overwrite))
    refused(code, err, "the checkpoint", "with or without --overwrite")
    assert tree_digest(copy) == before and sorted(os.listdir(tmp_path)) == parent


@pytest.mark.parametrize("kind", ["same", "parent", "child", "dotdot", "symlink", "relative"])
def test_quantize_out_overlapping_the_model_is_refused(capsys, model, tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    out = _export_out(kind, model, tmp_path)
    before, parent = tree_digest(model), sorted(os.listdir(tmp_path))
    code, _, err = run(capsys, "quantize", model, "--out", out, "--overwrite", "--group-size", "32", "--no-progress")
    refused(code, err, "the model", "with or without --overwrite")
    assert tree_digest(model) == before and sorted(os.listdir(tmp_path)) == parent


def test_quantize_out_over_the_calibration_file_is_refused(capsys, model, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text " * 200)
    before = tree_digest(calib)
    code, _, err = run(capsys, "quantize", model, "--method", "gptq", "--calib", calib, "--out", calib, "--overwrite",
                       "--group-size", "32", "--no-progress")
    refused(code, err, "--calib")
    assert tree_digest(calib) == before


def test_quantize_outputs_may_not_overlap_each_other_or_load_awq(capsys, model, tmp_path):
    code, _, err = run(capsys, "quantize", model, "--method", "awq", "--out", tmp_path / "o", "--dump-awq",
                       tmp_path / "o" / "awq.safetensors", "--group-size", "32", "--no-progress")
    refused(code, err, "two outputs of one command may not overlap")
    results = tmp_path / "awq.safetensors"
    results.write_bytes(b"not really a dump")
    code, _, err = run(capsys, "quantize", model, "--method", "awq", "--load-awq", results, "--out", results,
                       "--overwrite", "--group-size", "32", "--no-progress")
    refused(code, err, "--load-awq")
    assert results.read_bytes() == b"not really a dump"
    code, _, err = run(capsys, "quantize", model, "--method", "awq", "--export-compatible", model / "x",
                       "--group-size", "32", "--no-progress")
    refused(code, err, "--export-compatible", "is inside the model")
    assert sorted(os.listdir(tmp_path)) == ["awq.safetensors", "m"]


def test_a_hard_link_to_an_input_is_the_input():
    """Two names of one file (no symlink to resolve) are still one file: device and inode decide."""
    import tempfile

    from lowbit.errors import OutputError
    from lowbit.io import check_apart

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "a.txt")
        open(src, "w").write("x")
        os.link(src, os.path.join(d, "b.txt"))
        with pytest.raises(OutputError, match="is --calib"):
            check_apart({"--out": os.path.join(d, "b.txt")}, {"--calib": src})
        check_apart({"--out": os.path.join(d, "c")}, {"--calib": src})  # a sibling is fine


def test_export_of_dot_writes_beside_the_checkpoint(capsys, copy, monkeypatch):
    """``lowbit export . --format F`` inside a checkpoint used to write ``./.-F`` into it; the default
    --out is now named after the resolved checkpoint and lies beside it."""
    monkeypatch.chdir(copy)
    before = tree_digest(copy)
    code, out, err = run(capsys, "export", ".", "--format", "lowbit")
    assert code == 0, err
    assert tree_digest(copy) == before and (copy.parent / "lowbit-lowbit" / "lowbit.json").is_file()


# ------------------------------------------------------------------ 2. non-finite values
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nan_in_a_source_layer_norm_stops_quantize(capsys, model, tmp_path, method):
    name = "model.layers.1.input_layernorm.weight"
    set_tensor(model, name, lambda t: t.__setitem__(3, float("nan")))
    before, parent = tree_digest(model), sorted(os.listdir(tmp_path))
    code, _, err = run(capsys, "quantize", model, "--method", method, "--nsamples", "4", "--seqlen", "64",
                       "--out", tmp_path / "o", "--group-size", "32", "--no-progress")
    refused(code, err, name, "NaN or infinite")
    assert tree_digest(model) == before
    assert sorted(os.listdir(tmp_path)) == parent  # no output, and no work directory of layer 0 left either


def test_inf_in_an_lm_head_read_only_when_written_stops_quantize(capsys, model, tmp_path):
    """RTN never reads the lm_head before writing it (row chunks, straight to the checkpoint): each
    chunk is checked as it is read, and the half-written output goes."""
    set_tensor(model, "lm_head.weight", lambda t: t.__setitem__((5, 7), float("inf")))
    parent = sorted(os.listdir(tmp_path))
    code, _, err = run(capsys, "quantize", model, "--out", tmp_path / "o", "--group-size", "32", "--no-progress")
    refused(code, err, "lm_head.weight")
    assert sorted(os.listdir(tmp_path)) == parent


def test_activations_that_overflow_stop_the_pass_naming_the_layer(capsys, model, tmp_path):
    """Finite weights can still give infinite activations (here a down projection of 3e38 in layer 0):
    the pass names the layer instead of fitting GPTQ to infinities."""
    set_tensor(model, "model.layers.0.mlp.down_proj.weight", lambda t: t.fill_(3e38))
    parent = sorted(os.listdir(tmp_path))
    code, _, err = run(capsys, "quantize", model, "--method", "gptq", "--nsamples", "4", "--seqlen", "64",
                       "--out", tmp_path / "o", "--group-size", "32", "--no-progress")
    refused(code, err, "calibration activations", "layer 0")
    assert sorted(os.listdir(tmp_path)) == parent


def test_eval_ppl_refuses_a_checkpoint_with_a_nan_norm(capsys, ckpt, tmp_path):
    """A checkpoint whose hashes are right but whose float tensors hold NaN (written by a lowbit that did
    not check, or any foreign format): eval stops naming the tensor instead of printing nan."""
    from lowbit.checkpoint import LowbitCheckpoint

    qm = LowbitCheckpoint().read(ckpt)
    qm.float_tensors["model.norm.weight"] = qm.float_tensors["model.norm.weight"].clone()
    qm.float_tensors["model.norm.weight"][0] = float("nan")
    (tmp_path / "nan").mkdir()
    LowbitCheckpoint().write(qm, tmp_path / "nan")
    before = tree_digest(tmp_path / "nan")
    code, out, err = run(capsys, "eval", "ppl", tmp_path / "nan", "--windows", "1", "--seqlen", "64",
                         "--no-baseline", "--no-progress")
    refused(code, err, "model.norm.weight", "NaN or infinite")
    assert "nan" not in out and tree_digest(tmp_path / "nan") == before


def test_eval_ppl_refuses_a_nan_baseline(capsys, ckpt, model):
    set_tensor(model, "model.norm.weight", lambda t: t.__setitem__(0, float("nan")))
    code, out, err = run(capsys, "eval", "ppl", ckpt, "--windows", "1", "--seqlen", "64", "--baseline", model,
                         "--no-progress")
    refused(code, err, "model.norm.weight")
    assert "nan" not in out


def test_perplexity_of_non_finite_logits_is_an_error():
    """The last guard: whatever produced them, NaN logits never become a reported perplexity."""
    from types import SimpleNamespace

    from lowbit.run.evaluate import perplexity

    class NanModel:
        config = SimpleNamespace(max_position_embeddings=64)

        def __call__(self, ids, use_cache=False):
            return SimpleNamespace(logits=torch.full((1, ids.shape[1], 10), float("nan")))

    with pytest.raises(LowbitError, match="non-finite loss"):
        perplexity(NanModel(), windows=torch.zeros(2, 8, dtype=torch.long), seqlen=8, progress=False)


def test_is_finite_scans_without_copies_and_sees_overflowing_sums():
    from lowbit.finite import is_finite

    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # its float16 sum overflows; every value is finite
    assert is_finite(big)
    big[-1] = float("-inf")
    assert not is_finite(big)
    t = torch.randn(64, 64)
    t[63, 1] = float("nan")
    assert not is_finite(t.t()) and not is_finite(t) and is_finite(torch.randn(64, 64).t())
    assert is_finite(torch.tensor([], dtype=torch.float32)) and is_finite(torch.tensor([1, 2]))


# ------------------------------------------------------------------ 3. implausible config sizes
@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", 10**9, "config.json and the weights disagree"),
    ("vocab_size", 10**9, "config.json and the weights disagree"),
    ("intermediate_size", 10**9, "config.json and the weights disagree"),
    ("num_hidden_layers", 10**9, "decoder layers but its files hold"),
])
def test_implausible_input_model_config_is_one_line_before_any_allocation(capsys, model, tmp_path, field, value,
                                                                          message):
    edit_config(model, **{field: value})
    before = tree_digest(model)
    with bounded(60, extra_bytes=2 * 1024**3):  # a terabyte allocation would fail here instead of being refused
        code, _, err = run(capsys, "quantize", model, "--out", tmp_path / "o", "--group-size", "32", "--no-progress")
    refused(code, err, message)
    assert tree_digest(model) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["eval", "ppl", "--windows", "1", "--seqlen", "64", "--no-baseline"],
                                     ["generate", "--max-new-tokens", "2"]])
@pytest.mark.parametrize("field,value", [("hidden_size", 10**9), ("num_hidden_layers", 10**9)])
def test_implausible_checkpoint_config_is_one_line_before_any_allocation(capsys, copy, command, field, value):
    edit_config(copy, **{field: value})
    before = tree_digest(copy)
    argv = [command[0], copy, "hi", *command[1:]] if command[0] == "generate" else [*command[:2], copy, *command[2:]]
    with bounded(60, extra_bytes=2 * 1024**3):
        code, _, err = run(capsys, *argv)
    refused(code, err, "the checkpoint")
    assert tree_digest(copy) == before


def test_a_model_larger_than_the_memory_left_is_refused_up_front(capsys, ckpt, model, tmp_path, monkeypatch):
    import lowbit.limits

    monkeypatch.setattr(lowbit.limits, "available_memory", lambda: 64 * 1024)
    code, _, err = run(capsys, "eval", "ppl", ckpt, "--windows", "1", "--seqlen", "64", "--no-baseline")
    refused(code, err, "of memory", "is available here")
    code, _, err = run(capsys, "quantize", model, "--out", tmp_path / "o", "--group-size", "32", "--no-progress")
    refused(code, err, "of memory", "is available here")
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_calibration_larger_than_memory_is_refused(capsys, model, tmp_path, monkeypatch):
    import lowbit.limits

    room = 200 * 1024**2
    monkeypatch.setattr(lowbit.limits, "available_memory", lambda: room)
    code, _, err = run(capsys, "quantize", model, "--method", "gptq", "--nsamples", "100000", "--seqlen", "512",
                       "--out", tmp_path / "o", "--group-size", "32", "--no-progress")
    refused(code, err, "--nsamples 100000", "Pass a smaller --nsamples or --seqlen")
    assert sorted(os.listdir(tmp_path)) == ["m"]


# ------------------------------------------------------------------ 4. the issue's argument cases
def _text(kind: str, tmp_path):
    p = tmp_path / f"text-{kind}"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "blank":
        p.write_text(" \n\t\n")
    elif kind == "binary":
        p.write_bytes(bytes(range(256)) * 4)
    elif kind == "latin1":
        p.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    elif kind == "directory":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "missing":
        pass
    elif kind == "dev-zero":
        return "/dev/zero"
    return p


TEXTS = {"empty": "is empty", "blank": "only whitespace", "binary": "is binary", "latin1": "is not UTF-8 text",
         "directory": "is a directory", "fifo": "is not a regular file", "missing": "no such file",
         "dev-zero": "is not a regular file"}


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_eval_text_that_is_not_text(capsys, ckpt, tmp_path, kind):
    text = _text(kind, tmp_path)
    before = tree_digest(ckpt)
    with bounded(60):  # a FIFO or /dev/zero must not be opened and read
        code, _, err = run(capsys, "eval", "ppl", ckpt, "--text", text, "--no-baseline", "--no-progress")
    refused(code, err, "--text", TEXTS[kind])
    assert tree_digest(ckpt) == before


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_calibration_text_that_is_not_text(capsys, model, tmp_path, kind):
    text = _text(kind, tmp_path)
    with bounded(60):
        code, _, err = run(capsys, "quantize", model, "--method", "gptq", "--calib", text, "--out", tmp_path / "o",
                           "--group-size", "32", "--no-progress")
    refused(code, err, TEXTS[kind] if kind != "missing" else "neither a built-in")
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.work").exists()


@pytest.mark.parametrize("argv,message", [
    (["quantize", "{model}", "--batch-size", "0"], "argument --batch-size: must be a whole number of at least 1"),
    (["quantize", "{model}", "--nsamples", "-3"], "argument --nsamples"),
    (["quantize", "{model}", "--seqlen", "0"], "argument --seqlen"),
    (["quantize", "{model}", "--group-size", "0"], "argument --group-size"),
    (["quantize", "{model}", "--damp", "nan"], "argument --damp: must be a finite number"),
    (["quantize", "{model}", "--block-size", "0"], "argument --block-size"),
    (["quantize", "{model}", "--awq-grid", "0"], "argument --awq-grid"),
    (["quantize", "{model}", "--awq-grid", "10000000000000"], "argument --awq-grid: must be a whole number from 2 to 1000"),
    (["eval", "ppl", "{ckpt}", "--windows", "0"], "argument --windows"),
    (["eval", "ppl", "{ckpt}", "--seqlen", "1"], "argument --seqlen: must be a whole number of at least 2"),
    (["generate", "{ckpt}", "hi", "--max-new-tokens", "-1"], "argument --max-new-tokens"),
    (["generate", "{ckpt}", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["generate", "{ckpt}", "hi", "--temperature", "-1"], "argument --temperature"),
    (["generate", "{ckpt}", "hi", "--top-p", "0"], "argument --top-p"),
    (["generate", "{ckpt}", "hi", "--top-p", "inf"], "argument --top-p"),
    (["kernels", "--in-features", "0", "--bits", "4"], "argument --in-features"),
    (["chat", "{ckpt}", "--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["chat", "{ckpt}", "--seed", "-1"], "argument --seed"),
    (["bench", "--kernels", "--repeat", "0"], "argument --repeat"),
    (["bench", "--kernels", "--threads", "0"], "argument --threads"),
    (["bench", "{ckpt}", "--ppl-seqlen", "1"], "argument --ppl-seqlen"),
    (["bench", "--kernels", "--threads", "100000"], "argument --threads: must be a whole number from 1 to"),
    (["generate", "{ckpt}", "hi", "--temperature", "1e-300"], "argument --temperature: must be 0 (greedy) or at least"),
    (["chat", "{ckpt}", "--temperature", "nan"], "argument --temperature"),
    (["kernels", "--device", "x"], "argument --device: 'x' is not a device"),
    (["quantize", "{model}", "--device", "nope:0"], "argument --device"),
])
def test_out_of_range_numbers_are_usage_errors(capsys, ckpt, model, argv, message):
    before = tree_digest(ckpt)
    code, out, err = run(capsys, *[a.format(model=model, ckpt=ckpt) for a in argv])
    refused(code, err, message)
    assert not out and tree_digest(ckpt) == before


def test_generate_raw_with_an_empty_prompt(capsys, ckpt):
    code, _, err = run(capsys, "generate", ckpt, "", "--raw")
    refused(code, err, "the prompt is empty")


def test_generate_past_the_context(capsys, ckpt):
    code, _, err = run(capsys, "generate", ckpt, "hi", "--max-new-tokens", "100000000")
    refused(code, err, "exceeds the model's context of 512 tokens")


@pytest.mark.parametrize("command", ["quantize", "export"])
@pytest.mark.parametrize("length,message", [
    (250, "lowbit adds up to 22 to the output's name"),  # fits alone, not with lowbit's .NAME.tmp-PID-XXXXXXXX
    (256, "argument --out: a name of 256 bytes"),  # no file system name holds it: a usage error
    (5000, "argument --out: a path of"),
])
def test_out_name_longer_than_the_file_system_allows(capsys, ckpt, model, tmp_path, command, length, message):
    out = tmp_path / ("x" * length)
    argv = (["quantize", model, "--group-size", "32", "--no-progress"] if command == "quantize"
            else ["export", ckpt, "--format", "lowbit"])
    parent = sorted(os.listdir(tmp_path))
    code, _, err = run(capsys, *argv, "--out", out)
    refused(code, err, message)
    assert sorted(os.listdir(tmp_path)) == parent


@pytest.mark.parametrize("flag", ["--text", "--baseline", "checkpoint"])
def test_input_paths_no_file_system_holds_are_usage_errors(capsys, ckpt, flag):
    long = "y" * 300
    argv = ["eval", "ppl", ckpt, flag, long] if flag != "checkpoint" else ["eval", "ppl", long]
    code, _, err = run(capsys, *argv)
    refused(code, err, f"argument {flag}: a name of 300 bytes")


def test_a_deep_out_path_longer_than_path_max(capsys, ckpt, tmp_path):
    out = tmp_path.joinpath(*["d" * 200] * 25)
    code, _, err = run(capsys, "export", ckpt, "--format", "lowbit", "--out", out)
    refused(code, err, "argument --out: a path of")
    assert not (tmp_path / ("d" * 200)).exists()


def test_usage_errors_return_a_status_in_process(capsys):
    assert main(["--version"]) == 0
    assert main(["quantize", "--bits", "x"]) == 2


def test_dump_awq_onto_a_directory_is_refused_before_any_work(capsys, model, tmp_path):
    (tmp_path / "d").mkdir()
    parent = sorted(os.listdir(tmp_path))
    code, _, err = run(capsys, "quantize", model, "--method", "awq", "--dump-awq", tmp_path / "d", "--out",
                       tmp_path / "o", "--nsamples", "2", "--seqlen", "32", "--group-size", "32", "--no-progress")
    refused(code, err, "--dump-awq", "is not a regular file")
    assert sorted(os.listdir(tmp_path)) == parent


def test_overwrite_never_replaces_a_file(capsys, ckpt, tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_text("keep me")
    code, _, err = run(capsys, "export", ckpt, "--format", "lowbit", "--out", victim, "--overwrite")
    refused(code, err, "is not a directory")
    assert victim.read_text() == "keep me"


def test_kernel_benchmark_larger_than_memory_is_refused(capsys):
    code, _, err = run(capsys, "bench", "--kernels", "--shapes", "100000x100000", "--group-size", "32", "--batches",
                       "1", "--repeat", "1")
    refused(code, err, "the kernel benchmark of 100000x100000", "of memory")


@pytest.mark.parametrize("kind", ["same", "parent"])
def test_the_issue_export_gptq_v2_onto_its_own_checkpoint(capsys, copy, tmp_path, kind):
    """The issue's first case as it was filed (needs lowbit-exporters for gptq-v2)."""
    pytest.importorskip("lowbit_exporters")
    out = copy if kind == "same" else copy.parent
    before = tree_digest(copy)
    code, _, err = run(capsys, "export", copy, "--format", "gptq-v2", "--out", out, "--overwrite")
    refused(code, err, "the checkpoint")
    assert tree_digest(copy) == before
