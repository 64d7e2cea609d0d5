"""The Runtime interface: a plugin that runs a whole quantized checkpoint in its own code.

lowbit runs a checkpoint either through transformers' modules with QuantLinear layers (always there) or
through a registered runtime, which takes the model over from the embedding to the logits (the CPU
backend's native decoder is one: the whole model per call in C). Plugins register subclasses through the
``lowbit_register_runtimes`` hook; :func:`lowbit.run.engine.pick_runtime` chooses among them.

Generation, perplexity, serving and the benchmark drive a runtime through the members below and nothing
else: a KV cache of ``capacity`` positions for each of ``slots`` sequences, ``forward`` for the next tokens
of one sequence, ``forward_rows`` for one next token of each of several.
"""

from __future__ import annotations

from typing import ClassVar


class Runtime:
    """Base class of runtime plugins (see the module docstring).

    :cvar name: what ``--runtime`` calls it.
    :cvar priority: ``--runtime auto`` takes the installed runtime of highest priority that accepts the
        checkpoint (:meth:`unsupported` returns None), else the transformers path.

    The constructor takes ``(qmodel, dtype, lm_head="float", capacity=0, consume=False, embedding="float")``:
    ``qmodel`` a :class:`lowbit.QuantizedModel` that :meth:`unsupported` accepts (read lazily or whole),
    ``dtype`` the activation dtype asked for, ``lm_head``/``embedding`` one of
    :data:`lowbit.run.nn.LM_HEADS`/:data:`lowbit.run.nn.EMBEDDINGS`, ``capacity`` KV cache positions to
    allocate now (0: none until :meth:`reset` sizes it), ``consume`` whether it may take the quantized weights
    out of ``qmodel.qweights`` as it converts them.
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    #: KV cache positions per sequence, and sequence slots, as last allocated by :meth:`reset`
    capacity: int = 0
    slots: int = 1

    @classmethod
    def unsupported(cls, qmodel, dtype, lm_head: str = "float", embedding: str = "float") -> str | None:
        """None when this runtime runs ``qmodel`` with these settings on this machine, else why not (one
        clause, shown to the user as the reason the transformers path runs it)."""
        raise NotImplementedError

    def reset(self, capacity: int | None = None, slots: int | None = None) -> None:
        """Empty every sequence's cache; with ``capacity`` or ``slots``, (re)allocate for that many."""
        raise NotImplementedError

    def forward(self, ids, all_logits: bool = False, threads: int | None = None, slot: int = 0):
        """Run ``ids`` at the next positions of the sequence in ``slot``: fp32 logits ``[len(ids), vocab]`` with
        ``all_logits``, else ``[vocab]`` of the last token."""
        raise NotImplementedError

    def forward_rows(self, ids, slots, threads: int | None = None):
        """One token of each sequence: ``ids[i]`` at the next position of slot ``slots[i]``, all in one call;
        fp32 logits ``[len(ids), vocab]``."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line saying what runs (shown as ``runtime: ...`` on stderr)."""
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes the runtime holds for the model, KV cache aside."""
        raise NotImplementedError

    def cache_bytes(self) -> int:
        """Bytes of the KV cache as allocated now."""
        raise NotImplementedError
