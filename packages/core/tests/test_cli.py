"""The CLI: every bad input is one clear line and exit status 2, with nothing half-written."""

import json
import subprocess
import sys

import pytest

from lowbit.cli import main
from lowbit.testing.models import save_tiny_llama


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_and_kernels_json(capsys):
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0
    rows = json.loads(out)
    assert rows[0]["name"] == "lowbit" and rows[0]["version"]
    code, out, _ = run(capsys, "kernels", "--json")
    kernels = {k["kernel"]: k for k in json.loads(out)["kernels"]}
    assert kernels["reference"]["can_run"] and kernels["reference"]["plugin"] == "lowbit"


def test_quantize_writes_checkpoint_and_json(capsys, tiny_dir, tmp_path):
    code, out, err = run(capsys, "quantize", str(tiny_dir), "--out", str(tmp_path / "q"), "--json", "--no-progress")
    assert code == 0, err
    res = json.loads(out)
    assert res["out"]["lowbit"] == str(tmp_path / "q" / "lowbit")
    assert (tmp_path / "q/lowbit/lowbit.json").exists()
    code, out, err = run(capsys, "verify", str(tmp_path / "q/lowbit"), str(tmp_path / "q/lowbit"))
    assert code == 0 and "identical" in out
    code, out, err = run(capsys, "inspect", str(tmp_path / "q/lowbit"), "--json")
    assert code == 0 and json.loads(out)["format"] == "lowbit"
    code, out, err = run(capsys, "eval", "ppl", str(tmp_path / "q/lowbit"), "--windows", "1", "--seqlen", "64",
                         "--baseline", str(tiny_dir), "--json", "--no-progress")
    assert code == 0, err
    res = json.loads(out)
    assert res["quantized"]["windows"] == 1 and res["baseline"]["ppl"] > 1
    code, out, err = run(capsys, "generate", str(tmp_path / "q/lowbit"), "Hello", "--max-new-tokens", "5", "--json")
    assert code == 0, err
    assert json.loads(out)["new_tokens"] == 5
    # several prompts: one batch, each completion the one its prompt gets alone (greedy)
    alone = []
    for prompt in ("Hello", "The capital of France is"):
        code, out, err = run(capsys, "generate", str(tmp_path / "q/lowbit"), prompt, "--max-new-tokens", "6", "--json")
        alone.append(json.loads(out)["completion"])
    code, out, err = run(capsys, "generate", str(tmp_path / "q/lowbit"), "Hello", "The capital of France is",
                         "--max-new-tokens", "6", "--json")
    assert code == 0, err
    batch = json.loads(out)
    assert [r["prompt"] for r in batch] == ["Hello", "The capital of France is"]
    assert [r["completion"] for r in batch] == alone


@pytest.fixture(scope="module")
def narrow_dir(tmp_path_factory):
    """hidden 96: group sizes 64 and 128 do not divide it (like 576 on the demo model)."""
    return save_tiny_llama(tmp_path_factory.mktemp("narrow") / "m", hidden_size=96, intermediate_size=192)


