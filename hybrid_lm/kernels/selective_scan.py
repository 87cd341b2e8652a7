"""Mamba-1 selective scan: chunked forward and backward in Triton, and the one-token decode step.

Per channel d and state index n, with an fp32 state h [Dm, N]:

    dt_t = softplus(delta_t + delta_bias)   (or delta_t + delta_bias)
    h_t  = exp(dt_t A) * h_{t-1} + (dt_t u_t) B_t
    y_t  = <h_t, C_t> + D u_t ,   y_t *= silu(z_t)

Chunks. Time is cut into chunks of CHUNK tokens that never cross a sequence boundary (the chunk
table is built on the device from cu_seqlens with searchsorted: no host sync, shapes depend on
input shapes only). A program owns one chunk and a block of BD channels with all N states, a
[BD, BN] fp32 tile in registers, and walks the chunk token by token. Parallelism is
chunks x channel blocks (batch 1 with T = 4096, Dm = 4096 gives 64 x 64 programs); only the
state entering each chunk is ever written to memory, so backward keeps 4 N Dm / CHUNK bytes per
token (Dm bytes at N = 16), not 4 N Dm.

Forward
  1. _fwd_chunk_kernel (LOCAL)  every chunk from a zero state: its end state and sum(dt)
     (the chunk multiplies whatever state enters it by exp(A sum dt)).
  2. _carry_kernel              per (sequence, channel block), sequential over that sequence's
     chunks: h <- exp(A sum dt_c) h + end_c gives the state entering every chunk (saved for
     backward) and the final state.
  3. _fwd_chunk_kernel          every chunk again from its true entering state: y, D, z gate.
Backward. g_t = dL/dh_t obeys g_t = exp(dt_{t+1} A) g_{t+1} + C_t dy'_t (dy' = dy * silu(z)),
the same linear structure run backwards, so it is chunked the same way:
  1. _bwd_chunk_local_kernel    every chunk from a zero gradient: the gradient its own outputs
     send to the state before it, and sum(dt).
  2. _carry_kernel (REVERSE)    seeded with d final_state: the gradient arriving at every chunk's
     end; what leaves the first chunk is d initial_state.
  3. _bwd_chunk_kernel          every chunk, two walks. Forward from the saved entering state:
     h_t, dz, dC, and two things that need h but would otherwise need it in reverse order:
     dA, accumulated in forward mode (dh/dA is diagonal: W_t = a_t (W_{t-1} + dt_t h_{t-1}),
     dA = sum_t c_t W_t + g_end W_end), and alpha_t = sum_n A C_t dy'_t h_t, written to an fp32
     [tokens, Dm] scratch. Backward from the arriving gradient: g_t, du, dB, and ddelta, whose
     decay term tau_t = sum_n A g_t a_t h_{t-1} follows from the adjoint identity
     g_t h_t = g_{t+1} (h_{t+1} - x_{t+1}) + c_t h_t as tau_t = tau_{t+1} + alpha_t - beta_t
     (beta_t = sum_n A g_t x_t, x_t = dt_t u_t B_t), started from sum_n A g_end h_end. So no
     state is ever needed in reverse order, and no kernel stores one state per token.
  Reductions: dB, dC (over channels) leave one fp32 partial per channel block; dA, dD,
  d delta_bias (over time) one per chunk; torch sums them (deterministic, no atomics).

Bytes moved per token (e = bytes per element of u, S = 4 N Dm / CHUNK = state bytes per token,
Dm bytes at N = 16; rows of B and C, N e each, are shared by all channel blocks and hit L2):
  forward   pass 1 reads u, delta (2 e Dm), writes S; pass 2 reads and writes S; pass 3 reads
            u, delta, z (3 e Dm) and S, writes y (e Dm).                  6 e Dm + 4 S
  backward  pass 1 reads delta, z, dy (3 e Dm), writes S; pass 2 reads and writes S; pass 3
            reads u, delta, z, dy (4 e Dm; its second walk re-reads them from L2) and 2 S,
            writes du, ddelta, dz (3 e Dm), alpha (4 Dm, read back), dA partials (S) and dB, dC
            partials (8 N Dm / BD), which torch then reads to sum.
                                                         10 e Dm + 7 S + 8 Dm + 16 N Dm / BD
  bf16, N = 16, BD = 64: about 16 Dm forward and 39 Dm backward, against 8 Dm and 14 Dm for
  reading the inputs and writing the outputs once. Saved for backward: the inputs and S.
The carry passes walk T / CHUNK chunks one after another on a small [BD, BN] tile: latency-
bound, but CHUNK times fewer steps than the token walks.

Decode (selective_state_update): one program per (row, channel block) reads its slot's state,
writes it back in place and writes y: 8 N Dm bytes per row for an fp32 state, no host sync.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference
from ._common import (FLOAT_DTYPES, INDEX_DTYPES, check, check_cu_seqlens, device_guard, new_output,
                      same_dtype, use_triton)

STATE_DTYPES = (torch.float32, torch.float64)  # A and recurrent states are fp32 (DESIGN.md), or float64
CHUNK = 64  # tokens per chunk: backward keeps one fp32 [Dm, N] state per chunk
BLOCK_D = 64  # at most this many channels per program
TILE = 2048  # at most this many state elements [BD, BN] per program


# ---------------------------------------------------------------------------------------------
# helpers shared by the kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _softplus(x):
    """log(1 + exp(x)) for any x, with log1p written out (the interpreter has no libdevice)."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    # log(w) * e / (w - 1) undoes the rounding of 1 + e; w == 1 only when e is below fp32 epsilon
    m_tiny = w == 1.0
    return tl.maximum(x, 0.0) + tl.where(m_tiny, e, tl.log(w) * e / tl.where(m_tiny, 1.0, w - 1.0))


