"""Which runtime runs a checkpoint, and the one generation loop every command uses.

Two kinds of path run a checkpoint:

- **a runtime plugin** (:class:`lowbit.run.runtime.Runtime`, registered through ``lowbit_register_runtimes``),
  which runs the whole model in its own code: lowbit-backend-cpu registers ``native``, its native decoder
  (the whole model per token in C, no Python between the ops). Chosen when one is installed and says it
  covers the checkpoint's family, scheme, activation dtype and this machine.
- **transformers**: the transformers model with QuantLinear modules (:func:`lowbit.run.nn.build_model`),
  for everything else, or when asked for (``--runtime transformers``, ``LOWBIT_RUNTIME=transformers``,
  or forcing a kernel with ``--kernel``).

:func:`load_runner` picks one and says which and why (``Runner.why``); :func:`generate` is the single
generation entry point (greedy or sampled, streamer, stop strings) that ``generate``, ``chat`` and any
server call, whichever path the runner holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import LowbitError
from ..plugins import registry
from .nn import EMBEDDINGS

#: the runtime choices that need no plugin: pick one (``auto``) or the transformers modules
BUILTIN_RUNTIMES = ("auto", "transformers")


@dataclass
class Runner:
    """A loaded checkpoint ready to run: ``decoder`` (a runtime plugin's) or ``model`` (transformers), never both."""

    qm: Any
    path: str  # the runtime's name, or "transformers"
    why: str
    model: Any = None
    decoder: Any = None
    dtype: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.qm.config

    def describe(self) -> str:
        if self.decoder is not None:
            return f"runtime: {self.decoder.describe()} ({self.why})"
        from .nn import kernels_used

        kernels = ", ".join(f"{k} x{n}" for k, n in kernels_used(self.model).items()) or "none"
        return f"runtime: transformers, kernels {kernels} ({self.why})"


def runtime_names() -> tuple[str, ...]:
    """What ``--runtime`` takes: auto, each installed runtime plugin, transformers."""
    return ("auto", *registry("runtimes").names(), "transformers")


def runtime_arg(p, extra: tuple[str, ...] = (), help: str | None = None) -> None:
    """``--runtime`` of the commands that run a checkpoint; its choices are the installed runtimes'."""
    plugins = ", ".join(registry("runtimes").names()) or "none"
    p.add_argument("--runtime", choices=(*runtime_names(), *extra), default="auto", help=help or (
        f"auto (default): the first runtime plugin (installed: {plugins}) that covers the model and machine, "
        "else transformers with lowbit's kernels (the choice and its reason go to stderr); also LOWBIT_RUNTIME"))


def embedding_arg(p) -> None:
    """``--embedding`` of the commands that run a checkpoint (generate, serve, bench)."""
    p.add_argument("--embedding", choices=EMBEDDINGS, default="float",
                   help="the native decoder's embedding: the checkpoint's float table (default; bf16 as stored) or "
                        "int8 rows quantized at load time (opt-in, a quarter of fp32's bytes; with a tied "
                        "--lm-head int8 both use one table)")


def pick_runtime(qm, dtype, lm_head: str = "float", kernel: str | None = None, runtime: str = "auto",
                 embedding: str = "float") -> tuple[Any, str]:
    """``(runtime class, why)``: the installed runtime plugin that runs this checkpoint, or ``(None, why the
    transformers path runs it)``. ``auto`` tries the plugins by priority and gives the first one's reason
    where none takes it."""
    runtime = os.environ.get("LOWBIT_RUNTIME", "").strip() or runtime
    plugins = registry("runtimes")
    if runtime not in BUILTIN_RUNTIMES and runtime not in plugins:
        hint = "" if plugins else " (the native decoder comes with lowbit-backend-cpu)"
        raise LowbitError(f"runtime {runtime!r} is not installed; installed: {', '.join(runtime_names())}{hint}.")
    if runtime == "transformers":
        return None, "asked for the transformers runtime"
    if kernel:
        return None, f"--kernel {kernel} runs through the transformers modules"
    named = [plugins.get(runtime)] if runtime != "auto" else sorted((c for _, c in plugins.items()),
                                                                    key=lambda c: -c.priority)
    reasons = []
    for cls in named:
        reason = cls.unsupported(qm, dtype, lm_head, embedding)
        if reason is None:
            return cls, f"the {cls.name} runtime covers this model and machine"
        reasons.append(reason)
    return None, reasons[0] if reasons else "no runtime plugin is installed (lowbit-backend-cpu has the native decoder)"


def load_runner(path: str, dtype_name: str, kernel: str | None = None, lm_head: str = "float",
                runtime: str = "auto", capacity: int = 0, embedding: str = "float") -> Runner:
    """Read the checkpoint at ``path`` (it must hold a tokenizer) and build the runtime that runs it.
    With a runtime named (``runtime="native"``) an unsupported checkpoint is an error instead of a fallback.

    A lowbit checkpoint is read lazily (verified, then its tensors read as they are used): the native
    decoder converts its packed codes straight into its own layout, so the quantized weights are never held
    unpacked; the transformers path reads it whole. ``capacity``: KV cache positions to allocate now (0: as
    each request needs, see :func:`generate`)."""
    from ..exporting import read_checkpoint
    from .load import dtype_of

    dtype = dtype_of(dtype_name)
    qm = read_checkpoint(path, lazy=True)
    if qm.tokenizer is None:
        raise LowbitError(f"{path} has no tokenizer files; copy the model's tokenizer into it.")
    from .nn import check_sizes

    check_sizes(qm, dtype)  # before anything walks the config's layers (a config of 10^9 layers is refused here)
    picked = pick_runtime(qm, dtype, lm_head, kernel, runtime, embedding)  # reads every weight's scales: once
    if not isinstance(qm.qweights, dict) and picked[0] is None:
        if embedding != "float":  # the one-line refusal, before reading the checkpoint whole
            return runner_for(qm, dtype, kernel, lm_head, runtime, capacity, embedding=embedding, picked=picked)
        qm = read_checkpoint(path)  # the transformers modules are built from QuantizedWeights
    return runner_for(qm, dtype, kernel, lm_head, runtime, capacity, consume=True, embedding=embedding, picked=picked)


def runner_for(qm, dtype, kernel: str | None = None, lm_head: str = "float", runtime: str = "auto",
               capacity: int = 0, consume: bool = False, embedding: str = "float",
               picked: tuple[Any, str] | None = None) -> Runner:
    """The runner for a QuantizedModel already read. ``consume``: the native decoder may take the quantized
    weights out of ``qm`` as it packs them (lower peak memory; ``qm`` keeps config, tokenizer and floats).
    The checkpoint's config is checked against its tensors and the memory here first, whichever runtime runs it.
    ``capacity``: the native decoder's KV cache positions to allocate now, at most the model's context
    (0: none until a request sizes it). ``embedding``: ``int8`` (opt-in) stores the native decoder's embedding as
    int8 rows; the transformers path has no such mode, so it is refused there. ``picked``: what
    :func:`pick_runtime` already said for this checkpoint and these settings."""
    from .nn import build_model, check_sizes

    check_sizes(qm, dtype)
    cls, reason = picked or pick_runtime(qm, dtype, lm_head, kernel, runtime, embedding)
    if cls is not None:
        ctx = context_of(qm.config)
        dec = cls(qm, dtype, lm_head, capacity=min(capacity, ctx or capacity), consume=consume, embedding=embedding)
        return Runner(qm, cls.name, reason, decoder=dec, dtype=dtype)
    if runtime not in BUILTIN_RUNTIMES:
        raise LowbitError(f"--runtime {runtime}: {reason}.")
    if embedding != "float":
        raise LowbitError(f"--embedding {embedding} runs on the native decoder only, which does not run this: {reason}.")
    if not isinstance(qm.qweights, dict):
        raise LowbitError("the transformers runtime needs the checkpoint read whole (read_checkpoint(path)).")
    model = build_model(qm, "cpu", dtype, kernel, lm_head=lm_head)
    if qm.generation_config is not None:
        model.generation_config = qm.generation_config
    return Runner(qm, "transformers", reason, model=model, dtype=dtype)


def context_of(config) -> int | None:
    """The model's context (max_position_embeddings), or None where the config does not give one."""
    ctx = getattr(config, "max_position_embeddings", None)
    return int(ctx) if isinstance(ctx, int) and ctx > 0 else None


def _sample(logits, temperature: float, top_p: float, generator=None) -> int:
    import torch

    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(0) - sp < top_p  # the smallest prefix whose mass reaches top_p (first token always)
        sp = sp * keep
        return int(si[torch.multinomial(sp / sp.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(runner: Runner, ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             eos: list[int] | None = None, streamer=None, stop_strings: list[str] | None = None, tokenizer=None):
    """Prompt ``ids`` (``[1, P]`` tensor) plus up to ``max_new_tokens`` generated tokens, as ``[1, P + n]``.

    Greedy at ``temperature`` 0, else sampling with nucleus ``top_p``; stops at an ``eos`` id or when the
    decoded continuation contains one of ``stop_strings``. ``streamer``: a transformers-style streamer
    (``put`` the prompt, then each token; ``end``)."""
    import torch

    ids = torch.as_tensor(ids).reshape(1, -1).long()
    eos = list(eos or [])
    if runner.path == "transformers":
        kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, streamer=streamer, eos_token_id=eos or None,
                                  pad_token_id=eos[0] if eos else None)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop_strings:
            kw.update(stop_strings=stop_strings, tokenizer=tokenizer)
        with torch.no_grad():
            return runner.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    dec = runner.decoder
    # the KV cache is sized from the request (grown, never shrunk); a request past the model's context is refused
    need = ids.shape[1] + max_new_tokens
    ctx = context_of(runner.config)
    if ctx and need > ctx:
        raise LowbitError(f"the prompt ({ids.shape[1]} tokens) plus {max_new_tokens} new tokens exceeds the model's "
                          f"context of {ctx} tokens.")
    dec.reset(max(need, dec.capacity), slots=1)  # one sequence (a batch before may have left more slots)
    if streamer is not None:
        streamer.put(ids)
    out = ids[0].tolist()
    logits = dec.forward(ids[0])
    new: list[int] = []
    for step in range(max_new_tokens):
        tok = _sample(logits, temperature, top_p)
        new.append(tok)
        if streamer is not None:
            streamer.put(torch.tensor([tok]))
        if tok in eos:
            break
        if stop_strings and tokenizer is not None:
            tail = tokenizer.decode(new[-16:], skip_special_tokens=True)
            if any(s in tail for s in stop_strings):
                break
        if step + 1 < max_new_tokens:
            logits = dec.forward([tok])
    if streamer is not None:
        streamer.end()
    return torch.tensor([out + new])


def generate_batch(runner: Runner, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   eos: list[int] | None = None, threads: int | None = None) -> list[list[int]]:
    """Several prompts (lists of token ids) continued together: each prompt plus up to ``max_new_tokens``
    tokens, greedy or sampled as :func:`generate`, each stopping at its own ``eos``.

    On the native decoder this is batched decode: every prompt is prefilled into its own slot of the KV cache,
    then each step runs one token of every unfinished sequence in one call (the weights are read once per step
    for all of them), so a step of B sequences costs far less than B steps. The transformers path runs the
    prompts one after another."""
    import torch

    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise LowbitError("batched generation needs at least one prompt, each of at least one token.")
    eos = list(eos or [])
    if runner.path == "transformers":
        return [generate(runner, torch.tensor([p]), max_new_tokens, temperature, top_p, eos)[0].tolist()
                for p in prompts]
    dec = runner.decoder
    need = max(len(p) for p in prompts) + max_new_tokens
    ctx = context_of(runner.config)
    if ctx and need > ctx:
        raise LowbitError(f"the longest prompt ({need - max_new_tokens} tokens) plus {max_new_tokens} new tokens "
                          f"exceeds the model's context of {ctx} tokens.")
    dec.reset(max(need, dec.capacity), slots=len(prompts))
    out = [list(p) for p in prompts]
    live: list[int] = []  # slots still generating
    last: list[int] = []
    for i, p in enumerate(prompts):
        logits = dec.forward(p, slot=i, threads=threads)
        if max_new_tokens == 0:
            continue
        tok = _sample(logits, temperature, top_p)
        out[i].append(tok)
        if tok not in eos and max_new_tokens > 1:
            live.append(i)
            last.append(tok)
    for step in range(1, max_new_tokens):
        if not live:
            break
        logits = dec.forward_rows(last, live, threads=threads)
        nxt_live, nxt_last = [], []
        for row, i in enumerate(live):
            tok = _sample(logits[row], temperature, top_p)
            out[i].append(tok)
            if tok not in eos and step + 1 < max_new_tokens:
                nxt_live.append(i)
                nxt_last.append(tok)
        live, last = nxt_live, nxt_last
    return out


class LogitsModel:
    """A transformers-like callable over the native decoder for :func:`lowbit.run.evaluate.perplexity`:
    ``model(ids[1, T]).logits`` ``[1, T, vocab]``, each call from an empty cache."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.config = runner.config

    def __call__(self, ids, use_cache: bool = False):
        from types import SimpleNamespace

        dec = self.runner.decoder
        dec.reset(max(ids.shape[1], dec.capacity), slots=1)
        return SimpleNamespace(logits=dec.forward(ids[0], all_logits=True)[None])
