"""Hook implementations of lowbit-backend-cpu."""

from lowbit import hookimpl  # noqa: F401