@triton.jit
def _chunk_rows(p_chunks, i_c):
    """[t0, t1) rows of chunk i_c in the flattened [batch * T] token axis."""
    t0 = tl.load(p_chunks + i_c * 2).to(tl.int64)
    t1 = tl.load(p_chunks + i_c * 2 + 1).to(tl.int64)
    return t0, t1


@triton.jit
def _load_vec(p, o, m, HAS: tl.constexpr):
    """A per-channel parameter (D, delta_bias) as fp32, or zeros when absent."""
    if HAS:
        return tl.load(p + o, mask=m, other=0.).to(tl.float32)
    else:
        return tl.zeros(o.shape, dtype=tl.float32)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_chunk_kernel(p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_chunks, p_h, p_dtsum, p_y, Dm, N,
                      LOCAL: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SOFTPLUS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    # grid: (chunks, channel blocks). LOCAL: start from zero, write the end state to p_h and
    # sum(dt) to p_dtsum. Otherwise: start from the entering state in p_h and write y.
    i_c, i_d = tl.program_id(0), tl.program_id(1)
    t0, t1 = _chunk_rows(p_chunks, i_c)
    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    o_n = tl.arange(0, BN)  # [BN]
    m_d, m_n = o_d < Dm, o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]  # [BD, BN] in a [Dm, N] state
    o_h = i_c.to(tl.int64) * Dm * N + o_dn
    b_A = tl.load(p_A + o_dn, mask=m_dn, other=0.)  # [BD, BN]
    b_bias = _load_vec(p_bias, o_d, m_d, HAS_BIAS)  # [BD]
    if LOCAL:
        b_h = tl.zeros([BD, BN], dtype=tl.float32)
        b_dtsum = tl.zeros([BD], dtype=tl.float32)
    else:
        b_h = tl.load(p_h + o_h, mask=m_dn, other=0.)  # [BD, BN]
        b_D = _load_vec(p_D, o_d, m_d, HAS_D)  # [BD]
    for t in range(t0, t1):
        o_row = t * Dm + o_d  # [BD]
        b_dt = tl.load(p_delta + o_row, mask=m_d, other=0.).to(tl.float32) + b_bias  # [BD]
        if SOFTPLUS:
            b_dt = _softplus(b_dt)
        b_u = tl.load(p_u + o_row, mask=m_d, other=0.).to(tl.float32)  # [BD]
        b_B = tl.load(p_B + t * N + o_n, mask=m_n, other=0.).to(tl.float32)  # [BN]
        b_h = tl.exp(b_dt[:, None] * b_A) * b_h + (b_dt * b_u)[:, None] * b_B[None, :]
        if LOCAL:
            b_dtsum += b_dt
        else:
            b_C = tl.load(p_C + t * N + o_n, mask=m_n, other=0.).to(tl.float32)  # [BN]
            b_y = tl.sum(b_h * b_C[None, :], axis=1) + b_D * b_u  # [BD]
            if HAS_Z:
                b_z = tl.load(p_z + o_row, mask=m_d, other=0.).to(tl.float32)
                b_y = b_y * b_z * tl.sigmoid(b_z)
            tl.store(p_y + o_row, b_y.to(p_y.dtype.element_ty), mask=m_d)
    if LOCAL:
        tl.store(p_h + o_h, b_h, mask=m_dn)
        tl.store(p_dtsum + i_c.to(tl.int64) * Dm + o_d, b_dtsum, mask=m_d)