BAD = [
    (["--bits", "5"], "bits=5 is not supported; supported: 2, 3, 4, 8"),
    (["--group-size", "100"], "group_size=100 is not supported"),
    (["--group-size", "128"], "does not divide self_attn.q_proj, self_attn.k_proj, self_attn.v_proj (+3 more)'s 96 input features"),
    (["--method", "magic"], "unknown method 'magic'; known:"),
    (["--method", "rtn", "--act-order"], "act-order needs --method gptq"),
    (["--format", "nope"], "unknown exporter 'nope'; known:"),
    (["--method", "awq", "--awq-search-tokens", "0"], "argument --awq-search-tokens: must be a whole number of at least 1"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_quantize_input(capsys, narrow_dir, tmp_path, args, message):
    code, out, err = run(capsys, "quantize", str(narrow_dir), "--out", str(tmp_path / "o"), "--no-progress",
                         "--group-size", "32", *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary left behind


def test_unknown_model_and_architecture(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", str(tmp_path / "missing"), "--no-progress")
    assert code == 2 and "not found" in err
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 2}))
    code, _, err = run(capsys, "quantize", str(d), "--no-progress")
    assert code == 2 and "architecture 'gpt2' is not supported; supported: " in err and err.count("\n") == 1
    for known in ("gemma2", "llama", "mixtral", "phi3", "qwen2_moe", "qwen3_moe"):
        assert known in err
    (tmp_path / "nocfg").mkdir()
    code, _, err = run(capsys, "quantize", str(tmp_path / "nocfg"), "--no-progress")
    assert code == 2 and "no config.json" in err


def test_missing_optional_dependency(capsys, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    code, _, err = run(capsys, "quantize", str(f), "--no-progress")
    assert code == 2 and "gguf is not installed; run: pip install 'lowbit[gguf]'" in err


def test_unwritable_or_occupied_output(capsys, tiny_dir, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = run(capsys, "quantize", str(tiny_dir), "--out", str(blocker / "out"), "--no-progress")
    assert code == 2 and "is a file, not a directory" in err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("precious")
    code, _, err = run(capsys, "quantize", str(tiny_dir), "--out", str(occupied), "--no-progress")
    assert code == 2 and "--overwrite" in err
    assert (occupied / "keep.txt").read_text() == "precious"


def test_failure_while_writing_leaves_nothing(capsys, tiny_dir, tmp_path, monkeypatch):
    """A write that fails half way leaves no output and no temporary directory; the finished layers
    stay in the work directory, from which --resume completes the run without quantizing again."""
    from lowbit.checkpoint import CheckpointWriter
    from lowbit.errors import CheckpointError

    def broken(self, *args):  # the second layer's write fails, after the first was written
        if getattr(self, "_calls", 0):
            (self.out_dir / "partial.bin").write_bytes(b"half")
            raise CheckpointError("disk full (simulated)")
        original(self, *args)
        self._calls = 1

    original = CheckpointWriter.add_file
    monkeypatch.setattr(CheckpointWriter, "add_file", broken)
    code, _, err = run(capsys, "quantize", str(tiny_dir), "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 2 and "disk full" in err
    assert [p.name for p in tmp_path.iterdir()] == [".o.work"]
    monkeypatch.setattr(CheckpointWriter, "add_file", original)
    code, _, err = run(capsys, "quantize", str(tiny_dir), "--out", str(tmp_path / "o"), "--no-progress", "--resume")
    assert code == 0 and "resuming at layer 2 of 2" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert not (tmp_path / "o" / "lowbit" / "partial.bin").exists()  # the interrupted finish's debris is gone


def test_foreign_or_missing_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "ppl", str(tmp_path / "nothing"))
    assert code == 2 and "does not exist" in err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign/readme.txt").write_text("hi")
    code, _, err = run(capsys, "inspect", str(tmp_path / "foreign"))
    assert code == 2 and "is not a checkpoint lowbit can read" in err


def test_subprocess_exit_status_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", "--bits", "7"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "bits=7 is not supported" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--compute-dtype", "fp8"], "lowbit quantize: error: argument --compute-dtype: invalid choice"),
    (["quantize", "--bits", "four"], "lowbit quantize: error: argument --bits: invalid int value"),
    (["eval"], "lowbit eval: error: the following arguments are required: WHAT; see 'lowbit eval --help'"),
])
def test_usage_mistakes_are_one_line(capsys, argv, message):
    code = main(argv)  # in-process too, a usage error is a status, not a SystemExit
    out, err = capsys.readouterr()
    assert code == 2 and not out
    assert err.startswith(message) and err.count("\n") == 1 and "usage:" not in err


def test_work_directory_sits_beside_the_resolved_output(tmp_path):
    from lowbit.workdir import work_dir_for

    (tmp_path / "a").mkdir()
    assert work_dir_for(tmp_path / "a" / ".." / "o") == tmp_path / ".o.work"
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert work_dir_for(tmp_path / "link") == tmp_path / ".a.work"
