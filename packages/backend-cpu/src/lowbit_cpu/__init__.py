"""lowbit-backend-cpu: a lowbit plugin."""

__version__ = "0.1.0"