@triton.jit
def _carry_kernel(p_A, p_h0, p_local, p_dtsum, p_first, p_carry, p_out, Dm, N,
                  HAS_H0: tl.constexpr, REVERSE: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    # grid: (sequences, channel blocks). Walks one sequence's chunks in order (REVERSE: last
    # first) with v <- exp(A sum dt_c) v + local_c, writing to carry[c] the v that enters chunk c
    # and to out the v that leaves the sequence. Forward, v is the state (local_c: chunk c's end
    # state from zero). Backward, v is the gradient w.r.t. the state (local_c: what chunk c's own
    # outputs send to the state before it; carry[c]: the gradient arriving at chunk c's end).
    i_n, i_d = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    o_n = tl.arange(0, BN)  # [BN]
    m_d, m_n = o_d < Dm, o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]  # [BD, BN]
    o_seq = i_n.to(tl.int64) * Dm * N + o_dn
    b_A = tl.load(p_A + o_dn, mask=m_dn, other=0.)  # [BD, BN]
    if HAS_H0:
        b_v = tl.load(p_h0 + o_seq, mask=m_dn, other=0.).to(tl.float32)
    else:
        b_v = tl.zeros([BD, BN], dtype=tl.float32)
    c_lo = tl.load(p_first + i_n)
    c_hi = tl.load(p_first + i_n + 1)
    for i in range(c_hi - c_lo):
        if REVERSE:
            i_c = (c_hi - 1 - i).to(tl.int64)
        else:
            i_c = (c_lo + i).to(tl.int64)
        tl.store(p_carry + i_c * Dm * N + o_dn, b_v, mask=m_dn)
        b_s = tl.load(p_dtsum + i_c * Dm + o_d, mask=m_d, other=0.)  # [BD]
        b_v = tl.exp(b_s[:, None] * b_A) * b_v + tl.load(p_local + i_c * Dm * N + o_dn, mask=m_dn, other=0.)
    tl.store(p_out + o_seq, b_v, mask=m_dn)


@triton.jit
def _bwd_chunk_local_kernel(p_delta, p_A, p_C, p_z, p_bias, p_dy, p_chunks, p_q, p_dtsum, Dm, N,
                            HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                            BD: tl.constexpr, BN: tl.constexpr):
    # grid: (chunks, channel blocks). q = sum_t (a_t0 ... a_t) C_t dy'_t: the gradient w.r.t. the
    # state before the chunk from the chunk's own outputs; a running decay product, no reversal.
    i_c, i_d = tl.program_id(0), tl.program_id(1)
    t0, t1 = _chunk_rows(p_chunks, i_c)
    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    o_n = tl.arange(0, BN)  # [BN]
    m_d, m_n = o_d < Dm, o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]  # [BD, BN]
    b_A = tl.load(p_A + o_dn, mask=m_dn, other=0.)  # [BD, BN]
    b_bias = _load_vec(p_bias, o_d, m_d, HAS_BIAS)  # [BD]
    b_decay = tl.full([BD, BN], 1.0, dtype=tl.float32)  # a_t0 ... a_t
    b_q = tl.zeros([BD, BN], dtype=tl.float32)
    b_dtsum = tl.zeros([BD], dtype=tl.float32)
    for t in range(t0, t1):
        o_row = t * Dm + o_d  # [BD]
        b_dt = tl.load(p_delta + o_row, mask=m_d, other=0.).to(tl.float32) + b_bias  # [BD]
        if SOFTPLUS:
            b_dt = _softplus(b_dt)
        b_dyg = tl.load(p_dy + o_row, mask=m_d, other=0.).to(tl.float32)  # [BD] dy' = dy * silu(z)
        if HAS_Z:
            b_z = tl.load(p_z + o_row, mask=m_d, other=0.).to(tl.float32)
            b_dyg = b_dyg * b_z * tl.sigmoid(b_z)
        b_C = tl.load(p_C + t * N + o_n, mask=m_n, other=0.).to(tl.float32)  # [BN]
        b_decay *= tl.exp(b_dt[:, None] * b_A)
        b_q += b_decay * (b_dyg[:, None] * b_C[None, :])
        b_dtsum += b_dt
    tl.store(p_q + i_c.to(tl.int64) * Dm * N + o_dn, b_q, mask=m_dn)
    tl.store(p_dtsum + i_c.to(tl.int64) * Dm + o_d, b_dtsum, mask=m_d)


