"""lowbit's built-ins, registered through the same public hooks as any plugin."""

from __future__ import annotations

from .hookspecs import hookimpl


@hookimpl
def lowbit_register_quantizers(register):
    from .algorithms.awq import AWQ
    from .algorithms.gptq import GPTQ
    from .algorithms.rtn import RTN
    from .algorithms.signround import SignRound

    register.add(RTN)
    register.add(AWQ)
    register.add(GPTQ)
    register.add(SignRound)


@hookimpl
def lowbit_register_kernels(register):
    from .kernels.reference import ReferenceKernel

    register.add(ReferenceKernel)


@hookimpl
def lowbit_register_exporters(register):
    from .checkpoint import LowbitCheckpoint

    register.add(LowbitCheckpoint)


@hookimpl
def lowbit_register_architectures(register):
    from .models import BUILTIN

    for adapter in BUILTIN:
        register.add(adapter)
