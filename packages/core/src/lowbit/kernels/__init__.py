from .base import Kernel, KernelSpec

__all__ = ["Kernel", "KernelSpec"]
