"""argparse types for the command line's numbers: a value out of range is a usage error at parse time
(one line naming the option, what it accepts and the value given; exit status 2), never a traceback
deep inside the run (a zero batch size, a negative token count, a NaN temperature)."""

from __future__ import annotations

import argparse
import math
import os


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """A whole number ≥ 1 (counts and sizes: samples, tokens, windows, threads)."""
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return n


def nonnegative_int(text: str) -> int:
    """A whole number ≥ 0 (a count where 0 means none)."""
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, got {text!r}")
    return n


def group_size(text: str) -> int:
    """A group size: a whole number ≥ 1, or -1 for per channel (which sizes a scheme holds is the scheme's to say)."""
    n = _int(text)
    if n < 1 and n != -1:
        raise argparse.ArgumentTypeError(f"must be a positive group size or -1 for per channel, got {text!r}")
    return n


def at_least_two(text: str) -> int:
    """A whole number ≥ 2 (a perplexity window: one token predicts nothing)."""
    n = _int(text)
    if n < 2:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 2, got {text!r}")
    return n


def _float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return x


def nonnegative_float(text: str) -> float:
    """A finite number ≥ 0 (a temperature, a dampening fraction)."""
    x = _float(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return x


def probability(text: str) -> float:
    """A finite number in (0, 1] (nucleus sampling's top-p)."""
    x = _float(text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, got {text!r}")
    return x


def seed(text: str) -> int:
    """A random seed torch accepts: a whole number in [0, 2**64)."""
    n = _int(text)
    if not 0 <= n < 2**64:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 2**64-1, got {text!r}")
    return n


def int_range(lo: int, hi: int, why: str):
    """A type for a whole number in [lo, hi]; ``why`` says what the upper bound protects (shown when exceeded)."""

    def parse(text: str) -> int:
        n = _int(text)
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"must be a whole number from {lo} to {hi} ({why}), got {text!r}")
        return n

    parse.__name__ = f"int_range_{lo}_{hi}"
    return parse


def _limits() -> tuple[int, int]:
    try:
        return os.pathconf("/", "PC_NAME_MAX"), os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def path(text: str) -> str:
    """A file or directory name the file system can hold: each component within its name limit and the
    whole within its path limit (a longer one can name nothing, and every lookup of it fails)."""
    name_max, path_max = _limits()
    encoded = os.fsencode(text)
    if len(encoded) > path_max:
        raise argparse.ArgumentTypeError(f"a path of {len(encoded)} bytes; file systems allow {path_max}")
    for part in encoded.split(b"/"):
        if len(part) > name_max:
            raise argparse.ArgumentTypeError(f"a name of {len(part)} bytes in {text[:40]!r}…; file systems allow "
                                             f"{name_max} per name")
    return text


def device(text: str) -> str:
    """A device name torch can parse (cpu, cuda, cuda:N, …); whether it is present is for the command to say."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    return text


#: the smallest sampling temperature: below it logits / temperature overflow to infinity (and sampling
#: fails), while it already samples the top token almost always
MIN_TEMPERATURE = 0.01


def temperature(text: str) -> float:
    """A sampling temperature: 0 (greedy) or a finite number ≥ :data:`MIN_TEMPERATURE`."""
    x = _float(text)
    if x != 0 and not x >= MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {text!r}")
    return x


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate)."""
    x = _float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return x
