"""lowbit-backend-cuda: a lowbit plugin."""

__version__ = "0.1.0"
