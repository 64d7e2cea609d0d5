"""Conformance suites for plugin authors: subclass one in a few lines and inherit its tests.

    from lowbit.testing import KernelConformance

    class TestMyKernel(KernelConformance):
        kernel = MyKernel

pytest collects the subclass; the suite compares against the reference kernel. Suites for
packers, exporters and quantizers live beside it.
"""

from .kernels import KernelConformance

__all__ = ["KernelConformance"]
