"""Interleaved attention: queries at arbitrary absolute positions against a full K,V buffer.

LRT's interleaved training (https://arxiv.org/abs/2605.26797; docs/kernels.md) refines a subset of
positions per pass, e.g. every S-th position, while the keys and values of all positions sit in a
buffer. Query i at position q_pos[i] sees key j iff j <= q_pos[i] and
(window is None or q_pos[i] - j < window). A query that sees no key outputs zeros and gets zero
gradient. Query head h reads KV head h // (H // Hkv) (GQA).

Design (flash-attention style, written for this layout; fp32 math throughout):

- Forward: one program per (block of BLOCK_M queries, batch, query head). It streams key blocks
  through an online softmax (running max and sum in fp32, exp2 with log2(e) folded into the
  scale) and saves the base-2 log-sum-exp of each row for the backward pass.
- Block skipping: q_pos is arbitrary (unsorted, strided, beyond T), so nothing about a query
  block's keys is known before its positions are loaded. Each kernel turns every loaded
  position into that row's visible key range [first, last] = [pos - window + 1, pos] clipped
  to [0, T-1] (first = 0 without a window) and visits only the key blocks between the block's
  smallest first and largest last; the per-element mask is first <= j <= last.
- Backward, two kernels, no atomics:
  * dQ: same grid and key loop as the forward; it also computes delta = rowsum(dO * O) for its
    rows (it loads both anyway) and stores it for the next kernel, so no separate pass is needed.
  * dK/dV: one program per (block of BLOCK_N keys, batch, KV head). It loops over every query
    block, skipping the blocks whose positions cannot see its keys, and over the H // Hkv query
    heads of its group, so each dK/dV element is owned by exactly one program.
- Padding: the head dim is padded to a power of two (at least 16, tl.dot's minimum) with masks,
  so any Dh up to 256 works; ragged Tq and T are masked too.
- Precision: fp32 inputs use tl.dot(input_precision="ieee") (true fp32, no TF32); bf16/fp16
  inputs feed tensor cores in their own dtype with fp32 accumulation.
- Launches: BLOCK_M, BLOCK_N, num_warps and num_stages are autotuned on CUDA for each kernel on
  its own (they share no per-block buffer: lse and delta are per row), keyed on Tq, T and Dh.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from ._common import FLOAT_DTYPES, INDEX_DTYPES, check, configs, device_guard, has, new_output, same_dtype, use_triton

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
MAX_HEAD_DIM = 256

# Blocks of at least 16 (tl.dot's minimum). bf16/fp16 run on tensor cores, where 64x64 tiles
# suit narrow heads and smaller ones wider heads. Keyed on Tq and T as well as the head dim: a
# block larger than Tq or T is mostly masked work, so a few queries or a short buffer want small
# blocks (each new shape tunes once; training keeps one). The dtypes are part of every key.
CONFIGS = configs([triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=2)
                   for m, n, w in ((16, 16, 4), (32, 32, 4), (64, 32, 8), (64, 64, 4), (64, 64, 8))],
                  triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=2))
HEURISTICS = {"HAS_WINDOW": has("window")}


def _prune(candidates, named_args, **kwargs):
    """True-fp32 dots run on the FMA units with their operands in registers, which large tiles
    spill: fp32 inputs time only the tiles up to 32x32."""
    if kwargs["PRECISION"] != "ieee":
        return candidates
    return [c for c in candidates if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 32]


@triton.jit
def _visible_keys(p_pos, o_m, m_m, T, window, HAS_WINDOW: tl.constexpr):
    """The keys each query row sees, as an inclusive range [first, last] (empty when first > last).

    Positions are loaded as int64 (q_pos may be int64 and far beyond T) and clamped to
    [-1, T] before narrowing to int32, so the [BLOCK_M, BLOCK_N] masks built from the ranges
    are int32 compares (half the registers of int64 ones). Rows past Tq get the empty range
    [T, -1], which neither widens a block's key range nor unmasks a key.
    """
    b_pos = tl.load(p_pos + o_m, mask=m_m, other=-1).to(tl.int64)                # [BLOCK_M]
    b_last = tl.maximum(tl.minimum(b_pos, T - 1), -1)                             # [BLOCK_M]
    if HAS_WINDOW:
        b_first = tl.minimum(tl.maximum(b_pos - window + 1, 0), T)                # [BLOCK_M]
    else:
        b_first = tl.zeros_like(b_pos)
    b_first = tl.where(m_m, b_first, T)
    return b_first.to(tl.int32), b_last.to(tl.int32)


@triton.jit
def _key_block(p_k, p_v, i_n, b_first, b_last, o_d, m_d, T, Hkv, D, BLOCK_N: tl.constexpr):
    """Keys and values of the block starting at key i_n ([BLOCK_N, BLOCK_D] each, zeros past T)
    and which of them each query row sees ([BLOCK_M, BLOCK_N], from the rows' [first, last])."""
    o_n = i_n + tl.arange(0, BLOCK_N)                                             # [BLOCK_N]
    m_kv = (o_n < T)[:, None] & m_d[None, :]                                      # [BLOCK_N, BLOCK_D]
    o_kv = o_n[:, None] * Hkv * D + o_d[None, :]                                  # [BLOCK_N, BLOCK_D]
    b_k = tl.load(p_k + o_kv, mask=m_kv, other=0.0)
    b_v = tl.load(p_v + o_kv, mask=m_kv, other=0.0)
    m_s = (o_n[None, :] >= b_first[:, None]) & (o_n[None, :] <= b_last[:, None])  # [BLOCK_M, BLOCK_N]
    return b_k, b_v, m_s


@triton.heuristics(HEURISTICS)
@triton.autotune(CONFIGS, key=["Tq", "T", "D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fwd_kernel(p_q, p_k, p_v, p_pos, p_o, p_lse, Tq, T, H, G, window, qk_scale,
                D: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hkv, Hkv = i_h // G, H // G
    # int64 base offsets: B*T*H*D can pass 2**31 for long sequences
    p_q += i_b.to(tl.int64) * Tq * H * D + i_h * D
    p_o += i_b.to(tl.int64) * Tq * H * D + i_h * D
    p_k += i_b.to(tl.int64) * T * Hkv * D + i_hkv * D
    p_v += i_b.to(tl.int64) * T * Hkv * D + i_hkv * D

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)                                   # [BLOCK_M]
    o_d = tl.arange(0, BLOCK_D)                                                   # [BLOCK_D]
    m_m, m_d = o_m < Tq, o_d < D
    b_first, b_last = _visible_keys(p_pos, o_m, m_m, T, window, HAS_WINDOW)      # [BLOCK_M] each
    b_q = tl.load(p_q + o_m[:, None] * H * D + o_d[None, :],
                  mask=m_m[:, None] & m_d[None, :], other=0.0)                    # [BLOCK_M, BLOCK_D]

    # a finite floor rather than -inf for the running max: a row with no visible key yet then
    # gives exp2(-inf - floor) = 0 instead of exp2(-inf + inf) = NaN
    b_max = tl.full([BLOCK_M], -1e30, dtype=tl.float32)                           # [BLOCK_M]
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)                                 # [BLOCK_M]
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                        # [BLOCK_M, BLOCK_D]
    # only the key blocks that some row of this block sees, starting on a block boundary
    for i_n in range((tl.min(b_first, 0) // BLOCK_N) * BLOCK_N, tl.max(b_last, 0) + 1, BLOCK_N):
        b_k, b_v, m_s = _key_block(p_k, p_v, i_n, b_first, b_last, o_d, m_d, T, Hkv, D, BLOCK_N)
        # scores in the log2 domain
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale    # [BLOCK_M, BLOCK_N]
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_max_new = tl.maximum(b_max, tl.max(b_s, 1))                             # [BLOCK_M]
        b_p = tl.math.exp2(b_s - b_max_new[:, None])                              # [BLOCK_M, BLOCK_N]
        b_alpha = tl.math.exp2(b_max - b_max_new)                                 # [BLOCK_M]
        b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        b_max = b_max_new

    # rows with no visible key: output 0 and lse = +inf, so the backward's exp2(s - lse) is 0
    m_seen = b_sum > 0
    b_sum = tl.where(m_seen, b_sum, 1.0)
    b_o = b_acc / b_sum[:, None]
    b_lse = tl.where(m_seen, b_max + tl.math.log2(b_sum), float("inf"))
    tl.store(p_o + o_m[:, None] * H * D + o_d[None, :], b_o.to(p_o.dtype.element_ty),
             mask=m_m[:, None] & m_d[None, :])
    tl.store(p_lse + i_bh.to(tl.int64) * Tq + o_m, b_lse, mask=m_m)


@triton.heuristics(HEURISTICS)
@triton.autotune(CONFIGS, key=["Tq", "T", "D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_dq_kernel(p_q, p_k, p_v, p_pos, p_o, p_lse, p_do, p_dq, p_delta, Tq, T, H, G, window,
                   scale, qk_scale, D: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hkv, Hkv = i_h // G, H // G
    o_qbase = i_b.to(tl.int64) * Tq * H * D + i_h * D
    p_q += o_qbase
    p_o += o_qbase
    p_do += o_qbase
    p_dq += o_qbase
    p_k += i_b.to(tl.int64) * T * Hkv * D + i_hkv * D
    p_v += i_b.to(tl.int64) * T * Hkv * D + i_hkv * D
    p_lse += i_bh.to(tl.int64) * Tq
    p_delta += i_bh.to(tl.int64) * Tq

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)                                   # [BLOCK_M]
    o_d = tl.arange(0, BLOCK_D)                                                   # [BLOCK_D]
    m_m, m_d = o_m < Tq, o_d < D
    o_q = o_m[:, None] * H * D + o_d[None, :]                                     # [BLOCK_M, BLOCK_D]
    m_q = m_m[:, None] & m_d[None, :]
    b_first, b_last = _visible_keys(p_pos, o_m, m_m, T, window, HAS_WINDOW)      # [BLOCK_M] each
    b_q = tl.load(p_q + o_q, mask=m_q, other=0.0)                                 # [BLOCK_M, BLOCK_D]
    b_do = tl.load(p_do + o_q, mask=m_q, other=0.0)                               # [BLOCK_M, BLOCK_D]
    b_o = tl.load(p_o + o_q, mask=m_q, other=0.0)                                 # [BLOCK_M, BLOCK_D]
    b_lse = tl.load(p_lse + o_m, mask=m_m, other=float("inf"))                    # [BLOCK_M]
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij, the softmax backward's row term; the dK/dV
    # kernel, launched after this one, reads it back
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)                 # [BLOCK_M]
    tl.store(p_delta + o_m, b_delta, mask=m_m)

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                         # [BLOCK_M, BLOCK_D]
    for i_n in range((tl.min(b_first, 0) // BLOCK_N) * BLOCK_N, tl.max(b_last, 0) + 1, BLOCK_N):
        b_k, b_v, m_s = _key_block(p_k, p_v, i_n, b_first, b_last, o_d, m_d, T, Hkv, D, BLOCK_N)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale    # [BLOCK_M, BLOCK_N]
        # the where also drops masked scores that exceed the row's lse (exp2 could give inf)
        b_p = tl.where(m_s, tl.math.exp2(b_s - b_lse[:, None]), 0.0)              # [BLOCK_M, BLOCK_N]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)             # [BLOCK_M, BLOCK_N]
        b_ds = b_p * (b_dp - b_delta[:, None])                                    # [BLOCK_M, BLOCK_N]
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    tl.store(p_dq + o_q, (b_dq * scale).to(p_dq.dtype.element_ty), mask=m_q)


@triton.heuristics(HEURISTICS)
@triton.autotune(CONFIGS, key=["Tq", "T", "D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_dkdv_kernel(p_q, p_k, p_v, p_pos, p_lse, p_do, p_delta, p_dk, p_dv, Tq, T, H, G, window,
                     scale, qk_scale, D: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    i_n, i_bhkv = tl.program_id(0), tl.program_id(1)
    Hkv = H // G
    i_b, i_hkv = i_bhkv // Hkv, i_bhkv % Hkv
    o_kvbase = i_b.to(tl.int64) * T * Hkv * D + i_hkv * D
    p_k += o_kvbase
    p_v += o_kvbase
    p_dk += o_kvbase
    p_dv += o_kvbase
    p_q += i_b.to(tl.int64) * Tq * H * D
    p_do += i_b.to(tl.int64) * Tq * H * D
    p_lse += i_b.to(tl.int64) * H * Tq
    p_delta += i_b.to(tl.int64) * H * Tq

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)                                   # [BLOCK_N]
    o_d = tl.arange(0, BLOCK_D)                                                   # [BLOCK_D]
    m_n, m_d = o_n < T, o_d < D
    o_kv = o_n[:, None] * Hkv * D + o_d[None, :]                                  # [BLOCK_N, BLOCK_D]
    m_kv = m_n[:, None] & m_d[None, :]
    b_k = tl.load(p_k + o_kv, mask=m_kv, other=0.0)                               # [BLOCK_N, BLOCK_D]
    b_v = tl.load(p_v + o_kv, mask=m_kv, other=0.0)                               # [BLOCK_N, BLOCK_D]
    n_first = i_n * BLOCK_N
    n_last = tl.minimum(n_first + BLOCK_N, T) - 1

    # computed transposed ([keys, queries]) so that dV = P^T dO and dK = dS^T Q need no transposes
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                         # [BLOCK_N, BLOCK_D]
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                         # [BLOCK_N, BLOCK_D]
    for i_m in range(0, Tq, BLOCK_M):
        o_m = i_m + tl.arange(0, BLOCK_M)                                         # [BLOCK_M]
        m_m = o_m < Tq
        b_first, b_last = _visible_keys(p_pos, o_m, m_m, T, window, HAS_WINDOW)  # [BLOCK_M] each
        # q_pos is unordered, so every query block is visited, but only its positions are read
        # unless some row sees a key of this block
        if (tl.max(b_last, 0) >= n_first) & (tl.min(b_first, 0) <= n_last):
            m_st = (o_n[:, None] >= b_first[None, :]) & (o_n[:, None] <= b_last[None, :])  # [BLOCK_N, BLOCK_M]
            o_q = o_m[:, None] * H * D + o_d[None, :]                             # [BLOCK_M, BLOCK_D]
            m_q = m_m[:, None] & m_d[None, :]
            # every query head of this KV head's group adds into the same dK, dV block
            for i_g in range(G):
                i_h = i_hkv * G + i_g
                b_q = tl.load(p_q + i_h * D + o_q, mask=m_q, other=0.0)           # [BLOCK_M, BLOCK_D]
                b_do = tl.load(p_do + i_h * D + o_q, mask=m_q, other=0.0)         # [BLOCK_M, BLOCK_D]
                b_lse = tl.load(p_lse + i_h * Tq + o_m, mask=m_m, other=float("inf"))   # [BLOCK_M]
                b_delta = tl.load(p_delta + i_h * Tq + o_m, mask=m_m, other=0.0)        # [BLOCK_M]
                b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
                b_pt = tl.where(m_st, tl.math.exp2(b_st - b_lse[None, :]), 0.0)          # [BLOCK_N, BLOCK_M]
                b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
                b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)           # [BLOCK_N, BLOCK_M]
                b_dst = b_pt * (b_dpt - b_delta[None, :])                                # [BLOCK_N, BLOCK_M]
                b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)
    tl.store(p_dk + o_kv, (b_dk * scale).to(p_dk.dtype.element_ty), mask=m_kv)
    tl.store(p_dv + o_kv, b_dv.to(p_dv.dtype.element_ty), mask=m_kv)


def _head_args(head_dim: int, dtype: torch.dtype) -> dict:
    """The constexprs fixed by the inputs: the head dim, padded to a power of two (at least 16,
    tl.dot's minimum) for the tiles, and the dot precision."""
    return dict(D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


@torch.library.custom_op("hybrid_lm::interleaved_attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                   window: Optional[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, q_pos = q.contiguous(), k.contiguous(), v.contiguous(), q_pos.contiguous()
    B, Tq, H, D = q.shape
    T, Hkv = k.shape[1], k.shape[2]
    o = new_output(q.shape, q.dtype, q.device)
    lse = new_output((B, H, Tq), torch.float32, q.device)
    _fwd_kernel[lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)](
        q, k, v, q_pos, o, lse, Tq, T, H, H // Hkv, window, scale * LOG2E, **_head_args(D, q.dtype))
    return o, lse


@_attention_fwd.register_fake
def _(q, k, v, q_pos, window, scale):
    B, Tq, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, Tq), dtype=torch.float32)


@torch.library.custom_op("hybrid_lm::interleaved_attention_bwd", mutates_args=())
def _attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, do: torch.Tensor, window: Optional[int],
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, q_pos = q.contiguous(), k.contiguous(), v.contiguous(), q_pos.contiguous()
    o, lse, do = o.contiguous(), lse.contiguous(), do.contiguous()
    B, Tq, H, D = q.shape
    T, Hkv = k.shape[1], k.shape[2]
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    delta = new_output((B, H, Tq), torch.float32, q.device)
    args = (Tq, T, H, H // Hkv, window, scale, scale * LOG2E)
    # the dQ kernel writes delta, which the dK/dV kernel reads: same stream, so ordered
    _bwd_dq_kernel[lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)](
        q, k, v, q_pos, o, lse, do, dq, delta, *args, **_head_args(D, q.dtype))
    _bwd_dkdv_kernel[lambda META: (triton.cdiv(T, META["BLOCK_N"]), B * Hkv)](
        q, k, v, q_pos, lse, do, delta, dk, dv, *args, **_head_args(D, q.dtype))
    return dq, dk, dv


@_attention_bwd.register_fake
def _(q, k, v, q_pos, o, lse, do, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, q_pos, window, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, q_pos, o, lse)
    ctx.window, ctx.scale = window, scale


def _backward(ctx, do, dlse):
    q, k, v, q_pos, o, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(q, k, v, q_pos, o, lse, do, ctx.window, ctx.scale)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("hybrid_lm::interleaved_attention_fwd", _backward, setup_context=_setup)


def interleaved_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                          window: Optional[int] = None, scale: Optional[float] = None) -> torch.Tensor:
    r"""Masked attention of queries at absolute positions `q_pos` over keys 0..T-1.

    Query i sees key j iff j <= q_pos[i] and (window is None or q_pos[i] - j < window); query
    head h reads KV head h // (H // Hkv) (GQA). A query that sees no key outputs zeros and gets
    zero gradient. Differentiable in q, k and v. See docs/kernels.md.

    Args:
        q (torch.Tensor):
            Queries of shape `[B, Tq, H, Dh]`, any float dtype, Dh at most 256.
        k (torch.Tensor):
            Keys of shape `[B, T, Hkv, Dh]` in q's dtype, with H divisible by Hkv.
        v (torch.Tensor):
            Values of shape `[B, T, Hkv, Dh]` in q's dtype.
        q_pos (torch.Tensor):
            The absolute position of each query, int32/int64 of shape `[Tq]`, shared by every
            batch row, in any order.
        window (Optional[int]):
            Sliding window: a query sees itself and the window-1 keys before it. A positive int,
            or `None` for full causal attention. Default: `None`.
        scale (Optional[float]):
            Softmax scale. Default: `None` (`Dh ** -0.5`).

    Returns:
        o (torch.Tensor):
            Outputs of q's shape `[B, Tq, H, Dh]` and dtype.

    Example::
        >>> import torch
        >>> from hybrid_lm.kernels import interleaved_attention
        >>> B, T, H, Hkv, Dh = 2, 16, 4, 2, 8
        >>> k, v = torch.randn(B, T, Hkv, Dh), torch.randn(B, T, Hkv, Dh)
        >>> q_pos = torch.arange(1, T, 2)  # every second position
        >>> q = torch.randn(B, q_pos.numel(), H, Dh, requires_grad=True)
        >>> o = interleaved_attention(q, k, v, q_pos, window=4)
        >>> o.shape
        torch.Size([2, 8, 4, 8])
        >>> o.sum().backward()
    """
    dims = {}
    check("q", q, ("B", "Tq", "H", "Dh"), dims, FLOAT_DTYPES)
    check("k", k, ("B", "T", "Hkv", "Dh"), dims, same_dtype(q), q.device)
    check("v", v, ("B", "T", "Hkv", "Dh"), dims, same_dtype(q), q.device)
    check("q_pos", q_pos, ("Tq",), dims, INDEX_DTYPES, q.device)
    if not 1 <= dims["Dh"] <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected head dim Dh in [1, {MAX_HEAD_DIM}], got Dh={dims['Dh']}")
    if dims["Hkv"] == 0 or dims["H"] % dims["Hkv"]:
        raise ValueError(f"k: expected a number of KV heads Hkv dividing H={dims['H']}, got Hkv={dims['Hkv']}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window <= 0):
        raise ValueError(f"window: expected a positive int or None, got {window!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise ValueError(f"scale: expected a float or None, got {scale!r}")
    window = None if window is None else int(window)
    scale = dims["Dh"] ** -0.5 if scale is None else float(scale)
    if not use_triton(q):
        return reference.interleaved_attention(q, k, v, q_pos, window, scale)
    with device_guard(q):
        return _attention_fwd(q, k, v, q_pos, window, scale)[0]
