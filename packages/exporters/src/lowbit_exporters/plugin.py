"""Hook implementations of lowbit-exporters."""

from lowbit import hookimpl  # noqa: F401
