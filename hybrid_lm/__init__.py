"""hybrid-lm: fast hybrid decoder architectures and the Triton kernels under them.

`hybrid_lm.kernels` holds the ops (GMU, causal conv1d, selective scan, interleaved attention).
"""
__version__ = "0.1.0"
