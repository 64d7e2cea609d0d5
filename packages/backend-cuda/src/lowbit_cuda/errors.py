"""Errors of lowbit-backend-cuda (all LowbitError subclasses, one clear line each)."""

from __future__ import annotations

from lowbit.errors import LowbitError


class LaunchError(LowbitError, ValueError):
    """A kernel launch asked with inputs the kernel cannot take (shape, dtype, device, config)."""
