"""A quantization recipe: everything that decides what a run produces, in one object.

The CLI builds one from its flags, the Python API from keyword arguments, and ``--resume``
compares the one it is given with the one a killed run recorded; the manifest stores it. Output
paths and progress bars are not part of it: they change where results go, not what they are.

Step options come from the steps themselves: each quantizer declares typed :class:`Option` s, the
CLI turns every registered step's options into flags (so a third-party quantizer gets flags too),
and :meth:`Recipe.steps` passes each step its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import UnsupportedSchemeError
from .scheme import QuantScheme

#: named recipes; any other method is step names joined by ``+`` (``awq+gptq`` is also named here)
METHODS: dict[str, list[str]] = {
    "rtn": ["rtn"],
    "awq": ["awq", "rtn"],
    "gptq": ["gptq"],
    "awq+gptq": ["awq", "gptq"],
    "signround": ["signround"],
    "awq+signround": ["awq", "signround"],
}


@dataclass(frozen=True)
class Option:
    """One typed option of a recipe step.

    :param name: the step's keyword (``damp``).
    :param default: its value when not given; a bool default makes the flag a switch (``--flag`` sets
        True, or ``--no-flag`` sets False when the default is True).
    :param help: one sentence for ``--help``.
    :param type: parses the flag's text (``int``, ``float``, a validator from :mod:`lowbit.argtypes`).
    :param choices: the values allowed, if a closed set.
    :param flag: the CLI flag (default ``--<step>-<name>`` with dashes); steps that declare the same
        flag share it, and it reaches each of them.
    :param metavar: the placeholder ``--help`` shows.
    """

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple | None = None
    flag: str | None = None
    metavar: str | None = None

    def flag_for(self, step: str) -> str:
        if self.flag:
            return self.flag
        base = f"--{step}-{self.name}".replace("_", "-")
        return base.replace("--", "--no-", 1) if self.default is True else base


def method_steps(method: str) -> list[str]:
    """The step names of ``method`` (a name in METHODS, or step names joined by ``+``)."""
    return METHODS.get(method) or method.split("+")


@dataclass(frozen=True)
class Recipe:
    """:param method: a name in :data:`METHODS` or step names joined by ``+``.
    :param scheme: the target scheme.
    :param step_options: step name → its options (each step checks its own).
    :param calib: calibration text: ``wikitext2``, a .txt/.jsonl file or ``hf:<dataset>``.
    :param nsamples, seqlen: calibration samples and tokens per sample.
    :param batch_size: calibration samples per forward (results do not depend on it on one machine).
    :param compute_dtype: the calibration forwards' matmul dtype.
    :param device: where calibration runs (``cpu``, ``cuda``, ``cuda:N``), one layer at a time.
    :param formats: output formats besides lowbit's own.
    """

    method: str = "rtn"
    scheme: QuantScheme = field(default_factory=QuantScheme)
    step_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 512
    batch_size: int = 8
    compute_dtype: torch.dtype = torch.float32
    device: str = "cpu"
    formats: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(f for f in self.formats if f != "lowbit"))
        for name in ("nsamples", "seqlen", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UnsupportedSchemeError(f"{name} must be a positive integer, got {value!r}.")

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    @property
    def step_names(self) -> list[str]:
        return method_steps(self.method)

    def steps(self, quantizers, quantize: bool = True) -> list:
        """The recipe's steps, built from the ``quantizers`` registry with their options; ``quantize=False``:
        only the transform steps (``--export-compatible``)."""
        names = self.step_names
        for n in names:
            if n not in quantizers:
                known = sorted(set(METHODS) | set(quantizers.names()))
                raise UnsupportedSchemeError(f"unknown method {self.method!r}; known: {', '.join(known)}.")
        stray = sorted(set(self.step_options) - set(names))
        if stray:
            raise UnsupportedSchemeError(f"options for {', '.join(stray)} given, but --method {self.method} has no "
                                         f"such step (its steps: {', '.join(names)}).")
        steps = [quantizers.get(n)(self.scheme, **self.step_options.get(n, {})) for n in names]
        if not quantize:
            steps = [s for s in steps if not s.quantizes]
            if not steps:
                raise UnsupportedSchemeError(f"method {self.method!r} has no transform step to export; use --method awq.")
        elif not steps[-1].quantizes:
            raise UnsupportedSchemeError(f"the last step of {self.method!r} must quantize (rtn, gptq or signround), "
                                         f"got {steps[-1].name}.")
        return steps

    def to_dict(self) -> dict:
        """JSON form: what the manifest records and what ``--resume`` compares."""
        return {"method": self.method, "scheme": self.scheme.to_dict(),
                "step_options": {k: {o: str(v) if not isinstance(v, (int, float, bool, str, type(None))) else v
                                     for o, v in sorted(opts.items())} for k, opts in sorted(self.step_options.items())},
                "calib": self.calib, "nsamples": self.nsamples, "seqlen": self.seqlen, "batch_size": self.batch_size,
                "compute_dtype": str(self.compute_dtype), "device": torch.device(self.device).type,
                "formats": list(self.formats)}
