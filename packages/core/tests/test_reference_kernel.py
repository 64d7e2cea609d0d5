from lowbit.kernels.reference import ReferenceKernel
from lowbit.testing import KernelConformance


class TestReferenceKernel(KernelConformance):
    kernel = ReferenceKernel
