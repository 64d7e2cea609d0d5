"""Killed runs (issue 21): ``lowbit quantize`` and ``lowbit export`` in a subprocess, stopped with
SIGKILL or SIGINT mid-calibration, mid-write, just before and between the final renames; two runs
into one --out; a disk that fills up. Afterwards the output is absent or complete and verifiable,
nothing is left beside it (after a SIGKILL: once the next run into the same --out has cleaned up),
and a rerun succeeds. A run pauses where a test wants it through ``LOWBIT_TEST_PAUSE``
(:func:`lowbit.io.fault_point`), so every point is hit exactly, not by timing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lowbit import pipeline
from lowbit.cli import main
from lowbit.scheme import QuantScheme
from lowbit.testing.models import save_tiny_llama

QUANTIZE = ["--method", "gptq", "--nsamples", "8", "--seqlen", "64", "--batch-size", "4", "--group-size", "32",
            "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("ckpt") / "q"
    pipeline.quantize(str(tiny), method="rtn", scheme=QuantScheme(4, 32), out=out, progress=False)
    return out / "lowbit"


def lowbit(*argv, pause: str | None = None, env: dict | None = None) -> subprocess.Popen:
    e = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    e.pop("LOWBIT_TEST_PAUSE", None)
    if pause:
        e["LOWBIT_TEST_PAUSE"] = pause
    return subprocess.Popen([sys.executable, "-m", "lowbit.cli", *map(str, argv)], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_pause(proc: subprocess.Popen, point: str, timeout: float = 120) -> None:
    """Read the run's stderr until it announces that it waits at ``point``."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(f"lowbit-test-pause: {point} "):
            return
    proc.kill()
    raise AssertionError(f"the run never reached {point}: {''.join(seen)[-2000:]}")


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def listing(d) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def verify(capsys, path) -> None:
    assert main(["verify", str(path)]) == 0
    capsys.readouterr()


def complete_quantize_run(capsys, tiny, out):
    code, err = finish(lowbit("quantize", tiny, "--out", out, *QUANTIZE))
    assert code == 0, err
    verify(capsys, out / "lowbit")


def complete_export_run(capsys, ckpt, out, *extra):
    code, err = finish(lowbit("export", ckpt, "--format", "gptq-v2", "--out", out, *extra))
    assert code == 0, err
    verify(capsys, out)


# ------------------------------------------------------------------------------------ SIGKILL
KILLS = [
    ("quantize", "layer"),  # after calibrating layer 0 of 2
    ("export", "tensors-written"),  # the safetensors written, config and tokenizer not yet
    pytest.param("quantize", "before-rename", marks=pytest.mark.slow),  # everything written, not renamed
]


@pytest.mark.parametrize("cmd, point", KILLS)
def test_sigkill_leaves_no_output_and_the_next_run_cleans_up(capsys, tiny, ckpt, tmp_path, cmd, point):
    out = tmp_path / "out"
    argv = ("quantize", tiny, "--out", out, *QUANTIZE) if cmd == "quantize" else \
        ("export", ckpt, "--format", "gptq-v2", "--out", out)
    proc = lowbit(*argv, pause=point)
    wait_for_pause(proc, point)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    left = listing(tmp_path)
    assert ".out.lock" in left  # its flock died with it; the file is left for the next run
    assert any(n.startswith(f".out.tmp-{proc.pid}-") for n in left) == (point != "layer")  # layer: nothing written yet
    assert (".out.work" in left) == (cmd == "quantize")  # finished layers, kept for --resume
    (complete_quantize_run if cmd == "quantize" else complete_export_run)(capsys, tiny if cmd == "quantize" else ckpt, out)
    assert listing(tmp_path) == ["out"]


def test_sigkill_then_resume_gives_the_same_bits(capsys, tiny, tmp_path):
    """SIGKILLed after its first layer, a quantize run continues with --resume from the second layer
    and writes exactly what an uninterrupted run writes."""
    import json

    whole = tmp_path / "whole"
    complete_quantize_run(capsys, tiny, whole)
    out = tmp_path / "out"
    proc = lowbit("quantize", tiny, "--out", out, *QUANTIZE, pause="layer")
    wait_for_pause(proc, "layer")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and (tmp_path / ".out.work" / "state.json").is_file()
    code, err = finish(lowbit("quantize", tiny, "--out", out, *QUANTIZE, "--resume"))
    assert code == 0 and "resuming at layer 1 of 2" in err, err
    verify(capsys, out / "lowbit")
    hashes = [json.loads((d / "lowbit" / "lowbit.json").read_text()) for d in (whole, out)]
    assert hashes[0]["tensor_hash"] == hashes[1]["tensor_hash"] and hashes[0]["float_hash"] == hashes[1]["float_hash"]
    assert listing(tmp_path) == ["out", "whole"]


