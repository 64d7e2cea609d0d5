"""Serve a checkpoint over HTTP with the OpenAI API: ``/v1/chat/completions`` (streamed or not),
``/v1/completions`` and ``/v1/models``, on FastAPI + uvicorn (``pip install 'lowbit[serve]'``).

One model, one generation at a time: requests wait in a bounded FIFO queue and each runs alone on
a single worker thread, so two requests never share a KV cache. Text is produced by
:func:`lowbit.run.chat.generate_reply`, the same call ``lowbit chat`` makes. A request the server
cannot honour (unknown model, bad or too large ``max_tokens``, malformed JSON, a prompt longer than
the context, unsupported options such as ``n`` > 1) gets a 4xx answer with an OpenAI-style JSON
error body, and the server goes on serving. A client that disconnects from a stream stops its
generation at the next token. The server binds to 127.0.0.1 unless told otherwise; ``--api-key``
(or ``LOWBIT_API_KEY``) makes every ``/v1`` route require ``Authorization: Bearer KEY``.
"""

import argparse
import asyncio
import hmac
import json
import os
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import LowbitError
from .engine import embedding_arg, runtime_arg
from .nn import LM_HEADS

#: request bodies larger than this are refused (413) before they are read
MAX_BODY_BYTES = 4 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .load import DTYPES

    p.description = (
        "Serve a checkpoint with the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models), "
        "one generation at a time, requests queued. Needs `pip install 'lowbit[serve]'`."
    )
    p.add_argument("checkpoint", help="any checkpoint lowbit reads (lowbit, autoawq, gptq, xft)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: 8000)")
    p.add_argument("--model-name", help="the model id clients send and /v1/models lists (default: CHECKPOINT as given)")
    p.add_argument("--api-key", default=os.environ.get("LOWBIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every /v1 request (default: $LOWBIT_API_KEY; "
                   "none: no key needed)")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="most tokens one request may generate; also the default when a request names none, "
                   "capped by the room left in the model's context (default: 1024)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests waiting for the model beyond the running one; more get 503 (default: 16)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="activation dtype (default: bf16)")
    p.add_argument("--kernel", help="force one kernel (see `lowbit kernels`)")
    runtime_arg(p)
    p.add_argument("--lm-head", choices=LM_HEADS, default="float",
                   help="keep the checkpoint's float lm_head (default) or quantize it at load time")
    embedding_arg(p)


# ----------------------------------------------------------------------------------- errors
class APIError(Exception):
    """A request the server refuses: HTTP status plus the OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Cancelled(Exception):
    """Raised inside the generation callback when the client has gone away."""


# ----------------------------------------------------------------------------------- requests
def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r}.", param=name)
    if not lo <= v <= hi:
        what = f"at least {lo}" if hi == float("inf") else f"between {lo} and {hi}"
        raise APIError(400, f"'{name}' must be {what}, got {v}.", param=name)
    return v


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise APIError(400, "'stop' must be a string or a list of at most 4 strings.", param="stop")
    return [s for s in stops if s]


def _unsupported(body: dict) -> None:
    """Refuse options that would change the answer in ways this server cannot honour."""
    if body.get("n", 1) not in (1, None):
        raise APIError(400, "only n=1 is supported.", param="n")
    if body.get("best_of", 1) not in (1, None):
        raise APIError(400, "only best_of=1 is supported.", param="best_of")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise APIError(400, "logprobs are not supported.", param="logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"'{name}' is not supported (only 0).", param=name)
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "tools and function calling are not supported.", param="tools")
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported.", param="response_format")


def _text_content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported.", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts.", param="messages")


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list.", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object.", param="messages")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role {m.get('role')!r} is not one of system, developer, user, "
                           "assistant.", param="messages")
        out.append({"role": role, "content": _text_content(m.get("content"), i)})
    return out


# ----------------------------------------------------------------------------------- the model
@dataclass
class Job:
    """One generation request on its way through the queue."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue  # str deltas, then ("done", Reply) or ("error", Exception)
    cancelled: bool = False


class Engine:
    """The loaded model behind one worker thread that runs queued jobs one at a time.

    :param generate: the generation function, :func:`lowbit.run.chat.generate_reply` unless a test or
        another decoder passes its own with the same signature.
    """

    def __init__(self, qm, model, name: str, max_tokens: int = 1024, max_queue: int = 16, generate=None):
        from .chat import _eos_ids, generate_reply

        self.qm, self.model, self.name = qm, model, name
        self.tokenizer = qm.tokenizer
        self.context = int(getattr(qm.config, "max_position_embeddings", 0) or 0) or None
        self.max_tokens = max_tokens
        self.eos = _eos_ids(qm, self.tokenizer)
        self.generate = generate or generate_reply
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)  # the running job is not in it
        self.stopping = False
        self.worker = threading.Thread(target=self._work, name="lowbit-serve-generate", daemon=True)
        self.worker.start()

    # prompts ---------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict[str, str]]) -> tuple[list[int], list[str]]:
        """Prompt ids of a conversation and the stop strings its format implies."""
        from .chat import FALLBACK_STOP, Conversation

        system = [m["content"] for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        conv = Conversation(self.tokenizer, "\n".join(system) if system else None, rest)
        if not conv.templated:
            return conv.prompt_ids(), [FALLBACK_STOP]
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # a template that rejects this conversation (e.g. roles out of order)
            raise APIError(400, f"the model's chat template rejected the messages: {err}", param="messages") from err
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids), []

    def text_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        vocab = len(self.tokenizer)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < vocab for t in prompt):
                raise APIError(400, f"'prompt' token ids must be in [0, {vocab}).", param="prompt")
            return prompt
        raise APIError(400, "'prompt' must be a string, a list of one string, or a list of token ids "
                       "(one prompt per request).", param="prompt")

    def budget(self, body: dict, n_prompt: int, prompt_param: str) -> int:
        """The number of tokens to generate, or a 400 saying why the request cannot have them."""
        room = (self.context - n_prompt) if self.context else None
        if room is not None and room < 1:
            raise APIError(400, f"the prompt is {n_prompt} tokens; this model's context is {self.context}, which "
                           "leaves no room for a reply.", param=prompt_param, code="context_length_exceeded")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        asked = _number(body, name, None, 1, float("inf"), integer=True)
        if asked is None:
            return min(self.max_tokens, room) if room is not None else self.max_tokens
        if asked > self.max_tokens:
            raise APIError(400, f"'{name}' is {asked}; this server allows at most {self.max_tokens} "
                           "(its --max-tokens).", param=name)
        if room is not None and asked > room:
            raise APIError(400, f"the prompt ({n_prompt} tokens) plus '{name}' ({asked}) exceeds this model's "
                           f"context of {self.context} tokens.", param=name, code="context_length_exceeded")
        return asked

    # the queue -------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, "the server is busy (its queue is full); retry later.", "server_error",
                           code="queue_full") from None

    def _work(self) -> None:
        import torch

        while True:
            job = self.jobs.get()
            if job is None or self.stopping:
                return
            if job.cancelled:
                continue

            def emit(item, job=job):
                job.loop.call_soon_threadsafe(job.chunks.put_nowait, item)

            def on_text(text: str, job=job) -> None:
                if job.cancelled or self.stopping:
                    raise _Cancelled()
                emit(text)

            try:
                if job.seed is not None:
                    torch.manual_seed(job.seed)
                reply = self.generate(self.model, self.tokenizer, job.ids, max_new_tokens=job.max_tokens,
                                      temperature=job.temperature, top_p=job.top_p, stop=job.stops, eos=self.eos,
                                      on_text=on_text)
                emit(("done", reply))
            except _Cancelled:
                pass
            except Exception as err:  # reported to this request; the worker goes on with the next
                try:
                    emit(("error", err))
                except RuntimeError:  # the event loop is gone (shutdown)
                    return

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker and wait for it: queued jobs are dropped and the running one ends at its next piece of
        text, so the process never exits while the worker is inside a forward pass (torch's threads would abort
        it)."""
        self.stopping = True
        while True:  # make room for the sentinel
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                break
        try:
            self.jobs.put_nowait(None)
        except queue.Full:
            pass
        self.worker.join(timeout)


# ----------------------------------------------------------------------------------- the app
def create_app(engine: Engine, api_key: str | None = None):
    """The FastAPI application serving ``engine``; ``api_key`` guards every ``/v1`` route."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="lowbit serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def _internal(request, err: Exception):
        body = APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error").body()
        return JSONResponse(body, status_code=500)

    @app.exception_handler(404)
    async def _not_found(request, err):
        return JSONResponse(APIError(404, f"no route {request.method} {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def _bad_method(request, err):
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(),
                            status_code=405)

    def refusal(request: Request) -> APIError | None:
        """Why a ``/v1`` request is refused before its body is read (no or a wrong API key, a body too large)."""
        if api_key is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return APIError(401, "a valid API key is required (Authorization: Bearer KEY).",
                                "authentication_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes.")
        return None

    class Guard:
        """Plain ASGI middleware applying :func:`refusal` (Starlette's ``@app.middleware("http")`` would wrap the
        app's ``receive`` so that a handler never sees its client disconnect)."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and scope["path"].startswith("/v1"):
                err = refusal(Request(scope))
                if err is not None:
                    await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
                    return
            await self.inner(scope, receive, send)

    app.add_middleware(Guard)

    async def read_body(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes.")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object.")
        model = body.get("model")
        if model != engine.name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {engine.name!r}.",
                           param="model", code="model_not_found")
        _unsupported(body)
        return body

    def job_of(body: dict, ids: list[int], stops: list[str], prompt_param: str) -> Job:
        max_tokens = engine.budget(body, len(ids), prompt_param)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        seed = _number(body, "seed", None, -(2 ** 63), 2 ** 63 - 1, integer=True)
        if top_p <= 0:
            raise APIError(400, "'top_p' must be more than 0.", param="top_p")
        stream = body.get("stream", False)
        if not isinstance(stream, bool) or not isinstance(body.get("stream_options") or {}, dict):
            raise APIError(400, "'stream' must be true or false and 'stream_options' an object.", param="stream")
        return Job(ids, max_tokens, float(temperature), float(top_p), stops + _stops(body), seed,
                   asyncio.get_running_loop(), asyncio.Queue())

    async def run(job: Job):
        """Yield the (submitted) job's text deltas, then its Reply; cancel the job if the consumer stops early."""
        try:
            while True:
                item = await job.chunks.get()
                if isinstance(item, tuple):
                    kind, value = item
                    if kind == "error":
                        raise value
                    yield value
                    return
                yield item
        finally:
            job.cancelled = True

    async def cancel_on_disconnect(request: Request, job: Job, every: float = 0.2) -> None:
        """Cancel a non-streamed request's job when its client goes away (queued: never run; running: stopped at
        its next piece of text), and end the handler waiting for it. A streamed one notices at its next write."""
        while not job.cancelled:
            if await request.is_disconnected():
                job.cancelled = True
                job.chunks.put_nowait(("error", _Cancelled()))
                return
            await asyncio.sleep(every)

    def usage(job: Job, reply) -> dict:
        return {"prompt_tokens": len(job.ids), "completion_tokens": reply.tokens,
                "total_tokens": len(job.ids) + reply.tokens}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def respond(request: Request, body: dict, job: Job, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        head = {"id": rid, "created": created, "model": engine.name}
        engine.submit(job)  # a full queue is a 503 before any response has started, streamed or not

        if not body.get("stream"):
            text, reply = "", None
            watcher = asyncio.create_task(cancel_on_disconnect(request, job))
            try:
                async for item in run(job):
                    if isinstance(item, str):
                        text += item
                    else:
                        reply = item
            except _Cancelled:  # the client is gone: nobody reads a reply
                return JSONResponse(APIError(499, "the client closed the request.").body(), status_code=499)
            finally:
                watcher.cancel()
            choice = ({"index": 0, "message": {"role": "assistant", "content": reply.text},
                       "finish_reason": reply.finish_reason, "logprobs": None} if chat else
                      {"index": 0, "text": reply.text, "finish_reason": reply.finish_reason, "logprobs": None})
            return JSONResponse({**head, "object": obj, "choices": [choice], "usage": usage(job, reply)})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        obj += ".chunk" if chat else ""

        def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {**head, "object": obj, "choices": [choice]}

        async def events():
            gen = run(job)
            try:
                if chat:
                    yield sse(chunk(None, role=True))
                async for item in gen:
                    if isinstance(item, str):
                        yield sse(chunk(item))
                    else:
                        yield sse(chunk(None, item.finish_reason))
                        if include_usage:
                            yield sse({**head, "object": obj, "choices": [], "usage": usage(job, item)})
                yield "data: [DONE]\n\n"
            except Exception as err:  # headers are sent: report in the stream, as OpenAI does
                yield sse(APIError(500, f"generation failed: {err}", "server_error").body())
            finally:
                await gen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "queued": engine.jobs.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "lowbit"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != engine.name:
            raise APIError(404, f"the model {model_id!r} does not exist.", param="model", code="model_not_found")
        return {"id": engine.name, "object": "model", "created": 0, "owned_by": "lowbit"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        ids, stops = engine.chat_ids(_messages(body))
        return await respond(request, body, job_of(body, ids, stops, "messages"), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        if body.get("echo") or body.get("suffix"):
            raise APIError(400, "'echo' and 'suffix' are not supported.", param="echo")
        ids = engine.text_ids(body.get("prompt"))
        return await respond(request, body, job_of(body, ids, [], "prompt"), chat=False)

    return app


# ----------------------------------------------------------------------------------- command
def run(args) -> int:
    import socket

    try:
        import uvicorn
    except ImportError:
        raise LowbitError("lowbit serve needs FastAPI and uvicorn: pip install 'lowbit[serve]'.") from None

    from ..exporting import detect_format
    from .engine import load_runner

    if args.max_tokens < 1:
        raise LowbitError(f"--max-tokens must be at least 1, got {args.max_tokens}.")
    if args.max_queue < 1:
        raise LowbitError(f"--max-queue must be at least 1, got {args.max_queue}.")
    if not 0 <= args.port <= 65535:
        raise LowbitError(f"--port must be between 0 and 65535, got {args.port}.")
    if args.api_key is not None and not args.api_key:
        raise LowbitError("--api-key is empty; give a key or leave it out.")
    try:  # bind before the slow model load, so a taken port is reported at once
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as err:
        raise LowbitError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}.") from None
    fmt = detect_format(args.checkpoint)
    runner = load_runner(args.checkpoint, args.dtype, args.kernel, args.lm_head, args.runtime, embedding=args.embedding)
    qm = runner.qm
    name = args.model_name or args.checkpoint
    engine = Engine(qm, runner, name, args.max_tokens, args.max_queue)
    app = create_app(engine, args.api_key)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"lowbit serve: {args.checkpoint} ({fmt}, {qm.scheme.describe()}, {args.dtype}; {runner.describe()}) as "
          f"model {name!r}{'; API key required' if args.api_key else ''}", flush=True)
    print(f"lowbit serve: listening on http://{url_host}:{port}/v1", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the handler it
    # found; the CLI's handler would turn that into an "interrupted" exit. A stop is the normal end here.
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, lambda *_: None)
        except ValueError:  # not the main thread
            pass
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        engine.close()
        sock.close()
    print("lowbit serve: stopped", flush=True)
    return 0