@triton.jit
def _bwd_chunk_kernel(p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_dy, p_chunks, p_h, p_g, p_alpha,
                      p_du, p_ddelta, p_dz, p_dA, p_dD, p_dbias, p_dB, p_dC, R, Dm, N,
                      HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                      BD: tl.constexpr, BN: tl.constexpr):
    # grid: (chunks, channel blocks). p_h: the state entering the chunk, p_g: the gradient
    # arriving at its end. Writes du, ddelta, dz rows; partials dA, dD, d delta_bias for this
    # chunk and dB, dC rows for this channel block.
    i_c, i_d = tl.program_id(0), tl.program_id(1)
    t0, t1 = _chunk_rows(p_chunks, i_c)
    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    o_n = tl.arange(0, BN)  # [BN]
    m_d, m_n = o_d < Dm, o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]  # [BD, BN]
    o_h = i_c.to(tl.int64) * Dm * N + o_dn
    o_bc = i_d.to(tl.int64) * R * N + o_n  # [BN] into this block's [R, N] dB, dC partial
    b_A = tl.load(p_A + o_dn, mask=m_dn, other=0.)  # [BD, BN]
    b_D = _load_vec(p_D, o_d, m_d, HAS_D)  # [BD]
    b_bias = _load_vec(p_bias, o_d, m_d, HAS_BIAS)  # [BD]
    b_h = tl.load(p_h + o_h, mask=m_dn, other=0.)  # [BD, BN] h_{t0-1}
    b_gend = tl.load(p_g + o_h, mask=m_dn, other=0.)  # [BD, BN] dL/dh_{t1-1} from later tokens
    b_W = tl.zeros([BD, BN], dtype=tl.float32)  # dh_t/dA with the entering state held fixed
    b_dA = tl.zeros([BD, BN], dtype=tl.float32)
    b_dD = tl.zeros([BD], dtype=tl.float32)

    # forward walk: everything that needs h_t
    for t in range(t0, t1):
        o_row = t * Dm + o_d  # [BD]
        b_dt = tl.load(p_delta + o_row, mask=m_d, other=0.).to(tl.float32) + b_bias  # [BD]
        if SOFTPLUS:
            b_dt = _softplus(b_dt)
        b_u = tl.load(p_u + o_row, mask=m_d, other=0.).to(tl.float32)  # [BD]
        b_B = tl.load(p_B + t * N + o_n, mask=m_n, other=0.).to(tl.float32)  # [BN]
        b_C = tl.load(p_C + t * N + o_n, mask=m_n, other=0.).to(tl.float32)  # [BN]
        b_a = tl.exp(b_dt[:, None] * b_A)  # [BD, BN]
        b_W = b_a * (b_W + b_dt[:, None] * b_h)  # d(a_t h_{t-1})/dA = dt_t a_t h_{t-1}
        b_h = b_a * b_h + (b_dt * b_u)[:, None] * b_B[None, :]
        b_dyg = tl.load(p_dy + o_row, mask=m_d, other=0.).to(tl.float32)  # [BD]
        if HAS_Z:
            b_z = tl.load(p_z + o_row, mask=m_d, other=0.).to(tl.float32)
            b_sig = tl.sigmoid(b_z)
            b_y = tl.sum(b_h * b_C[None, :], axis=1) + b_D * b_u  # [BD] y before the gate
            # d silu(z) / dz = sig(z) * (1 + z * (1 - sig(z)))
            tl.store(p_dz + o_row, (b_dyg * b_y * b_sig * (1. + b_z * (1. - b_sig))).to(p_dz.dtype.element_ty),
                     mask=m_d)
            b_dyg = b_dyg * b_z * b_sig
        b_c = b_dyg[:, None] * b_C[None, :]  # [BD, BN] dL/dh_t through y_t alone
        b_dA += b_c * b_W
        tl.store(p_alpha + o_row, tl.sum(b_A * b_c * b_h, axis=1), mask=m_d)
        tl.store(p_dC + o_bc + t * N, tl.sum(b_h * b_dyg[:, None], axis=0), mask=m_n)
        b_dD += b_dyg * b_u
    # b_h is now the chunk's end state
    b_dA += b_gend * b_W
    b_tau = tl.sum(b_A * b_gend * b_h, axis=1)  # [BD]
    # alpha is read back below by whichever thread owns each element in that layout
    tl.debug_barrier()

    # backward walk: g_t = a_{t+1} g_{t+1} + c_t, and everything that needs it
    b_g = b_gend
    b_anext = tl.full([BD, BN], 1.0, dtype=tl.float32)  # a_{t+1}; g_{t1-1} = g_end + c_{t1-1}
    b_dbias = tl.zeros([BD], dtype=tl.float32)
    for i in range(t1 - t0):
        t = t1 - 1 - i
        o_row = t * Dm + o_d  # [BD]
        b_v = tl.load(p_delta + o_row, mask=m_d, other=0.).to(tl.float32) + b_bias  # [BD]
        b_dt = b_v
        if SOFTPLUS:
            b_dt = _softplus(b_v)
        b_u = tl.load(p_u + o_row, mask=m_d, other=0.).to(tl.float32)  # [BD]
        b_B = tl.load(p_B + t * N + o_n, mask=m_n, other=0.).to(tl.float32)  # [BN]
        b_C = tl.load(p_C + t * N + o_n, mask=m_n, other=0.).to(tl.float32)  # [BN]
        b_dyg = tl.load(p_dy + o_row, mask=m_d, other=0.).to(tl.float32)  # [BD]
        if HAS_Z:
            b_z = tl.load(p_z + o_row, mask=m_d, other=0.).to(tl.float32)
            b_dyg = b_dyg * b_z * tl.sigmoid(b_z)
        b_g = b_anext * b_g + b_dyg[:, None] * b_C[None, :]  # [BD, BN] dL/dh_t
        b_gB = tl.sum(b_g * b_B[None, :], axis=1)  # [BD]
        b_beta = b_dt * b_u * tl.sum(b_A * b_g * b_B[None, :], axis=1)  # sum_n A g_t x_t
        b_tau += tl.load(p_alpha + o_row, mask=m_d, other=0.) - b_beta
        b_ddt = b_tau + b_u * b_gB  # through a_t (tau_t) and through x_t
        tl.store(p_du + o_row, (b_dt * b_gB + b_D * b_dyg).to(p_du.dtype.element_ty), mask=m_d)
        if SOFTPLUS:
            b_ddt = b_ddt * tl.sigmoid(b_v)
        tl.store(p_ddelta + o_row, b_ddt.to(p_ddelta.dtype.element_ty), mask=m_d)
        b_dbias += b_ddt
        tl.store(p_dB + o_bc + t * N, tl.sum(b_g * (b_dt * b_u)[:, None], axis=0), mask=m_n)
        b_anext = tl.exp(b_dt[:, None] * b_A)

    tl.store(p_dA + o_h, b_dA, mask=m_dn)
    tl.store(p_dD + i_c.to(tl.int64) * Dm + o_d, b_dD, mask=m_d)
    tl.store(p_dbias + i_c.to(tl.int64) * Dm + o_d, b_dbias, mask=m_d)


