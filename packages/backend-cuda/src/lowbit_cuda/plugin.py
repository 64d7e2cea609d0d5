"""Hook implementations of lowbit-backend-cuda: the Triton kernel and its packed layout."""

from lowbit import hookimpl


@hookimpl
def lowbit_register_kernels(register):
    from .kernel import TritonW4A16Kernel

    register.add(TritonW4A16Kernel)


@hookimpl
def lowbit_register_packers(register):
    from .packing import TritonPacker

    register.add(TritonPacker)
