import torch

from lowbit.kernels.reference import ReferenceKernel
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