@triton.jit
def _state_update_kernel(p_state, p_x, p_dt, p_A, p_B, p_C, p_D, p_z, p_bias, p_idx, p_y,
                         stride_s, stride_d, stride_n, Dm, N,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr,
                         SOFTPLUS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    # grid: (batch rows, channel blocks)
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    if HAS_IDX:
        i_s = tl.load(p_idx + i_b).to(tl.int64)  # this row's slot, -1 for padding
    else:
        i_s = i_b.to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    o_n = tl.arange(0, BN)  # [BN]
    m_d, m_n = o_d < Dm, o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    m_h = tl.where(i_s >= 0, m_dn, False)  # a padding row reads and writes no state
    p_h = p_state + tl.maximum(i_s, 0) * stride_s + o_d[:, None] * stride_d + o_n[None, :] * stride_n  # [BD, BN]
    o_row = i_b.to(tl.int64) * Dm + o_d  # [BD]
    o_bc = i_b.to(tl.int64) * N + o_n  # [BN]
    b_h = tl.load(p_h, mask=m_h, other=0.).to(tl.float32)  # [BD, BN]
    b_A = tl.load(p_A + o_d[:, None] * N + o_n[None, :], mask=m_dn, other=0.)  # [BD, BN]
    b_dt = tl.load(p_dt + o_row, mask=m_d, other=0.).to(tl.float32) + _load_vec(p_bias, o_d, m_d, HAS_BIAS)  # [BD]
    if SOFTPLUS:
        b_dt = _softplus(b_dt)
    b_x = tl.load(p_x + o_row, mask=m_d, other=0.).to(tl.float32)  # [BD]
    b_B = tl.load(p_B + o_bc, mask=m_n, other=0.).to(tl.float32)  # [BN]
    b_C = tl.load(p_C + o_bc, mask=m_n, other=0.).to(tl.float32)  # [BN]
    b_h = tl.exp(b_dt[:, None] * b_A) * b_h + (b_dt * b_x)[:, None] * b_B[None, :]
    b_y = tl.sum(b_h * b_C[None, :], axis=1) + _load_vec(p_D, o_d, m_d, HAS_D) * b_x  # [BD]
    if HAS_Z:
        b_z = tl.load(p_z + o_row, mask=m_d, other=0.).to(tl.float32)
        b_y = b_y * b_z * tl.sigmoid(b_z)
    tl.store(p_y + o_row, tl.where(i_s >= 0, b_y, 0.).to(p_y.dtype.element_ty), mask=m_d)
    # the state is rewritten in place: when the tile is smaller than the program, elements are
    # replicated across threads, and every copy must be read before any thread overwrites it
    tl.debug_barrier()
    tl.store(p_h, b_h.to(p_state.dtype.element_ty), mask=m_h)


# ---------------------------------------------------------------------------------------------
# host side: chunk table, custom ops
# ---------------------------------------------------------------------------------------------

def _blocks(Dm: int, N: int) -> tuple[int, int]:
    """(BD, BN): channels and (padded) states per program."""
    BN = triton.next_power_of_2(N)
    return max(1, min(BLOCK_D, triton.next_power_of_2(Dm), TILE // BN)), BN


def _num_seqs(u: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> int:
    return u.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _max_chunks(u: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> int:
    """An upper bound on the number of chunks that depends on shapes only: a packed sequence
    adds at most one partial chunk to what its tokens fill."""
    T = u.shape[1]
    if cu_seqlens is None:
        return u.shape[0] * triton.cdiv(T, CHUNK)
    return triton.cdiv(T, CHUNK) + cu_seqlens.shape[0] - 1


def _chunk_table(u: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks of at most CHUNK tokens inside one sequence each, built on the device (no sync).

    Returns chunks int32 [U, 2] (first row, end row) over the flattened [batch * T] rows, and
    first int32 [S+1]: sequence s owns chunks first[s] .. first[s+1]-1. The last sequence also
    owns the table's spare rows (U is a bound from shapes alone): empty chunks, which pass the
    state and its gradient through unchanged, so every slot of every buffer gets written."""
    batch, T = u.shape[:2]
    if cu_seqlens is None:
        cu = torch.arange(batch + 1, device=u.device) * T
    else:
        cu = cu_seqlens.long()
    n_chunks = _max_chunks(u, cu_seqlens)
    first = F.pad(torch.cumsum((cu[1:] - cu[:-1] + CHUNK - 1) // CHUNK, 0), (1, 0))  # [S+1]
    first[-1] = n_chunks
    i_c = torch.arange(n_chunks, device=u.device)
    seq = torch.searchsorted(first[1:], i_c, right=True)  # [U]
    start = torch.minimum(cu[seq] + (i_c - first[seq]) * CHUNK, cu[seq + 1])
    end = torch.minimum(start + CHUNK, cu[seq + 1])
    return torch.stack([start, end], dim=1).to(torch.int32), first.to(torch.int32)


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


@torch.library.custom_op("hybrid_lm::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                        delta_softplus: bool, initial_state: Optional[torch.Tensor],
                        cu_seqlens: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, final_state, chunk_states): the fp32 state entering every chunk, kept for backward."""
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    D, z, delta_bias, initial_state = (_contiguous(t) for t in (D, z, delta_bias, initial_state))
    Dm, N = A.shape
    chunks, first = _chunk_table(u, cu_seqlens)
    n_chunks, n_seq = chunks.shape[0], first.shape[0] - 1
    BD, BN = _blocks(Dm, N)
    grid = (n_chunks, triton.cdiv(Dm, BD))
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                 SOFTPLUS=delta_softplus, BD=BD, BN=BN)

    ends = new_output((n_chunks, Dm, N), torch.float32, u.device)
    dtsum = new_output((n_chunks, Dm), torch.float32, u.device)
    _fwd_chunk_kernel[grid](u, delta, A, B, C, D, z, delta_bias, chunks, ends, dtsum, None, Dm, N,
                            LOCAL=True, **flags)
    starts = new_output((n_chunks, Dm, N), torch.float32, u.device)
    final = new_output((n_seq, Dm, N), torch.float32, u.device)
    _carry_kernel[(n_seq, triton.cdiv(Dm, BD))](A, initial_state, ends, dtsum, first, starts, final, Dm, N,
                                                HAS_H0=initial_state is not None, REVERSE=False, BD=BD, BN=BN)
    y = new_output(u.shape, u.dtype, u.device)
    _fwd_chunk_kernel[grid](u, delta, A, B, C, D, z, delta_bias, chunks, starts, None, y, Dm, N,
                            LOCAL=False, **flags)
    return y, final, starts


@_selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens):
    Dm, N = A.shape
    return (torch.empty_like(u), u.new_empty((_num_seqs(u, cu_seqlens), Dm, N), dtype=torch.float32),
            u.new_empty((_max_chunks(u, cu_seqlens), Dm, N), dtype=torch.float32))


@torch.library.custom_op("hybrid_lm::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd(dy: torch.Tensor, dfinal: Optional[torch.Tensor], u: torch.Tensor, delta: torch.Tensor,
                        A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                        z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], delta_softplus: bool,
                        cu_seqlens: Optional[torch.Tensor], chunk_states: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); dz is empty without
    z, and the caller drops the gradients of absent inputs."""
    dy, u, delta, A, B, C = (t.contiguous() for t in (dy, u, delta, A, B, C))
    dfinal, D, z, delta_bias = (_contiguous(t) for t in (dfinal, D, z, delta_bias))
    batch, T, Dm = u.shape
    N = A.shape[1]
    R = batch * T
    chunks, first = _chunk_table(u, cu_seqlens)
    n_chunks, n_seq = chunks.shape[0], first.shape[0] - 1
    BD, BN = _blocks(Dm, N)
    n_blk = triton.cdiv(Dm, BD)
    grid = (n_chunks, n_blk)
    f32 = dict(dtype=torch.float32, device=u.device)

    q = new_output((n_chunks, Dm, N), **f32)
    dtsum = new_output((n_chunks, Dm), **f32)
    _bwd_chunk_local_kernel[grid](delta, A, C, z, delta_bias, dy, chunks, q, dtsum, Dm, N,
                                  HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                                  SOFTPLUS=delta_softplus, BD=BD, BN=BN)
    g_end = new_output((n_chunks, Dm, N), **f32)
    dinitial = new_output((n_seq, Dm, N), **f32)
    _carry_kernel[(n_seq, n_blk)](A, dfinal, q, dtsum, first, g_end, dinitial, Dm, N,
                                  HAS_H0=dfinal is not None, REVERSE=True, BD=BD, BN=BN)

    alpha = new_output((R, Dm), **f32)
    du = new_output(u.shape, u.dtype, u.device)
    ddelta = new_output(delta.shape, delta.dtype, delta.device)
    dz = u.new_empty(0) if z is None else new_output(z.shape, z.dtype, z.device)
    dA_part = q  # q is spent after the carry pass: its memory takes the per-chunk dA partials
    dDb_part = new_output((2, n_chunks, Dm), **f32)  # dD, d delta_bias
    dBC_part = new_output((2, n_blk, R, N), **f32)  # dB, dC
    _bwd_chunk_kernel[grid](u, delta, A, B, C, D, z, delta_bias, dy, chunks, chunk_states, g_end, alpha,
                            du, ddelta, dz, dA_part, dDb_part[0], dDb_part[1], dBC_part[0], dBC_part[1], R, Dm, N,
                            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                            SOFTPLUS=delta_softplus, BD=BD, BN=BN)
    dB, dC = (part.sum(0).view(batch, T, N).to(t.dtype) for part, t in zip(dBC_part, (B, C)))
    dD, ddelta_bias = (part.sum(0).to(torch.float32 if t is None else t.dtype)
                       for part, t in zip(dDb_part, (D, delta_bias)))
    return du, ddelta, dA_part.sum(0).to(A.dtype), dB, dC, dD, dz, ddelta_bias, dinitial


@_selective_scan_bwd.register_fake
def _(dy, dfinal, u, delta, A, B, C, D, z, delta_bias, delta_softplus, cu_seqlens, chunk_states):
    Dm, N = A.shape
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), u.new_empty(Dm, dtype=torch.float32 if D is None else D.dtype),
            u.new_empty(0) if z is None else torch.empty_like(z),
            u.new_empty(Dm, dtype=torch.float32 if delta_bias is None else delta_bias.dtype),
            u.new_empty((_num_seqs(u, cu_seqlens), Dm, N), dtype=torch.float32))


def _setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.has_initial_state = initial_state is not None
    # an unused output's gradient arrives as None: without output_final_state (the common case)
    # the backward carry starts from zero instead of reading a tensor of zeros
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dfinal, _dchunk_states):
    u, delta, A, B, C, D, z, delta_bias, cu_seqlens, chunk_states = ctx.saved_tensors
    if dy is None:  # only the final state was used
        dy = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial = _selective_scan_bwd(
        dy, dfinal, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, cu_seqlens, chunk_states)
    return (du, ddelta, dA, dB, dC, None if D is None else dD, None if z is None else dz,
            None if delta_bias is None else ddelta_bias, None,
            dinitial if ctx.has_initial_state else None, None)


torch.library.register_autograd("hybrid_lm::selective_scan_fwd", _backward, setup_context=_setup)


@torch.library.custom_op("hybrid_lm::selective_state_update", mutates_args=("state",))
def _selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                            B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                            dt_bias: Optional[torch.Tensor], dt_softplus: bool,
                            state_indices: Optional[torch.Tensor]) -> torch.Tensor:
    # state keeps its own strides (it is updated in place: a contiguous copy would be lost)
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    D, z, dt_bias = (_contiguous(t) for t in (D, z, dt_bias))
    batch, Dm = x.shape
    N = A.shape[1]
    y = new_output(x.shape, x.dtype, x.device)
    BN = triton.next_power_of_2(N)
    BD = max(1, min(triton.next_power_of_2(Dm), 1024 // BN))
    _state_update_kernel[(batch, triton.cdiv(Dm, BD))](
        state, x, dt, A, B, C, D, z, dt_bias, state_indices, y, *state.stride(), Dm, N,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        HAS_IDX=state_indices is not None, SOFTPLUS=dt_softplus, BD=BD, BN=BN)
    return y


@_selective_state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_indices):
    return torch.empty_like(x)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------

def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected a bool, got {type(value).__name__}")


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                   cu_seqlens: Optional[torch.Tensor] = None):
    """Mamba-1 selective scan, differentiable in every tensor input and through the final state.

    u, delta, z: [B, T, Dm], any float dtype each; A: [Dm, N] fp32 or float64; B, C: [B, T, N]
    (u's dtype); D, delta_bias: [Dm] (u's dtype or fp32). dt = softplus(delta + delta_bias) if
    delta_softplus else delta + delta_bias; h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t;
    y_t = <h_t, C_t> + D u_t, times silu(z_t) with z. initial_state: [S, Dm, N] fp32 or float64,
    S = B or the number of packed sequences (zeros if None). cu_seqlens: int32 [S+1] offsets of
    packed sequences (B = 1): starting at 0, non-decreasing, ending at T (checked on the host for
    CPU tensors, by a device-side assert for CUDA ones). Returns y [B, T, Dm] in u's dtype, and
    with output_final_state also the final state [S, Dm, N] fp32.
    """
    dims: dict = {}
    check("u", u, ("batch", "T", "Dm"), dims, FLOAT_DTYPES)
    check("delta", delta, ("batch", "T", "Dm"), dims, FLOAT_DTYPES, u.device)
    check("A", A, ("Dm", "N"), dims, STATE_DTYPES, u.device)
    check("B", B, ("batch", "T", "N"), dims, same_dtype(u), u.device)
    check("C", C, ("batch", "T", "N"), dims, same_dtype(u), u.device)
    check("D", D, ("Dm",), dims, same_dtype(u, torch.float32), u.device, optional=True)
    check("z", z, ("batch", "T", "Dm"), dims, FLOAT_DTYPES, u.device, optional=True)
    check("delta_bias", delta_bias, ("Dm",), dims, same_dtype(u, torch.float32), u.device, optional=True)
    _check_flag("delta_softplus", delta_softplus)
    _check_flag("output_final_state", output_final_state)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, u.shape[0], u.shape[1], u.device)
    dims["S"] = _num_seqs(u, cu_seqlens)
    check("initial_state", initial_state, ("S", "Dm", "N"), dims, STATE_DTYPES, u.device, optional=True)
    if not use_triton(u):
        return reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                        output_final_state, cu_seqlens)
    with device_guard(u):
        y, final_state, _ = _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                initial_state, cu_seqlens)
    return (y, final_state) if output_final_state else y


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                           z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                           dt_softplus: bool = False, state_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One decode step of selective_scan, updating state in place; returns y [B, Dm].

    state: [S, Dm, N], any float dtype and strides (math in fp32). x, dt, z: [B, Dm]; A: [Dm, N]
    fp32 or float64; B, C: [B, N]; D, dt_bias: [Dm]; any float dtype for all but A. state_indices:
    [B] int32/int64, the slot of each row (None: row b uses slot b, needs S >= B); a row with
    index -1 is padding: its output is zeros and no slot changes. Indices are not read on the host
    (no sync, CUDA-graph safe), so they must lie in [-1, S) and be distinct.
    """
    dims: dict = {}
    check("state", state, ("S", "Dm", "N"), dims, FLOAT_DTYPES)
    check("x", x, ("batch", "Dm"), dims, FLOAT_DTYPES, state.device)
    check("dt", dt, ("batch", "Dm"), dims, FLOAT_DTYPES, state.device)
    check("A", A, ("Dm", "N"), dims, STATE_DTYPES, state.device)
    check("B", B, ("batch", "N"), dims, FLOAT_DTYPES, state.device)
    check("C", C, ("batch", "N"), dims, FLOAT_DTYPES, state.device)
    check("D", D, ("Dm",), dims, FLOAT_DTYPES, state.device, optional=True)
    check("z", z, ("batch", "Dm"), dims, FLOAT_DTYPES, state.device, optional=True)
    check("dt_bias", dt_bias, ("Dm",), dims, FLOAT_DTYPES, state.device, optional=True)
    _check_flag("dt_softplus", dt_softplus)
    check("state_indices", state_indices, ("batch",), dims, INDEX_DTYPES, state.device, optional=True)
    if state_indices is None and state.shape[0] < x.shape[0]:
        raise ValueError(f"state: expected at least B={x.shape[0]} slots without state_indices, "
                         f"got shape {list(state.shape)}")
    if not use_triton(x):
        return reference.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_indices)
    with device_guard(x):
        return _selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_indices)
