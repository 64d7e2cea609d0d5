"""The CPU kernels of lowbit-backend-cpu, highest priority first."""

from .avx2_int4 import Avx2Int4Kernel
from .ipex_woq import IpexWoqKernel
from .torch_int4 import TorchInt4Kernel
from .torch_int8 import TorchInt8Kernel
from .vnni_int4 import VnniInt4Kernel, VnniInt8Kernel

KERNELS = (IpexWoqKernel, VnniInt4Kernel, VnniInt8Kernel, Avx2Int4Kernel, TorchInt4Kernel, TorchInt8Kernel)

__all__ = ["KERNELS", "Avx2Int4Kernel", "IpexWoqKernel", "TorchInt4Kernel", "TorchInt8Kernel", "VnniInt4Kernel", "VnniInt8Kernel"]
