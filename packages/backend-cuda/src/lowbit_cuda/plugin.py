"""Hook implementations of lowbit-backend-cuda."""

from lowbit import hookimpl  # noqa: F401
