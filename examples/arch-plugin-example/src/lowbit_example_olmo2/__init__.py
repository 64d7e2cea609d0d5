"""An example lowbit plugin adding the OLMo-2 architecture."""

__version__ = "0.1.0"