def test_sigkill_between_the_renames_of_an_overwrite(capsys, ckpt, tmp_path):
    """--overwrite renames the old output aside, then the new one in: killed in between, the output
    is absent (the user asked to replace it) and the next run removes both leftovers."""
    out = tmp_path / "out"
    complete_export_run(capsys, ckpt, out)
    proc = lowbit("export", ckpt, "--format", "gptq-v2", "--out", out, "--overwrite", pause="swap")
    wait_for_pause(proc, "swap")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and f".out.old-{proc.pid}" in listing(tmp_path)
    complete_export_run(capsys, ckpt, out, "--overwrite")
    assert listing(tmp_path) == ["out"]


# ------------------------------------------------------------------------------------ SIGINT
INTERRUPTS = [
    ("quantize", "layer", signal.SIGINT),
    ("export", "before-rename", signal.SIGINT),
    ("export", "tensors-written", signal.SIGTERM),  # a scheduler stopping the job: unwound like Ctrl-C
    pytest.param("quantize", "tensors-written", signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("export", "swap", signal.SIGINT, marks=pytest.mark.slow),  # held back until both renames are done
]
EXPECTED = {signal.SIGINT: (130, "lowbit: interrupted; no partial output was left behind"),
            signal.SIGTERM: (143, "lowbit: terminated (SIGTERM); no partial output was left behind")}


@pytest.mark.parametrize("cmd, point, sig", INTERRUPTS)
def test_sigint_or_sigterm_is_one_line_and_leaves_nothing(capsys, tiny, ckpt, tmp_path, cmd, point, sig):
    out = tmp_path / "out"
    extra = ()
    if point == "swap":
        complete_export_run(capsys, ckpt, out)
        extra = ("--overwrite",)
    argv = ("quantize", tiny, "--out", out, *QUANTIZE) if cmd == "quantize" else \
        ("export", ckpt, "--format", "gptq-v2", "--out", out, *extra)
    # at "swap" the SIGINT is deferred until both renames are done: let the pause end soon
    proc = lowbit(*argv, pause=point, env={"LOWBIT_TEST_PAUSE_SECONDS": "2"} if point == "swap" else None)
    wait_for_pause(proc, point)
    proc.send_signal(sig)
    code, err = finish(proc)
    expected_code, expected_line = EXPECTED[sig]
    if cmd == "quantize":  # the finished layers stay for --resume, and the line says where
        expected_line += f" (finished layers are kept in {tmp_path / '.out.work'}: rerun with --resume to continue)"
    assert (code, err.strip()) == (expected_code, expected_line), err
    if point == "swap":  # SIGINT waited for the swap: the new output is complete
        verify(capsys, out)
        assert listing(tmp_path) == ["out"]
    else:
        assert listing(tmp_path) == ([".out.work"] if cmd == "quantize" else [])


# ------------------------------------------------------------------------------------ concurrency
def test_two_runs_into_one_out_one_wins(capsys, tiny, ckpt, tmp_path):
    out = tmp_path / "out"
    resume = tmp_path / "resume"
    first = lowbit("quantize", tiny, "--out", out, *QUANTIZE, pause="layer", env={"LOWBIT_TEST_RESUME": str(resume)})
    wait_for_pause(first, "layer")
    for argv in (("export", ckpt, "--format", "gptq-v2", "--out", out),
                 ("quantize", tiny, "--out", out, "--overwrite", *QUANTIZE)):
        code, err = finish(lowbit(*argv))
        assert code == 2 and err.count("\n") == 1 and f"another lowbit run (pid {first.pid}) is writing" in err, err
    resume.write_text("")
    code, err = finish(first)
    assert code == 0, err
    resume.unlink()
    verify(capsys, out / "lowbit")
    assert listing(tmp_path) == ["out"]
    assert listing(out) == ["lowbit"]  # the first run's output alone, no mixture


# ------------------------------------------------------------------------------------ full disk
def test_full_disk_on_a_small_tmpfs(ckpt, tmp_path):
    """A real ENOSPC: a 256 KiB tmpfs mounted in a private user+mount namespace (skipped where
    unprivileged namespaces are off; the injected ENOSPC tests in packages/core cover it there)."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=256k tmpfs {mnt}"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    script = (f"mount -t tmpfs -o size=256k tmpfs {mnt} && {sys.executable} -m lowbit.cli export {ckpt} "
              f"--format gptq-v2 --out {mnt}/out; echo rc=$?; ls -A {mnt}")
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert "rc=2" in res.stdout, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "rc=2"  # nothing left on the tmpfs
    err = res.stderr.strip()
    assert err.count("\n") == 0 and "No space left on device" in err and "nothing was written" in err, err
