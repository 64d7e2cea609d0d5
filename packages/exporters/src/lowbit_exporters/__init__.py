"""lowbit-exporters: a lowbit plugin (AutoAWQ, GPTQ and xFT formats).

:class:`HFQuantFormat` is public: a third-party format that is an HF directory with packed
safetensors per quantized linear subclasses it, names its packer's ``layout`` and implements
``quantization_config``, ``parse`` and ``shape_of`` (see AutoAWQExporter and GPTQExporter).
"""

from ._common import HFQuantFormat

__version__ = "0.1.0"
__all__ = ["HFQuantFormat", "__version__"]
