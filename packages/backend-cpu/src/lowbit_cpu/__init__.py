"""lowbit-backend-cpu: int4/int8 CPU kernels for lowbit (AVX2 fused GEMV, tiled BLAS prefill,
PyTorch's int4/int8 kernels, optional IPEX)."""

__version__ = "0.1.0"
