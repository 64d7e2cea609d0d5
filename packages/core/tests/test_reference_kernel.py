import pytest
import torch

from lowbit.kernels.reference import ReferenceKernel
from lowbit.scheme import QuantScheme
from lowbit.testing import KernelConformance


class TestReferenceKernel(KernelConformance):
    kernel = ReferenceKernel


def test_partial_last_group_runs_on_the_reference_kernel_only():
    """K=576 at group 128 (as GPTQModel writes): 5 groups, the last of 64 columns."""
    from lowbit.kernels.base import Kernel, KernelSpec
    from lowbit.kernels.reference import ReferenceKernel
    from lowbit.qweight import QuantizedWeight
    from lowbit.scheme import QuantScheme

    scheme = QuantScheme(4, 128)
    spec = KernelSpec(scheme, 576, 64, torch.float32)

    class Plain(Kernel):
        name = "plain"

    assert "partial" in Plain.can_implement(spec)
    assert ReferenceKernel.can_implement(spec) is None
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 576), generator=gen).to(torch.uint8)
    scales = (torch.rand(64, 5, generator=gen) + 0.5).half()
    zeros = torch.randint(0, 16, (64, 5), generator=gen).to(torch.uint8)
    qw = QuantizedWeight(codes, scales, zeros, scheme)
    g = torch.arange(576) // 128
    want = (codes.float() - zeros.float()[:, g]) * scales.float()[:, g]  # the last 64 columns use group 4
    assert int(g.max()) == 4
    x = torch.randn(3, 576, generator=gen)
    torch.testing.assert_close(ReferenceKernel(qw, torch.device("cpu"), torch.float32).forward(x), x @ want.T)


def test_the_suite_fails_a_kernel_that_declines_everything():
    from lowbit.kernels.base import Kernel

    class Shy(Kernel):
        name = "shy"

        @classmethod
        def can_implement(cls, spec):
            return "declines everything"

    class Suite(KernelConformance):
        kernel = Shy

    with pytest.raises(pytest.fail.Exception, match="declines every spec"):
        Suite().test_accepts_some_spec()


def test_the_oracle_catches_a_kernel_that_is_off_by_one_code():
    """The suite's oracle is independent of the reference kernel: a kernel that dequantizes with
    zero + 1 fails it."""
    from lowbit.kernels.reference import ReferenceKernel

    class OffByOne(ReferenceKernel):
        name = "off-by-one"

        def __init__(self, qweight, device, dtype):
            import dataclasses

            shifted = dataclasses.replace(qweight, zeros=(qweight.zeros.long() - 1).clamp(min=0).to(torch.uint8))
            super().__init__(shifted, device, dtype)

    class Suite(KernelConformance):
        kernel = OffByOne
        dtypes = (torch.float32,)

    with pytest.raises(AssertionError, match="relative error"):
        Suite()._check(QuantScheme(4, 64), 1, torch.float32)
