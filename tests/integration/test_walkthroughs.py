"""Every command of docs/walkthroughs.md, in order, on a tiny llama instead of the demo model.

The commands run as written except: the tiny model's directory is passed where the demo model is
implied, calibration shrinks to 8 x 64 tokens, evaluation to one 64-token window, and ``out/`` is
a temporary directory. Chat sessions are exercised by packages/core/tests/test_chat.py.
"""

import re
import shlex
from pathlib import Path

import pytest

from lowbit.cli import build_parser, main

DOC = Path(__file__).resolve().parents[2] / "docs" / "walkthroughs.md"
COMMANDS = [shlex.split(m) for m in re.findall(r"^\$ lowbit (.+)$", DOC.read_text(encoding="utf-8"), re.M)]


def adapt(argv: list[str], model: Path, out: Path) -> list[str] | None:
    argv = [a.replace("out/", f"{out}/") if a.startswith("out/") else a for a in argv]
    cmd = argv[0]
    if cmd == "chat":
        return None
    if cmd == "quantize":
        args = build_parser().parse_args(argv)
        if args.model is None:
            argv.insert(1, str(model))
        argv += ["--nsamples", "8", "--seqlen", "64", "--no-progress"]
    if cmd == "eval":
        argv += ["--windows", "1", "--seqlen", "64", "--no-progress"]
    return argv


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lowbit.testing.models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("walk") / "tiny")


def test_walkthroughs_run_in_order(tiny, tmp_path, capsys):
    assert COMMANDS, "no commands found in walkthroughs.md"
    ran = 0
    for argv in COMMANDS:
        cmd = adapt(list(argv), tiny, tmp_path / "out")
        if cmd is None:
            continue
        code = main(cmd)
        out, err = capsys.readouterr()
        assert code == 0, f"`lowbit {shlex.join(argv)}` exited {code}: {err.strip()[-500:]}"
        ran += 1
    assert ran >= 10
