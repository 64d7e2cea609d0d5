"""Hook implementations of lowbit-backend-cpu: the CPU kernels and the native decoder (the ``native``
runtime), registered through the public hooks."""

from lowbit import hookimpl


@hookimpl
def lowbit_register_kernels(register):
    from .kernels import KERNELS

    for kernel in KERNELS:
        register.add(kernel)


@hookimpl
def lowbit_register_runtimes(register):
    from .engine import NativeDecoder

    register.add(NativeDecoder)
