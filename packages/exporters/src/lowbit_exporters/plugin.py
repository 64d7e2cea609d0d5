"""Hook implementations of lowbit-exporters: the AutoAWQ, GPTQ and xFT formats and their packers."""

from __future__ import annotations

from lowbit import hookimpl


@hookimpl
def lowbit_register_packers(register):
    from .autoawq import AwqGemmPacker, AwqGemvPacker
    from .gptq import GPTQPacker, GPTQv2Packer

    for packer in (AwqGemmPacker, AwqGemvPacker, GPTQPacker, GPTQv2Packer):
        register.add(packer)


@hookimpl
def lowbit_register_exporters(register):
    from .autoawq import AutoAWQExporter, AutoAWQGemvExporter
    from .gptq import GPTQExporter, GPTQv2Exporter
    from .xft import XFTExporter

    for exporter in (AutoAWQExporter, AutoAWQGemvExporter, GPTQExporter, GPTQv2Exporter, XFTExporter):
        register.add(exporter)
