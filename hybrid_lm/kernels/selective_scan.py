"""Mamba-1 selective scan (https://arxiv.org/abs/2312.00752): chunked forward and backward in
Triton, and the one-token decode step.

Per channel d and state index n, with an fp32 state h [Dm, N]:

    dt_t = softplus(delta_t + delta_bias)   (or delta_t + delta_bias)
    h_t  = exp(dt_t A) * h_{t-1} + (dt_t u_t) B_t
    y_t  = <h_t, C_t> + D u_t ,   y_t *= silu(z_t)

Chunks. Time is cut into chunks of CHUNK tokens that never cross a sequence boundary (the chunk
table is built on the device from cu_seqlens with searchsorted: no host sync, shapes depend on
input shapes only). A program owns one chunk and a block of BD channels with all N states, a
[BD, BN] fp32 tile in registers, and walks the chunk token by token. Parallelism is
chunks x channel blocks (batch 1 with T = 4096, Dm = 4096, BD = 64 gives 64 x 64 programs); only
the state entering each chunk is ever written to memory, so backward keeps 4 N Dm / CHUNK bytes
per token (Dm bytes at N = 16), not 4 N Dm. BD and num_warps are autotuned on CUDA per kernel,
except _bwd_chunk_kernel's BD, which sizes per-channel-block partials (see BLOCK_D); every
kernel walks a token with the same loads (`_load_token`).

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
from ._common import (FLOAT_DTYPES, INDEX_DTYPES, check, check_cu_seqlens, check_flag, check_slots, configs,
                      contiguous, device_guard, has, new_output, num_seqs, same_dtype, use_triton)

STATE_DTYPES = (torch.float32, torch.float64)  # A and recurrent states are fp32 (docs/kernels.md), or float64
CHUNK = 64  # tokens per chunk: backward keeps one fp32 [Dm, N] state per chunk
# _bwd_chunk_kernel writes dB, dC partials per channel block, allocated by the host before the
# launch, so its BD is fixed here rather than autotuned: at most BLOCK_D channels, and at most
# TILE state elements [BD, BN] per program
BLOCK_D = 64
TILE = 2048

# Autotune configs, keyed on Dm and N (not on T: a new sequence length should not tune again).
# Every program holds all N states (BN = N padded to a power of two: y sums over them), so only
# BD is tuned; the small blocks keep the [BD, BN] tile in registers for large N.
SCAN_CONFIGS = configs([triton.Config({"BD": bd}, num_warps=w) for bd, w in ((16, 2), (32, 4), (64, 4), (64, 8))],
                       triton.Config({"BD": 32}, num_warps=4))
# _bwd_chunk_kernel: the host's BD (see BLOCK_D), tuned warps
BWD_CONFIGS = configs([triton.Config({}, num_warps=w) for w in (2, 4, 8)], triton.Config({}, num_warps=4))
# decode: each program reads and writes one [BD, BN] slice of a slot's state
UPDATE_CONFIGS = configs([triton.Config({"BD": bd}, num_warps=w)
                          for bd, w in ((8, 4), (16, 4), (32, 4), (64, 4), (64, 8))],
                         triton.Config({"BD": 32}, num_warps=4))


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


@triton.jit
def _state_tile(i_d, Dm, N, BD: tl.constexpr, BN: tl.constexpr):
    """Channel block i_d with all N states: channels o_d [BD], states o_n [BN], their masks, and
    the offsets o_dn and mask m_dn of the [BD, BN] tile in a row-major [Dm, N] state."""
    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    o_n = tl.arange(0, BN)  # [BN]
    m_d, m_n = o_d < Dm, o_n < N
    return o_d, o_n, m_d, m_n, o_d[:, None] * N + o_n[None, :], m_d[:, None] & m_n[None, :]


@triton.jit
def _load_token(p_u, p_delta, p_B, p_C, b_bias, t, o_d, m_d, o_n, m_n, Dm, N, SOFTPLUS: tl.constexpr):
    """Row t of the flattened [batch * T] token axis for channels o_d, in fp32: its offsets o_row
    [BD], v = delta + delta_bias [BD], dt [BD] (softplus(v) or v), u [BD], and the B and C rows
    [BN] that all channels share. A kernel that needs only some of them leaves the rest unused;
    the compiler drops unused loads."""
    o_row = t * Dm + o_d  # [BD]
    b_v = tl.load(p_delta + o_row, mask=m_d, other=0.).to(tl.float32) + b_bias
    b_dt = b_v
    if SOFTPLUS:
        b_dt = _softplus(b_v)
    b_u = tl.load(p_u + o_row, mask=m_d, other=0.).to(tl.float32)
    b_B = tl.load(p_B + t * N + o_n, mask=m_n, other=0.).to(tl.float32)
    b_C = tl.load(p_C + t * N + o_n, mask=m_n, other=0.).to(tl.float32)
    return o_row, b_v, b_dt, b_u, b_B, b_C


@triton.jit
def _gate(b_x, p_z, o_row, m_d, HAS_Z: tl.constexpr):
    """b_x [BD] times silu(z) at o_row, or b_x without a gate."""
    if HAS_Z:
        b_z = tl.load(p_z + o_row, mask=m_d, other=0.).to(tl.float32)
        b_x = b_x * b_z * tl.sigmoid(b_z)
    return b_x


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.heuristics({"HAS_D": has("p_D"), "HAS_Z": has("p_z"), "HAS_BIAS": has("p_bias")})
@triton.autotune(SCAN_CONFIGS, key=["Dm", "N", "LOCAL"])
@triton.jit
def _fwd_chunk_kernel(p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_chunks, p_h, p_dtsum, p_y, Dm, N,
                      LOCAL: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SOFTPLUS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    # grid: (chunks, channel blocks). LOCAL: start from zero, write the end state to p_h and
    # sum(dt) to p_dtsum. Otherwise: start from the entering state in p_h and write y.
    i_c, i_d = tl.program_id(0), tl.program_id(1)
    t0, t1 = _chunk_rows(p_chunks, i_c)
    o_d, o_n, m_d, m_n, o_dn, m_dn = _state_tile(i_d, Dm, N, BD, BN)
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
        o_row, _, b_dt, b_u, b_B, b_C = _load_token(p_u, p_delta, p_B, p_C, b_bias, t, o_d, m_d, o_n, m_n,
                                                    Dm, N, SOFTPLUS)
        b_h = tl.exp(b_dt[:, None] * b_A) * b_h + (b_dt * b_u)[:, None] * b_B[None, :]
        if LOCAL:
            b_dtsum += b_dt
        else:
            b_y = _gate(tl.sum(b_h * b_C[None, :], axis=1) + b_D * b_u, p_z, o_row, m_d, HAS_Z)  # [BD]
            tl.store(p_y + o_row, b_y.to(p_y.dtype.element_ty), mask=m_d)
    if LOCAL:
        tl.store(p_h + o_h, b_h, mask=m_dn)
        tl.store(p_dtsum + i_c.to(tl.int64) * Dm + o_d, b_dtsum, mask=m_d)


@triton.heuristics({"HAS_H0": has("p_h0")})
@triton.autotune(SCAN_CONFIGS, key=["Dm", "N"])
@triton.jit
def _carry_kernel(p_A, p_h0, p_local, p_dtsum, p_first, p_carry, p_out, Dm, N,
                  HAS_H0: tl.constexpr, REVERSE: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    # grid: (sequences, channel blocks). Walks one sequence's chunks in order (REVERSE: last
    # first) with v <- exp(A sum dt_c) v + local_c, writing to carry[c] the v that enters chunk c
    # and to out the v that leaves the sequence. Forward, v is the state (local_c: chunk c's end
    # state from zero). Backward, v is the gradient w.r.t. the state (local_c: what chunk c's own
    # outputs send to the state before it; carry[c]: the gradient arriving at chunk c's end).
    i_n, i_d = tl.program_id(0), tl.program_id(1)
    o_d, _, m_d, _, o_dn, m_dn = _state_tile(i_d, Dm, N, BD, BN)
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


@triton.heuristics({"HAS_Z": has("p_z"), "HAS_BIAS": has("p_bias")})
@triton.autotune(SCAN_CONFIGS, key=["Dm", "N"])
@triton.jit
def _bwd_chunk_local_kernel(p_u, p_delta, p_A, p_B, p_C, p_z, p_bias, p_dy, p_chunks, p_q, p_dtsum, Dm, N,
                            HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                            BD: tl.constexpr, BN: tl.constexpr):
    # grid: (chunks, channel blocks). q = sum_t (a_t0 ... a_t) C_t dy'_t: the gradient w.r.t. the
    # state before the chunk from the chunk's own outputs; a running decay product, no reversal.
    i_c, i_d = tl.program_id(0), tl.program_id(1)
    t0, t1 = _chunk_rows(p_chunks, i_c)
    o_d, o_n, m_d, m_n, o_dn, m_dn = _state_tile(i_d, Dm, N, BD, BN)
    b_A = tl.load(p_A + o_dn, mask=m_dn, other=0.)  # [BD, BN]
    b_bias = _load_vec(p_bias, o_d, m_d, HAS_BIAS)  # [BD]
    b_decay = tl.full([BD, BN], 1.0, dtype=tl.float32)  # a_t0 ... a_t
    b_q = tl.zeros([BD, BN], dtype=tl.float32)
    b_dtsum = tl.zeros([BD], dtype=tl.float32)
    for t in range(t0, t1):
        o_row, _, b_dt, _, _, b_C = _load_token(p_u, p_delta, p_B, p_C, b_bias, t, o_d, m_d, o_n, m_n,
                                                Dm, N, SOFTPLUS)
        b_dyg = _gate(tl.load(p_dy + o_row, mask=m_d, other=0.).to(tl.float32), p_z, o_row, m_d, HAS_Z)  # [BD] dy'
        b_decay *= tl.exp(b_dt[:, None] * b_A)
        b_q += b_decay * (b_dyg[:, None] * b_C[None, :])
        b_dtsum += b_dt
    tl.store(p_q + i_c.to(tl.int64) * Dm * N + o_dn, b_q, mask=m_dn)
    tl.store(p_dtsum + i_c.to(tl.int64) * Dm + o_d, b_dtsum, mask=m_d)


@triton.heuristics({"HAS_D": has("p_D"), "HAS_Z": has("p_z"), "HAS_BIAS": has("p_bias")})
@triton.autotune(BWD_CONFIGS, key=["Dm", "N"])
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
    o_d, o_n, m_d, m_n, o_dn, m_dn = _state_tile(i_d, Dm, N, BD, BN)
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
        o_row, _, b_dt, b_u, b_B, b_C = _load_token(p_u, p_delta, p_B, p_C, b_bias, t, o_d, m_d, o_n, m_n,
                                                    Dm, N, SOFTPLUS)
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
        o_row, b_v, b_dt, b_u, b_B, b_C = _load_token(p_u, p_delta, p_B, p_C, b_bias, t, o_d, m_d, o_n, m_n,
                                                      Dm, N, SOFTPLUS)
        b_dyg = _gate(tl.load(p_dy + o_row, mask=m_d, other=0.).to(tl.float32), p_z, o_row, m_d, HAS_Z)  # [BD]
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


@triton.heuristics({"HAS_D": has("p_D"), "HAS_Z": has("p_z"), "HAS_BIAS": has("p_bias"), "HAS_IDX": has("p_idx")})
# the state is updated in place: every config timed must start from the same state
@triton.autotune(UPDATE_CONFIGS, key=["Dm", "N"], restore_value=["p_state"])
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
    o_d, o_n, m_d, m_n, o_dn, m_dn = _state_tile(i_d, Dm, N, BD, BN)
    m_h = tl.where(i_s >= 0, m_dn, False)  # a padding row reads and writes no state
    p_h = p_state + tl.maximum(i_s, 0) * stride_s + o_d[:, None] * stride_d + o_n[None, :] * stride_n  # [BD, BN]
    b_h = tl.load(p_h, mask=m_h, other=0.).to(tl.float32)  # [BD, BN]
    b_A = tl.load(p_A + o_dn, mask=m_dn, other=0.)  # [BD, BN]
    # one token step of the scan, with row i_b of x, dt, B, C, z as the token
    o_row, _, b_dt, b_x, b_B, b_C = _load_token(p_x, p_dt, p_B, p_C, _load_vec(p_bias, o_d, m_d, HAS_BIAS),
                                                i_b.to(tl.int64), o_d, m_d, o_n, m_n, Dm, N, SOFTPLUS)
    b_h = tl.exp(b_dt[:, None] * b_A) * b_h + (b_dt * b_x)[:, None] * b_B[None, :]
    b_y = _gate(tl.sum(b_h * b_C[None, :], axis=1) + _load_vec(p_D, o_d, m_d, HAS_D) * b_x, p_z, o_row, m_d,
                HAS_Z)  # [BD]
    tl.store(p_y + o_row, tl.where(i_s >= 0, b_y, 0.).to(p_y.dtype.element_ty), mask=m_d)
    # the state is rewritten in place: when the tile is smaller than the program, elements are
    # replicated across threads, and every copy must be read before any thread overwrites it
    tl.debug_barrier()
    tl.store(p_h, b_h.to(p_state.dtype.element_ty), mask=m_h)


# ---------------------------------------------------------------------------------------------
# host side: chunk table, custom ops
# ---------------------------------------------------------------------------------------------

def _bwd_block_d(Dm: int, BN: int) -> int:
    """_bwd_chunk_kernel's fixed BD (see BLOCK_D)."""
    return max(1, min(BLOCK_D, triton.next_power_of_2(Dm), TILE // BN))


def _grid(rows: int, Dm: int):
    """(rows, channel blocks) for the autotuned BD; rows are chunks, sequences or batch rows."""
    return lambda META: (rows, triton.cdiv(Dm, META["BD"]))


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


@torch.library.custom_op("hybrid_lm::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                        delta_softplus: bool, initial_state: Optional[torch.Tensor],
                        cu_seqlens: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, final_state, chunk_states): the fp32 state entering every chunk, kept for backward."""
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    D, z, delta_bias, initial_state = (contiguous(t) for t in (D, z, delta_bias, initial_state))
    Dm, N = A.shape
    BN = triton.next_power_of_2(N)
    chunks, first = _chunk_table(u, cu_seqlens)
    n_chunks, n_seq = chunks.shape[0], first.shape[0] - 1

    ends = new_output((n_chunks, Dm, N), torch.float32, u.device)
    dtsum = new_output((n_chunks, Dm), torch.float32, u.device)
    _fwd_chunk_kernel[_grid(n_chunks, Dm)](u, delta, A, B, C, D, z, delta_bias, chunks, ends, dtsum, None, Dm, N,
                                           LOCAL=True, SOFTPLUS=delta_softplus, BN=BN)
    starts = new_output((n_chunks, Dm, N), torch.float32, u.device)
    final = new_output((n_seq, Dm, N), torch.float32, u.device)
    _carry_kernel[_grid(n_seq, Dm)](A, initial_state, ends, dtsum, first, starts, final, Dm, N, REVERSE=False, BN=BN)
    y = new_output(u.shape, u.dtype, u.device)
    _fwd_chunk_kernel[_grid(n_chunks, Dm)](u, delta, A, B, C, D, z, delta_bias, chunks, starts, None, y, Dm, N,
                                           LOCAL=False, SOFTPLUS=delta_softplus, BN=BN)
    return y, final, starts


@_selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens):
    Dm, N = A.shape
    return (torch.empty_like(u), u.new_empty((num_seqs(u, cu_seqlens), Dm, N), dtype=torch.float32),
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
    dfinal, D, z, delta_bias = (contiguous(t) for t in (dfinal, D, z, delta_bias))
    batch, T, Dm = u.shape
    N = A.shape[1]
    BN = triton.next_power_of_2(N)
    R = batch * T
    chunks, first = _chunk_table(u, cu_seqlens)
    n_chunks, n_seq = chunks.shape[0], first.shape[0] - 1
    f32 = dict(dtype=torch.float32, device=u.device)

    q = new_output((n_chunks, Dm, N), **f32)
    dtsum = new_output((n_chunks, Dm), **f32)
    _bwd_chunk_local_kernel[_grid(n_chunks, Dm)](u, delta, A, B, C, z, delta_bias, dy, chunks, q, dtsum, Dm, N,
                                                 SOFTPLUS=delta_softplus, BN=BN)
    g_end = new_output((n_chunks, Dm, N), **f32)
    dinitial = new_output((n_seq, Dm, N), **f32)
    _carry_kernel[_grid(n_seq, Dm)](A, dfinal, q, dtsum, first, g_end, dinitial, Dm, N, REVERSE=True, BN=BN)

    BD = _bwd_block_d(Dm, BN)
    n_blk = triton.cdiv(Dm, BD)
    alpha = new_output((R, Dm), **f32)
    du = new_output(u.shape, u.dtype, u.device)
    ddelta = new_output(delta.shape, delta.dtype, delta.device)
    dz = u.new_empty(0) if z is None else new_output(z.shape, z.dtype, z.device)
    dA_part = q  # q is spent after the carry pass: its memory takes the per-chunk dA partials
    dDb_part = new_output((2, n_chunks, Dm), **f32)  # dD, d delta_bias
    dBC_part = new_output((2, n_blk, R, N), **f32)  # dB, dC
    _bwd_chunk_kernel[(n_chunks, n_blk)](u, delta, A, B, C, D, z, delta_bias, dy, chunks, chunk_states, g_end, alpha,
                                         du, ddelta, dz, dA_part, dDb_part[0], dDb_part[1], dBC_part[0], dBC_part[1],
                                         R, Dm, N, SOFTPLUS=delta_softplus, BD=BD, BN=BN)
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
            u.new_empty((num_seqs(u, cu_seqlens), Dm, N), dtype=torch.float32))


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
    D, z, dt_bias = (contiguous(t) for t in (D, z, dt_bias))
    batch, Dm = x.shape
    N = A.shape[1]
    y = new_output(x.shape, x.dtype, x.device)
    _state_update_kernel[_grid(batch, Dm)](state, x, dt, A, B, C, D, z, dt_bias, state_indices, y, *state.stride(),
                                           Dm, N, SOFTPLUS=dt_softplus, BN=triton.next_power_of_2(N))
    return y


@_selective_state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_indices):
    return torch.empty_like(x)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------

def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                   cu_seqlens: Optional[torch.Tensor] = None):
    r"""Mamba-1 selective scan, differentiable in every tensor input and through the final state.

        dt_t = softplus(delta_t + delta_bias)  if delta_softplus, else delta_t + delta_bias
        h_t  = exp(dt_t A) * h_{t-1} + (dt_t u_t) B_t          h_{-1} = initial_state (zeros if None)
        y_t  = <h_t, C_t> + D u_t,   then y_t *= silu(z_t) when z is given

    per channel, with an fp32 state h of shape [Dm, N]; packed sequences never see each other.
    See docs/kernels.md.

    Args:
        u (torch.Tensor):
            Inputs of shape `[B, T, Dm]`, any float dtype.
        delta (torch.Tensor):
            Step sizes before bias and softplus, of shape `[B, T, Dm]`, any float dtype.
        A (torch.Tensor):
            State matrix (diagonal per channel, negative for a decaying state) of shape
            `[Dm, N]`, fp32 or float64.
        B (torch.Tensor):
            Input projections of shape `[B, T, N]`, shared by all channels, in u's dtype.
        C (torch.Tensor):
            Output projections of shape `[B, T, N]`, in u's dtype.
        D (Optional[torch.Tensor]):
            Skip weights of shape `[Dm]`, in u's dtype or fp32. Default: `None` (no skip).
        z (Optional[torch.Tensor]):
            Gate of shape `[B, T, Dm]`, any float dtype. Default: `None` (no gate).
        delta_bias (Optional[torch.Tensor]):
            Bias added to delta, of shape `[Dm]`, in u's dtype or fp32. Default: `None`.
        delta_softplus (bool):
            Whether to apply softplus to `delta + delta_bias`. Default: `False`.
        initial_state (Optional[torch.Tensor]):
            State before t = 0, of shape `[S, Dm, N]`, fp32 or float64; S = B, or the number of
            sequences with `cu_seqlens`. Default: `None` (zeros).
        output_final_state (bool):
            Whether to also return the final state. Default: `False`.
        cu_seqlens (Optional[torch.Tensor]):
            int32 offsets `[S+1]` of S sequences packed along T (then B = 1), checked as
            `causal_conv1d` checks them. Default: `None`.

    Returns:
        y (torch.Tensor):
            Outputs of shape `[B, T, Dm]` in u's dtype.
        final_state (torch.Tensor):
            Only with `output_final_state=True`, as `(y, final_state)`: the state after each
            sequence's last token, of shape `[S, Dm, N]`, fp32 (float64 for float64 inputs).

    Example::
        >>> import torch
        >>> from hybrid_lm.kernels import selective_scan
        >>> Bt, T, Dm, N = 2, 16, 8, 4
        >>> u, delta, z = torch.randn(Bt, T, Dm), torch.randn(Bt, T, Dm), torch.randn(Bt, T, Dm)
        >>> A = (-torch.rand(Dm, N)).requires_grad_()
        >>> B, C = torch.randn(Bt, T, N), torch.randn(Bt, T, N)
        >>> D, delta_bias = torch.ones(Dm), torch.zeros(Dm)
        >>> y, final_state = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
        ...                                 output_final_state=True)
        >>> y.shape, final_state.shape, final_state.dtype
        (torch.Size([2, 16, 8]), torch.Size([2, 8, 4]), torch.float32)
        >>> (y.sum() + final_state.sum()).backward()
        >>> A.grad.shape
        torch.Size([8, 4])
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
    check_flag("delta_softplus", delta_softplus)
    check_flag("output_final_state", output_final_state)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, u.shape[0], u.shape[1], u.device)
    dims["S"] = num_seqs(u, cu_seqlens)
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
    r"""One decode step of selective_scan, updating state in place; returns y [B, Dm].

    For row b with slot s = state_indices[b]:

        dt'      = softplus(dt[b] + dt_bias)  if dt_softplus, else dt[b] + dt_bias
        h        = exp(dt' A) * state[s] + (dt' x[b]) B[b]
        y[b]     = <h, C[b]> + D x[b],   then y[b] *= silu(z[b]) when z is given
        state[s] = h

    An inference op: its kernel has no backward. See docs/kernels.md.

    Args:
        state (torch.Tensor):
            States of S slots, of shape `[S, Dm, N]`, any float dtype and strides (math in
            fp32); updated in place.
        x (torch.Tensor):
            This step's inputs, of shape `[B, Dm]`, any float dtype.
        dt (torch.Tensor):
            Step sizes before bias and softplus, of shape `[B, Dm]`, any float dtype.
        A (torch.Tensor):
            State matrix of shape `[Dm, N]`, fp32 or float64.
        B (torch.Tensor):
            Input projections of shape `[B, N]`, any float dtype.
        C (torch.Tensor):
            Output projections of shape `[B, N]`, any float dtype.
        D (Optional[torch.Tensor]):
            Skip weights of shape `[Dm]`, any float dtype. Default: `None` (no skip).
        z (Optional[torch.Tensor]):
            Gate of shape `[B, Dm]`, any float dtype. Default: `None` (no gate).
        dt_bias (Optional[torch.Tensor]):
            Bias added to dt, of shape `[Dm]`, any float dtype. Default: `None`.
        dt_softplus (bool):
            Whether to apply softplus to `dt + dt_bias`. Default: `False`.
        state_indices (Optional[torch.Tensor]):
            Each row's slot, as in `causal_conv1d_update` (-1 marks a padding row). Default:
            `None`, row b uses slot b.

    Returns:
        y (torch.Tensor):
            This step's outputs `[B, Dm]` in x's dtype (a padding row's are zeros).

    Example::
        >>> import torch
        >>> from hybrid_lm.kernels import selective_state_update
        >>> S, Bt, Dm, N = 4, 3, 8, 4
        >>> state = torch.zeros(S, Dm, N)
        >>> x, dt, z = torch.randn(Bt, Dm), torch.randn(Bt, Dm), torch.randn(Bt, Dm)
        >>> A, B, C = -torch.rand(Dm, N), torch.randn(Bt, N), torch.randn(Bt, N)
        >>> state_indices = torch.tensor([3, -1, 1])  # the second row is padding
        >>> y = selective_state_update(state, x, dt, A, B, C, torch.ones(Dm), z, torch.zeros(Dm),
        ...                            dt_softplus=True, state_indices=state_indices)
        >>> y.shape, bool(state[[0, 2]].eq(0).all())
        (torch.Size([3, 8]), True)
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
    check_flag("dt_softplus", dt_softplus)
    check("state_indices", state_indices, ("batch",), dims, INDEX_DTYPES, state.device, optional=True)
    check_slots("state", state, x.shape[0], state_indices)
    if not use_triton(x):
        return reference.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_indices)
    with device_guard(x):
        return _selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_indices)
