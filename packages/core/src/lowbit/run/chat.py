"""Chat interactively with a quantized checkpoint, streaming the reply token by token.

Any checkpoint lowbit reads works (lowbit, autoawq, gptq, xft, ...). The tokenizer's chat
template formats the conversation; a tokenizer without one gets a plain ``User:``/``Assistant:``
transcript (and a note saying so). The history is kept across turns and trimmed from the oldest
turn when it no longer fits the model's context.

Commands at the prompt: ``/reset`` clears the history, ``/history`` prints it, ``/exit`` (or
``/quit``, Ctrl-D, Ctrl-C) leaves. Ctrl-C during a reply stops that reply.
"""

from __future__ import annotations

import argparse
import select
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..argtypes import path, positive_int, probability, seed, temperature
from ..errors import LowbitError
from .engine import runtime_arg

USER_PROMPT = "USER: "
ASSISTANT_PROMPT = "ASSISTANT: "
FALLBACK_NOTE = (
    "note: this checkpoint's tokenizer has no chat template; "
    "using a plain 'User:/Assistant:' transcript format."
)
FALLBACK_STOP = "\nUser:"
HELP = "commands: /reset clears the history, /history shows it, /exit quits (also Ctrl-D or Ctrl-C)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .load import DTYPES

    p.description = (
        "Chat with a quantized checkpoint in the terminal: the model's chat template, history across turns, "
        "streamed replies. /reset clears the history, /history shows it, /exit quits (also Ctrl-D or Ctrl-C)."
    )
    p.add_argument("checkpoint", type=path, help="any checkpoint lowbit reads (lowbit, autoawq, gptq, xft)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="longest reply in tokens (default: 256)")
    p.add_argument("--temperature", type=temperature, default=0.7, help="sampling temperature; 0 = greedy (default: 0.7)")
    p.add_argument("--top-p", type=probability, default=0.9, help="nucleus sampling threshold (default: 0.9)")
    p.add_argument("--system", help="system prompt placed before the conversation")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="activation dtype (default: bf16)")
    p.add_argument("--kernel", help="force one kernel (see `lowbit kernels`)")
    p.add_argument("--seed", type=seed, help="seed sampling, for reproducible replies")
    runtime_arg(p)


@dataclass
class Conversation:
    """The messages so far, and how to turn them into prompt token ids.

    :param tokenizer: an HF tokenizer; its ``chat_template`` is used when it has one.
    :param system: optional system prompt, kept by :meth:`reset`.
    """

    tokenizer: Any
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    @property
    def templated(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def reset(self) -> None:
        self.messages.clear()

    def turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)

    def drop_oldest_turn(self) -> None:
        """Forget the oldest user message and the reply to it."""
        first = next(i for i, m in enumerate(self.messages) if m["role"] == "user")
        end = first + 1
        while end < len(self.messages) and self.messages[end]["role"] != "user":
            end += 1
        del self.messages[first:end]

    def _with_system(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def prompt_text(self) -> str:
        """The fallback transcript (no chat template)."""
        lines = [f"System: {self.system}"] if self.system else []
        for m in self.messages:
            lines.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}")
        return "\n".join(lines) + "\nAssistant:"

    def prompt_ids(self) -> list[int]:
        if not self.templated:
            return self.tokenizer(self.prompt_text()).input_ids
        try:
            ids = self.tokenizer.apply_chat_template(self._with_system(), add_generation_prompt=True, tokenize=True)
        except Exception as err:  # a template that rejects the conversation (e.g. no system role)
            raise LowbitError(
                f"the checkpoint's chat template rejected the conversation: {err}. "
                "Drop --system if the model has no system role."
            ) from err
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)


def _fit(conv: Conversation, max_positions: int | None, max_new_tokens: int) -> list[int]:
    """Prompt ids that leave room for the reply, dropping the oldest turns first."""
    ids = conv.prompt_ids()
    if not max_positions:
        return ids
    budget = max_positions - max_new_tokens
    if budget <= 0:
        raise LowbitError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{max_positions} tokens; pass a smaller --max-new-tokens."
        )
    while len(ids) > budget and conv.turns() > 1:
        conv.drop_oldest_turn()
        ids = conv.prompt_ids()
    return ids[-budget:]


def _streamer(tokenizer, on_text):
    from transformers import TextStreamer

    class _Stream(TextStreamer):
        """Hands finished words to ``on_text`` as they come and holds back a possible stop string."""

        def __init__(self, stops: list[str]):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.stops = stops
            self.pending = ""
            self.stopped = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if self.stopped:
                return
            self.pending += text
            hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.pending = self.pending[: min(hits)]
                self.stopped = True
            keep = 0
            if self.stops and not self.stopped and not stream_end:
                # keep back a tail that could be the start of a stop string
                keep = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])),
                           default=0)
            emit = self.pending[: len(self.pending) - keep] if keep else self.pending
            self.pending = self.pending[len(emit):]
            if emit:
                on_text(emit)

    return _Stream


