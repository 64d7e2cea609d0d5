"""Hook implementations of lowbit-backend-cpu: the CPU kernels, registered through the public hook."""

from lowbit import hookimpl


@hookimpl
def lowbit_register_kernels(register):
    from .kernels import KERNELS

    for kernel in KERNELS:
        register.add(kernel)
