"""The module named by this package's entry point: one hook implementation, nothing else."""

import lowbit


@lowbit.hookimpl
def lowbit_register_kernels(register):
    from .kernel import Int8PerChannelKernel

    register.add(Int8PerChannelKernel)