@dataclass
class Reply:
    """One generated reply: its text (cut before any stop string), the number of new tokens, and why it
    ended: ``"stop"`` (an end-of-sequence token or a stop string) or ``"length"`` (``max_new_tokens``)."""

    text: str
    tokens: int
    finish_reason: str


def generate_reply(model, tokenizer, ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, stop: list[str] | tuple[str, ...] = (), eos: list[int] | tuple[int, ...] = (),
                   on_text: Callable[[str], None] | None = None) -> Reply:
    """Generate one reply to the prompt ``ids``, streaming its text to ``on_text`` as it is decoded.

    The one generation call that ``chat``, ``serve`` and lm-eval share. ``model`` is a
    :class:`lowbit.run.engine.Runner` (the native decoder or transformers modules) or a bare
    transformers model; the tokens come from :func:`lowbit.run.engine.generate` either way.
    ``temperature`` 0 is greedy; ``stop`` strings end the reply and are not part of it; ``eos`` token
    ids end it too. An exception raised by ``on_text`` aborts the generation and propagates (``serve``
    uses that to stop work for a client that went away).
    """
    from .engine import Runner, generate

    runner = model if isinstance(model, Runner) else Runner(None, "transformers", "a transformers model", model=model)
    stops = [s for s in stop if s]
    streamer = _streamer(tokenizer, on_text or (lambda _text: None))(stops)
    eos = list(eos)
    gen = generate(runner, [ids], max_new_tokens, temperature, top_p, eos=eos, streamer=streamer,
                   stop_strings=stops or None, tokenizer=tokenizer)
    new = gen[0, len(ids):].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        text = text[: min(hits)]
    finished = bool(hits) or (bool(new) and new[-1] in eos) or len(new) < max_new_tokens
    return Reply(text, len(new), "stop" if finished else "length")


def _generate(model, tokenizer, ids: list[int], args, stop: str | None, eos: list[int], out) -> str:
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    reply = generate_reply(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, stop=[stop] if stop else [], eos=eos, on_text=write)
    return reply.text.strip()


def _eos_ids(qm, tokenizer) -> list[int]:
    ids: list[int] = []
    gc = qm.generation_config
    for v in (getattr(gc, "eos_token_id", None) if gc is not None else None, tokenizer.eos_token_id):
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def chat_loop(model, qm, args, inp=None, out=None) -> int:
    """Read user turns from ``inp`` (default: the terminal via ``input()``) until EOF or /exit."""
    out = out or sys.stdout
    tokenizer = qm.tokenizer
    conv = Conversation(tokenizer, args.system)
    stop = None if conv.templated else FALLBACK_STOP
    if stop:
        print(FALLBACK_NOTE, file=out)
    eos = _eos_ids(qm, tokenizer)
    max_positions = getattr(qm.config, "max_position_embeddings", None)

    def read() -> str:
        out.write(USER_PROMPT)
        out.flush()
        stream = sys.stdin if inp is None else inp
        if inp is None and stream.isatty():
            # Wait in short selects, not one blocking read: torch's worker threads may take the
            # SIGINT of a Ctrl-C, and only a main thread that returns to Python notices it.
            while not select.select([stream], [], [], 0.2)[0]:
                pass
        line = stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    while True:
        try:
            text = read().strip()
        except (EOFError, KeyboardInterrupt):
            print("\nbye", file=out)
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            print("bye", file=out)
            return 0
        if text == "/reset":
            conv.reset()
            print("(history cleared)", file=out)
            continue
        if text == "/history":
            for m in conv.messages:
                print(f"[{m['role']}] {m['content']}", file=out)
            print(f"({conv.turns()} turn{'s' if conv.turns() != 1 else ''} in history)", file=out)
            continue
        if text in ("/help", "/?"):
            print(HELP, file=out)
            continue
        conv.messages.append({"role": "user", "content": text})
        ids = _fit(conv, max_positions, args.max_new_tokens)
        out.write(ASSISTANT_PROMPT)
        out.flush()
        try:
            reply = _generate(model, tokenizer, ids, args, stop, eos, out)
        except KeyboardInterrupt:
            conv.messages.pop()
            print("\n(reply interrupted; not kept in the history)", file=out)
            continue
        print(file=out)
        conv.messages.append({"role": "assistant", "content": reply})


def run(args) -> int:
    import torch

    from ..exporting import detect_format
    from .engine import load_runner

    if args.max_new_tokens < 1:
        raise LowbitError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    if args.temperature < 0:
        raise LowbitError(f"--temperature must be 0 (greedy) or more, got {args.temperature}.")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    fmt = detect_format(args.checkpoint)
    runner = load_runner(args.checkpoint, args.dtype, args.kernel, runtime=getattr(args, "runtime", "auto"))
    qm = runner.qm
    print(f"lowbit chat: {args.checkpoint} ({fmt}, {qm.scheme.describe()}, {args.dtype}; {runner.describe()})")
    print(HELP)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    return chat_loop(runner, qm, args)
