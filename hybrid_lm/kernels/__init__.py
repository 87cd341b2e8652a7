"""hybrid_lm.kernels: the ops under every model, as Triton kernels with a PyTorch reference.

Layout is token-major [batch, time, channels]; packed batches use int32 `cu_seqlens` with batch
size 1; recurrent states are fp32. CUDA tensors run Triton, CPU tensors run `reference` (set
HYBRID_LM_BACKEND=triton with TRITON_INTERPRET=1 to run the Triton code on a CPU).
"""
from . import reference
from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .gmu import gmu
from .interleaved_attention import interleaved_attention
from .selective_scan import selective_scan, selective_state_update

__all__ = [
    "gmu",
    "causal_conv1d",
    "causal_conv1d_update",
    "selective_scan",
    "selective_state_update",
    "interleaved_attention",
    "reference",
]
