"""lowbit.testing's packer and exporter conformance suites over every layout and format here."""

from __future__ import annotations

from lowbit.testing import ExporterConformance, PackerConformance
from lowbit_exporters.autoawq import AutoAWQExporter, AutoAWQGemvExporter, AwqGemmPacker, AwqGemvPacker
from lowbit_exporters.gptq import GPTQExporter, GPTQPacker, GPTQv2Exporter, GPTQv2Packer
from lowbit_exporters.xft import XFTExporter


class TestAwqGemmPacker(PackerConformance):
    packer = AwqGemmPacker


class TestAwqGemvPacker(PackerConformance):
    packer = AwqGemvPacker


class TestGPTQPacker(PackerConformance):
    packer = GPTQPacker
    min_zero = 1  # v1 stores zero - 1 and refuses a zero of 0


class TestGPTQv2Packer(PackerConformance):
    packer = GPTQv2Packer


class TestAutoAWQExporter(ExporterConformance):
    exporter = AutoAWQExporter


class TestAutoAWQGemvExporter(ExporterConformance):
    exporter = AutoAWQGemvExporter


class TestGPTQExporter(ExporterConformance):
    exporter = GPTQExporter


class TestGPTQv2Exporter(ExporterConformance):
    exporter = GPTQv2Exporter


class TestXFTExporter(ExporterConformance):
    exporter = XFTExporter
