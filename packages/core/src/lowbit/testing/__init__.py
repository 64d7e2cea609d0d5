"""Conformance suites for plugin authors: subclass one in a few lines and inherit its tests.

    from lowbit.testing import KernelConformance

    class TestMyKernel(KernelConformance):
        kernel = MyKernel

pytest collects the subclass (name it ``Test...``). One suite per extension kind:

===========================  ==============================================================
``KernelConformance``        ``kernel = ...``: output vs the reference kernel over bits, group
                             sizes, sym/asym, act-order, batches and dtypes
``PackerConformance``        ``packer = ...``: unpack∘pack identity over bits × group sizes ×
                             sym × act-order; declined schemes give a reason; the layout contract
``ExporterConformance``      ``exporter = ...``: write → read gives equal QuantizedWeights;
                             detect() knows its own output and not a lowbit checkpoint
``QuantizerConformance``     ``quantizer = ...``: quantizes every linear of a real decoder layer
                             and beats RTN's held-out output error (``beats_rtn = False`` opts out)
===========================  ==============================================================
"""

from .exporters import ExporterConformance, tiny_quantized_model
from .kernels import KernelConformance, make_qweight
from .packers import PackerConformance, scheme_grid
from .quantizers import QuantizerConformance
from .qweights import act_order_g_idx, random_qweight

__all__ = [
    "ExporterConformance",
    "KernelConformance",
    "PackerConformance",
    "QuantizerConformance",
    "act_order_g_idx",
    "make_qweight",
    "random_qweight",
    "scheme_grid",
    "tiny_quantized_model",
]
