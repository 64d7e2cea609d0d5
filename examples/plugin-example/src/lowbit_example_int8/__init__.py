"""lowbit-example-int8: an 8-bit per-channel CPU kernel for lowbit, written as a third party would."""

from .kernel import Int8PerChannelKernel

__all__ = ["Int8PerChannelKernel"]
__version__ = "0.1.0"
