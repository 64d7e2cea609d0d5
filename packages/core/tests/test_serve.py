"""`lowbit serve`: the real server process on 127.0.0.1, spoken to with the official ``openai`` client.

The answers are checked against lowbit's own runtime generating in this process (greedy, same dtype),
so a server that garbles, truncates or interleaves replies fails. The queue and client disconnects
are checked on an in-process uvicorn with a generation function that waits on the test, so that
those cases do not depend on timing.

Needs ``lowbit[serve]`` and ``openai``; skipped without them unless ``LOWBIT_TEST_EXTRAS=1`` (the
``serve-eval`` tox env), where a missing package fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest


def _need(name: str):
    if os.environ.get("LOWBIT_TEST_EXTRAS"):
        return __import__(name)
    return pytest.importorskip(name)


openai = _need("openai")
httpx = _need("httpx")
_need("fastapi")
uvicorn = _need("uvicorn")

STARTUP_S = 240  # import torch + transformers and build the model on a busy 2-core box
KEY = "test-key-123"
NAME = "tiny"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def templated_ckpt(ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint with a chat template added to its tokenizer (the tiny tokenizer has none)."""
    import shutil

    out = tmp_path_factory.mktemp("serve") / "lowbit"
    shutil.copytree(ckpt, out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return out


class Server:
    """``lowbit serve`` in a child process; ``url`` once it listens."""

    def __init__(self, *argv: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env.pop("LOWBIT_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        deadline = time.monotonic() + STARTUP_S
        self.url = None
        while self.url is None:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"lowbit serve exited: {''.join(self.lines)}")
            self.lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
            if time.monotonic() > deadline:
                raise AssertionError(f"lowbit serve did not start: {''.join(self.lines)}")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def server(templated_ckpt):
    s = Server(str(templated_ckpt), "--port", "0", "--model-name", NAME, "--api-key", KEY, "--max-tokens", "64",
               "--dtype", "bf16")
    yield s
    rc = s.stop()
    assert rc == 0, "".join(s.lines)
    assert "Traceback" not in "".join(s.lines), "".join(s.lines)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(templated_ckpt):
    """lowbit's runtime in this process: what the server must answer, token for token."""
    from lowbit.run.chat import _eos_ids, generate_reply
    from lowbit.run.engine import load_runner

    model = load_runner(str(templated_ckpt), "bf16")  # the runtime the server picks (native where it can)
    qm = model.qm
    eos = _eos_ids(qm, qm.tokenizer)

    def chat(messages, max_tokens):
        ids = qm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return len(ids), generate_reply(model, qm.tokenizer, ids, max_new_tokens=max_tokens, eos=eos)

    def complete(prompt, max_tokens):
        ids = list(qm.tokenizer(prompt).input_ids)
        return len(ids), generate_reply(model, qm.tokenizer, ids, max_new_tokens=max_tokens, eos=eos)

    return chat, complete


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the history of Valkyria?"}]


def test_models_lists_the_one_model(client, server):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    assert "127.0.0.1" in server.url  # the default bind is this machine only


def test_chat_completion_matches_the_local_runtime(client, local):
    n_prompt, want = local[0](MSGS, 12)
    r = client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == NAME
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, want.tokens)
    assert r.usage.total_tokens == n_prompt + want.tokens


def test_chat_streaming_sends_the_same_text_in_pieces(client, local):
    _, want = local[0](MSGS, 12)
    stream = client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1, "the reply came in one piece: not streamed"
    assert "".join(pieces) == want.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.tokens


def test_completions_plain_and_streamed(client, local):
    prompt = "The game began development in"
    n_prompt, want = local[1](prompt, 10)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == want.tokens
    pieces = [c.choices[0].text for c in client.completions.create(model=NAME, prompt=prompt, max_tokens=10,
                                                                      temperature=0, stream=True)]
    assert "".join(pieces) == want.text and len([p for p in pieces if p]) > 1


def test_stop_string_ends_the_reply_before_it(client, local):
    prompt = "The game began development in"
    _, full = local[1](prompt, 24)
    stop = full.text[len(full.text) // 2:][:2]
    assert stop.strip(), f"no usable stop string in {full.text!r}"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == full.text[: full.text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats(client):
    kw = dict(model=NAME, messages=MSGS, max_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_four_concurrent_streams_each_get_their_own_reply(client, local):
    """Four clients at once: each must get exactly what it gets alone (replies mixed into one KV
    cache or one stream would differ), and all four must finish."""
    prompts = ["The history of", "In 1998 the", "Valkyria Chronicles is", "A tropical storm"]
    want = [local[1](p, 16)[1].text for p in prompts]

    def one(p):
        s = client.completions.create(model=NAME, prompt=p, max_tokens=16, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in s)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one, prompts, timeout=300))
    assert got == want


@pytest.mark.parametrize("case", ["no key", "wrong key"])
def test_the_api_key_is_required(server, case):
    headers = {} if case == "no key" else {"Authorization": "Bearer nope"}
    r = httpx.get(f"{server.url}/models", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="nope", max_retries=0).models.list()


def _post(server, path, content, **headers):
    return httpx.post(f"{server.url}{path}", content=content, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers})


LONG = " ".join(["The history of the game and its development"] * 200)  # well over the 512-token context


@pytest.mark.parametrize("path,body,status,param", [
    ("/chat/completions", '{"model": "tiny", "messages": [', 400, None),
    ("/chat/completions", '["not", "an", "object"]', 400, None),
    ("/chat/completions", {"model": "gpt-4o", "messages": MSGS}, 404, "model"),
    ("/chat/completions", {"messages": MSGS}, 404, "model"),
    ("/chat/completions", {"model": NAME, "messages": MSGS, "max_tokens": -5}, 400, "max_tokens"),
    ("/chat/completions", {"model": NAME, "messages": MSGS, "max_tokens": 0}, 400, "max_tokens"),
    ("/chat/completions", {"model": NAME, "messages": MSGS, "max_tokens": 10**12}, 400, "max_tokens"),
    ("/chat/completions", {"model": NAME, "messages": MSGS, "max_completion_tokens": 65}, 400, "max_completion_tokens"),
    ("/chat/completions", {"model": NAME, "messages": MSGS, "max_tokens": "ten"}, 400, "max_tokens"),
    ("/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/chat/completions", {"model": NAME, "messages": MSGS, "n": 2}, 400, "n"),
    ("/chat/completions", {"model": NAME, "messages": MSGS, "temperature": 5}, 400, "temperature"),
    ("/chat/completions", {"model": NAME, "messages": MSGS, "stop": 3}, 400, "stop"),
    ("/completions", {"model": NAME, "prompt": LONG}, 400, "prompt"),
    ("/completions", {"model": NAME, "prompt": [5] * 500, "max_tokens": 20}, 400, "max_tokens"),
    ("/completions", {"model": NAME, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/completions", {"model": NAME, "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/completions", {"model": NAME, "prompt": "Hi", "logprobs": 3}, 400, "logprobs"),
])
def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(server, client, path, body, status, param):
    r = _post(server, path, body if isinstance(body, str) else json.dumps(body))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param
    if isinstance(body, dict) and (LONG in json.dumps(body) or body.get("prompt") == [5] * 500):
        assert err["code"] == "context_length_exceeded", err
    ok = client.completions.create(model=NAME, prompt="Hi", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_over_long_prompt_says_context_length(server):
    r = _post(server, "/completions", json.dumps({"model": NAME, "prompt": LONG}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "512" in r.json()["error"]["message"]


def test_huge_body_is_refused_before_it_is_read(server):
    r = _post(server, "/completions", b"x" * (5 << 20))
    assert r.status_code == 413 and "error" in r.json()


def test_unknown_route_and_method_are_json_errors(server):
    assert httpx.get(f"{server.url}/nothing", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    r = httpx.get(f"{server.url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_raises_the_documented_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=-1)


# ------------------------------------------------------------------- the CLI's own refusals
@pytest.mark.parametrize("argv,msg", [
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--port", "70000"], "--port must be between 0 and 65535"),
    (["--api-key", ""], "--api-key is empty"),
])
def test_bad_cli_input_is_one_line_and_exit_2(ckpt, argv, msg):
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "serve", str(ckpt), *argv], capture_output=True, text=True,
                       timeout=STARTUP_S)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_taken_port_is_reported_before_loading(ckpt):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "lowbit.cli", "serve", str(ckpt), "--port", str(port)],
                           capture_output=True, text=True, timeout=STARTUP_S)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr


# ------------------------------------------------------------------- queue and disconnects, in process
class Gate:
    """A generation function that emits one token per ``step()`` of the test and records overlap."""

    def __init__(self):
        self.running = 0
        self.most = 0
        self.calls = []
        self.cancelled = []
        self.lock = threading.Lock()
        self.sem = threading.Semaphore(0)

    def step(self, n: int = 1):
        for _ in range(n):
            self.sem.release()

    def __call__(self, model, tokenizer, ids, *, max_new_tokens, temperature, top_p, stop, eos, on_text):
        from lowbit.run.chat import Reply

        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls.append(list(ids))
        try:
            for i in range(max_new_tokens):
                if not self.sem.acquire(timeout=30):
                    raise RuntimeError("the test never released this token")
                on_text(f"t{i} ")
            return Reply("".join(f"t{i} " for i in range(max_new_tokens)), max_new_tokens, "length")
        except BaseException:
            self.cancelled.append(list(ids))
            raise
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def gated(ckpt):
    import socket

    from lowbit.exporting import read_checkpoint
    from lowbit.run.serve import Engine, create_app

    gate = Gate()
    engine = Engine(read_checkpoint(str(ckpt)), None, NAME, max_tokens=8, max_queue=2, generate=gate)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield gate, f"http://127.0.0.1:{sock.getsockname()[1]}/v1", engine
    gate.step(1000)
    server.should_exit = True
    thread.join(30)
    engine.close()
    sock.close()


def _wait(cond, timeout=120):  # a liveness wait: generous for a loaded machine (a first use builds the native library)
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_requests_queue_one_at_a_time_and_a_full_queue_is_503(gated):
    gate, url, engine = gated
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 3}
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(httpx.post, f"{url}/completions", json=dict(body, prompt=f"p{i}"), timeout=60)
                for i in range(3)]  # one runs, two wait: the queue holds 2
        _wait(lambda: gate.running == 1 and engine.jobs.qsize() == 2)
        full = httpx.post(f"{url}/completions", json=body, timeout=60)
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        full = httpx.post(f"{url}/chat/completions", json={"model": NAME, "stream": True,
                                                           "messages": [{"role": "user", "content": "Hi"}]}, timeout=60)
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"  # before the stream starts
        gate.step(9)
        results = [f.result() for f in futs]
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(r.json()["choices"][0]["text"] == "t0 t1 t2 " for r in results)
    assert gate.most == 1 and len(gate.calls) == 3  # never two generations at once


def test_a_client_that_disconnects_stops_its_generation(gated):
    gate, url, engine = gated
    with httpx.stream("POST", f"{url}/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 8,
                                                         "stream": True}, timeout=60) as r:
        gate.step(1)
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["choices"][0]["text"] == "t0 "
    # the server notices the client is gone when it next writes: release tokens one by one until the
    # generation is stopped, well before its 8 tokens
    for _ in range(6):
        if gate.cancelled:
            break
        gate.step(1)
        time.sleep(0.3)
    _wait(lambda: gate.cancelled and gate.running == 0)
    gate.step(2)
    r = httpx.post(f"{url}/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "t0 t1 "


def test_a_client_that_disconnects_from_a_plain_request_stops_its_generation(gated):
    """Not streamed: nothing is written until the reply is whole, so the server watches the connection. A
    running generation stops at its next piece of text; a queued one never starts."""
    gate, url, engine = gated
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 8}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, f"{url}/completions", json=dict(body, prompt="running"), timeout=2)
        _wait(lambda: gate.running == 1)
        queued = pool.submit(httpx.post, f"{url}/completions", json=dict(body, prompt="queued"), timeout=2)
        _wait(lambda: engine.jobs.qsize() == 1)
        for fut in (running, queued):  # both clients give up, with the first generation still waiting on the test
            with pytest.raises(httpx.TimeoutException):
                fut.result()
    _wait(lambda: engine.jobs.queue[0].cancelled)  # the server has seen the queued request's client go
    gate.step(1)
    _wait(lambda: gate.cancelled and gate.running == 0)
    assert len(gate.calls) == 1 and len(gate.calls[0]) == len(gate.cancelled[0])  # the queued job never ran
    gate.step(2)
    r = httpx.post(f"{url}/completions", json=dict(body, max_tokens=2), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "t0 t1 "
    assert len(gate.calls) == 2


def test_fallback_transcript_without_a_chat_template(ckpt):
    """A tokenizer without a chat template gets lowbit chat's User:/Assistant: transcript, with the
    system messages first and a stop string at the next 'User:' turn."""
    from lowbit.exporting import read_checkpoint
    from lowbit.run.chat import FALLBACK_STOP
    from lowbit.run.serve import Engine

    qm = read_checkpoint(str(ckpt))
    engine = Engine(qm, None, NAME, generate=Gate())
    ids, stops = engine.chat_ids([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."},
                                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert stops == [FALLBACK_STOP]
    assert qm.tokenizer.decode(ids) == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
    engine.close()
