"""Gated Memory Unit core: `memory * silu(gate)`, fused forward and backward.

SambaY's (https://arxiv.org/abs/2507.06607) GMU layers gate the memory (the last self-decoder
Mamba's scan output) with the layer's own projection. Elementwise, so the kernel is one pass over
the flattened tensors in blocks of BLOCK elements: forward reads 2 and writes 1 value per element,
backward reads 3 and writes 2.

This module is the pattern every op follows: Triton kernels, torch.library custom ops with a
fake (meta) implementation and registered autograd, and a validated public function that
dispatches to the reference on the CPU. Block sizes and num_warps are autotuned on CUDA.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._common import FLOAT_DTYPES, check, configs, device_guard, new_output, same_dtype, use_triton

# Memory-bound: BLOCK and num_warps only trade programs for work per program, and the best pair
# barely depends on the size, so they are tuned once (per dtype): keyed on n, a server whose
# batches change every step would tune again and again.
CONFIGS = configs([triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))],
                  triton.Config({"BLOCK": 1024}, num_warps=4))


@triton.autotune(CONFIGS, key=[])
@triton.jit
def _gmu_fwd_kernel(p_gate, p_mem, p_out, n, BLOCK: tl.constexpr):
    o_x = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    m_x = o_x < n
    b_g = tl.load(p_gate + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_m = tl.load(p_mem + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_out = b_m * b_g * tl.sigmoid(b_g)
    tl.store(p_out + o_x, b_out.to(p_out.dtype.element_ty), mask=m_x)


@triton.autotune(CONFIGS, key=[])
@triton.jit
def _gmu_bwd_kernel(p_gate, p_mem, p_dout, p_dgate, p_dmem, n, BLOCK: tl.constexpr):
    o_x = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    m_x = o_x < n
    b_g = tl.load(p_gate + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_m = tl.load(p_mem + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_do = tl.load(p_dout + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_sig = tl.sigmoid(b_g)
    b_silu = b_g * b_sig
    # d silu(g) / dg = sig(g) * (1 + g * (1 - sig(g)))
    b_dg = b_do * b_m * b_sig * (1.0 + b_g * (1.0 - b_sig))
    tl.store(p_dgate + o_x, b_dg.to(p_dgate.dtype.element_ty), mask=m_x)
    tl.store(p_dmem + o_x, (b_do * b_silu).to(p_dmem.dtype.element_ty), mask=m_x)


@torch.library.custom_op("hybrid_lm::gmu_fwd", mutates_args=())
def _gmu_fwd(gate: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    gate, memory = gate.contiguous(), memory.contiguous()
    out = new_output(memory.shape, memory.dtype, memory.device)
    n = memory.numel()
    _gmu_fwd_kernel[lambda META: (triton.cdiv(n, META["BLOCK"]),)](gate, memory, out, n)
    return out


@_gmu_fwd.register_fake
def _(gate, memory):
    return torch.empty_like(memory)


@torch.library.custom_op("hybrid_lm::gmu_bwd", mutates_args=())
def _gmu_bwd(gate: torch.Tensor, memory: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, memory, dout = gate.contiguous(), memory.contiguous(), dout.contiguous()
    dgate = new_output(gate.shape, gate.dtype, gate.device)
    dmem = new_output(memory.shape, memory.dtype, memory.device)
    n = memory.numel()
    _gmu_bwd_kernel[lambda META: (triton.cdiv(n, META["BLOCK"]),)](gate, memory, dout, dgate, dmem, n)
    return dgate, dmem


@_gmu_bwd.register_fake
def _(gate, memory, dout):
    return torch.empty_like(gate), torch.empty_like(memory)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    gate, memory = ctx.saved_tensors
    return _gmu_bwd(gate, memory, dout)


torch.library.register_autograd("hybrid_lm::gmu_fwd", _backward, setup_context=_setup)


def gmu(gate: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    r"""GMU gating `memory * silu(gate)`, elementwise; differentiable in both inputs (see docs/kernels.md).

    Args:
        gate (torch.Tensor):
            The gate, of any shape and any float dtype.
        memory (torch.Tensor):
            The memory, of gate's shape, dtype and device.

    Returns:
        out (torch.Tensor):
            `memory * gate * sigmoid(gate)`, of memory's shape and dtype.

    Example::
        >>> import torch
        >>> from hybrid_lm.kernels import gmu
        >>> gate = torch.randn(2, 16, 64, requires_grad=True)
        >>> memory = torch.randn(2, 16, 64, requires_grad=True)
        >>> out = gmu(gate, memory)
        >>> out.shape
        torch.Size([2, 16, 64])
        >>> out.sum().backward()
        >>> gate.grad.shape, memory.grad.shape
        (torch.Size([2, 16, 64]), torch.Size([2, 16, 64]))
    """
    check("gate", gate, dtypes=FLOAT_DTYPES)
    check("memory", memory, tuple(gate.shape), dtypes=same_dtype(gate), device=gate.device)
    if not use_triton(memory):
        return reference.gmu(gate, memory)
    with device_guard(memory):
        return _gmu_fwd(gate, memory)
