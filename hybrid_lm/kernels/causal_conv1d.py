"""Depthwise causal conv1d (Mamba's short conv): forward and backward for widths 2..8, plus the
in-place decode step.

    y[t, d] = act(bias[d] + sum_k weight[d, k] * in[t - W + 1 + k, d]),   k = 0 .. W-1

where `in` is the sequence preceded by its W-1 state columns (the initial state, zeros without
one). Everything is written in terms of that extended input: a position `s` of sequence `n`
reads `x[s]` when `s >= start_n` and `initial_state[n, :, W-1 + s - start_n]` before it. The
final state is the extended input at the last W-1 positions, and the gradient of an extended
input position is the same expression whether it lands in `dx` or in `dinitial_state`, so one
load helper serves each direction (`_load_input` forward, `_load_dinput` backward) and the
state kernels are those helpers evaluated at the W-1 positions before the start / end.

Layout and tiling. x, y are token-major [B, T, D]; a program owns a [BT, BD] tile (time block,
channel block, batch row) and reads its W shifted [BT, BD] input tiles with channel-contiguous
rows: the tiles overlap, so after the first one they come from L1/L2. BT, BD and num_warps are
autotuned on CUDA, except in the dweight pass, whose partials the host sizes from its tile.
Packed batches (cu_seqlens, B = 1) tile the packed time axis directly: each token looks up its
sequence (`seq_idx`, built on the device with searchsorted, no host sync), so taps never cross
a sequence boundary and a tile may span several sequences. All math is fp32; bf16/fp16 loads
are upcast in the kernel, states are fp32 [N, D, W-1], oldest column first.

Bytes moved per token (e = bytes per element of x, D channels), from DRAM:
  forward              read x, write y                                        2 D e
  backward, dw pass    read x and dy; with silu also write da = dy silu'(a)   2 D e  (+ 4 D)
  backward, dx pass    read dy (with silu: da, fp32), write dx                2 D e  (silu: D e + 4 D)
  plus a (W-1)/BT halo per tile; states and weights are O(N D W), not per token.
dweight and dbias are reductions over time: each program sums over a chunk of time blocks in
fp32 and writes one partial per chunk; one torch sum adds the partials (deterministic, no atomics).
The silu backward needs the pre-activation, which is recomputed from x rather than stored.

Decode (`causal_conv1d_update`): one program per (row, channel block) reads the slot's state
[BLOCK_D, W-1] and x, writes y and the shifted state back in place: per row (W-1) D state
elements read and written plus 2 D e, a pure memory-bound kernel with no host sync (slots come
from `state_indices` on the device; -1 rows are padding and touch nothing).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from ._common import (FLOAT_DTYPES, INDEX_DTYPES, check, check_activation, check_cu_seqlens, check_flag,
                      check_slots, configs, contiguous, device_guard, has, new_output, num_seqs, same_dtype, use_triton)

MIN_WIDTH, MAX_WIDTH = 2, 8
# The dweight/dbias pass writes one fp32 partial per (time chunk, channel block), and the host
# allocates them before the launch, so that pass keeps a fixed tile: BLOCK_T tokens by
# _block_d(D) channels. It aims at about BWD_PROGRAMS programs; each loops over as many time
# blocks as that leaves, so the partials stay small however long the sequence is.
BLOCK_T = 64
BWD_PROGRAMS = 512

# Autotune configs, keyed on D and W (not T: a new sequence length should not tune again).
# [BT, BD] tiles of the time-parallel kernels (forward, dx pass)
TILE_CONFIGS = configs([triton.Config({"BT": bt, "BD": bd}, num_warps=w)
                        for bt, bd, w in ((32, 128, 4), (64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8))],
                       triton.Config({"BT": 64, "BD": 64}, num_warps=4))
# [W-1, BD] tiles of the per-sequence state kernels, N x D/BD programs: small, latency-bound
STATE_CONFIGS = configs([triton.Config({"BD": bd}, num_warps=w) for bd, w in ((32, 1), (64, 2), (128, 4))],
                        triton.Config({"BD": 64}, num_warps=2))
# the dweight pass: fixed tile (above), tuned warps
DW_CONFIGS = configs([triton.Config({}, num_warps=w) for w in (2, 4, 8)], triton.Config({}, num_warps=4))
# decode: a [BD, W] window per program
UPDATE_CONFIGS = configs([triton.Config({"BD": bd}, num_warps=w) for bd, w in ((64, 2), (128, 2), (128, 4), (256, 4))],
                         triton.Config({"BD": 64}, num_warps=4))


# ---------------------------------------------------------------------------------------------
# helpers shared by the kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _tile_offsets(o_t, o_d, D):
    """Offsets of a [BT, BD] tile in one [T, D] row-major batch row (int64: packed T*D may pass 2^31)."""
    return o_t.to(tl.int64)[:, None] * D + o_d[None, :]


@triton.jit
def _state_offsets(i_n, o_j, o_d, D, W: tl.constexpr):
    """Offsets of state columns o_j [BT] of sequence(s) i_n (scalar or [BT]) in an [N, D, W-1] state."""
    return (i_n.to(tl.int64) * D * (W - 1) + o_j)[:, None] + (o_d * (W - 1))[None, :]


@triton.jit
def _seq_range(p_cu, i_n, T, IS_VARLEN: tl.constexpr):
    """[start, end) of sequence(s) i_n in the time axis of their batch row."""
    if IS_VARLEN:
        return tl.load(p_cu + i_n), tl.load(p_cu + i_n + 1)
    else:
        return 0, T


@triton.jit
def _state_tile(p_cu, T, D, W: tl.constexpr, IS_VARLEN: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr):
    """The tile of an [N, D, W-1] state that program (sequence i_n, channel block) covers: state
    columns o_j [BW] (oldest first), channels o_d [BD], their masks, the sequence's [start, end)
    and the offset of its batch row in a [B, T, D] tensor (0 when packed: one row)."""
    i_n, i_d = tl.program_id(0), tl.program_id(1)
    o_j = tl.arange(0, BW)  # [BW]
    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    start, end = _seq_range(p_cu, i_n, T, IS_VARLEN)
    if IS_VARLEN:
        o_row = 0
    else:
        o_row = i_n.to(tl.int64) * T * D
    return i_n, o_j, o_d, o_j < W - 1, o_d < D, start, end, o_row


@triton.jit
def _token_seq(p_seq_idx, p_cu, i_b, o_t, m_t, T, IS_VARLEN: tl.constexpr):
    """Sequence, start and end of each token o_t [BT]: per token when packed, else row i_b."""
    if IS_VARLEN:
        b_seq = tl.load(p_seq_idx + o_t, mask=m_t, other=0)  # [BT]
    else:
        b_seq = i_b
    b_start, b_end = _seq_range(p_cu, b_seq, T, IS_VARLEN)
    return b_seq, b_start, b_end


@triton.jit
def _load_input(p_x, p_h0, o_s, m_s, b_seq, b_start, o_d, m_d, D,
                W: tl.constexpr, HAS_H0: tl.constexpr):
    """The extended input at positions o_s [BT] (>= start - (W-1)), channels o_d: fp32 [BT, BD].
    x (p_x points at this batch row) from the start on, the initial state before it."""
    m_x = (m_s & (o_s >= b_start))[:, None] & m_d[None, :]
    b_in = tl.load(p_x + _tile_offsets(o_s, o_d, D), mask=m_x, other=0.).to(tl.float32)
    if HAS_H0:
        m_h = (m_s & (o_s < b_start))[:, None] & m_d[None, :]
        o_h = _state_offsets(b_seq, W - 1 + o_s - b_start, o_d, D, W)
        b_in += tl.load(p_h0 + o_h, mask=m_h, other=0.).to(tl.float32)
    return b_in


@triton.jit
def _load_dinput(p_da, p_w, p_dht, o_s, m_s, b_seq, b_start, b_end, o_d, m_d, D,
                 W: tl.constexpr, HAS_DHT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Gradient of the extended input at positions o_s [BT] (in x or in the initial state): fp32 [BT, BD].

    Position s feeds tap k of output s + W-1-k, so it collects sum_k w[k] * da[s + W-1-k] over
    outputs inside its sequence (p_da points at this batch row); if s is one of the last W-1
    inputs it is also column s - (end - (W-1)) of the final state and collects that gradient."""
    b_dx = tl.zeros([BT, BD], dtype=tl.float32)
    for k in tl.static_range(W):
        o_o = o_s + (W - 1 - k)  # [BT] output positions that read s through tap k
        m_o = (m_s & (o_o >= b_start) & (o_o < b_end))[:, None] & m_d[None, :]
        b_w = tl.load(p_w + o_d * W + k, mask=m_d, other=0.).to(tl.float32)  # [BD]
        b_dx += b_w[None, :] * tl.load(p_da + _tile_offsets(o_o, o_d, D), mask=m_o, other=0.).to(tl.float32)
    if HAS_DHT:
        o_j = o_s - b_end + (W - 1)  # [BT] final-state column, negative if s is not among the last W-1
        m_j = (m_s & (o_j >= 0))[:, None] & m_d[None, :]
        b_dx += tl.load(p_dht + _state_offsets(b_seq, o_j, o_d, D, W), mask=m_j, other=0.).to(tl.float32)
    return b_dx


@triton.jit
def _preactivation(p_x, p_w, p_b, p_h0, o_t, m_t, b_seq, b_start, o_d, m_d, D,
                   W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
                   BT: tl.constexpr, BD: tl.constexpr):
    """bias + sum_k w[k] * in[t - W + 1 + k] for outputs o_t [BT]: fp32 [BT, BD]."""
    b_a = tl.zeros([BT, BD], dtype=tl.float32)
    if HAS_BIAS:
        b_a += tl.load(p_b + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    for k in tl.static_range(W):
        b_w = tl.load(p_w + o_d * W + k, mask=m_d, other=0.).to(tl.float32)  # [BD]
        b_a += b_w[None, :] * _load_input(p_x, p_h0, o_t - (W - 1) + k, m_t, b_seq, b_start, o_d, m_d, D, W, HAS_H0)
    return b_a


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.heuristics({"HAS_BIAS": has("p_b"), "HAS_H0": has("p_h0"), "IS_VARLEN": has("p_cu")})
@triton.autotune(TILE_CONFIGS, key=["D", "W"])
@triton.jit
def _conv_fwd_kernel(p_x, p_w, p_b, p_h0, p_y, p_cu, p_seq_idx, T, D,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SILU: tl.constexpr,
                     IS_VARLEN: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    # grid: (time blocks, channel blocks, batch)
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)  # [BT]
    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    m_t, m_d = o_t < T, o_d < D
    b_seq, b_start, _ = _token_seq(p_seq_idx, p_cu, i_b, o_t, m_t, T, IS_VARLEN)
    p_x += i_b.to(tl.int64) * T * D
    p_y += i_b.to(tl.int64) * T * D
    b_y = _preactivation(p_x, p_w, p_b, p_h0, o_t, m_t, b_seq, b_start, o_d, m_d, D,
                         W, HAS_BIAS, HAS_H0, BT, BD)  # [BT, BD]
    if SILU:
        b_y = b_y * tl.sigmoid(b_y)
    tl.store(p_y + _tile_offsets(o_t, o_d, D), b_y.to(p_y.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.heuristics({"HAS_H0": has("p_h0"), "IS_VARLEN": has("p_cu")})
@triton.autotune(STATE_CONFIGS, key=["D", "W"])
@triton.jit
def _conv_final_state_kernel(p_x, p_h0, p_ht, p_cu, T, D,
                             W: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
                             BW: tl.constexpr, BD: tl.constexpr):
    # grid: (sequences, channel blocks); the final state is the extended input at end-(W-1) .. end-1
    i_n, o_j, o_d, m_j, m_d, start, end, o_row = _state_tile(p_cu, T, D, W, IS_VARLEN, BW, BD)
    b_ht = _load_input(p_x + o_row, p_h0, end - (W - 1) + o_j, m_j, i_n, start, o_d, m_d, D, W, HAS_H0)  # [BW, BD]
    tl.store(p_ht + _state_offsets(i_n, o_j, o_d, D, W), b_ht, mask=m_j[:, None] & m_d[None, :])


@triton.heuristics({"HAS_BIAS": has("p_b"), "HAS_H0": has("p_h0"), "IS_VARLEN": has("p_cu")})
@triton.autotune(DW_CONFIGS, key=["D", "W"])
@triton.jit
def _conv_bwd_dw_kernel(p_x, p_w, p_b, p_h0, p_dy, p_da, p_dw, p_db, p_cu, p_seq_idx, T, D, NC, NBLK,
                        W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SILU: tl.constexpr,
                        IS_VARLEN: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, WP: tl.constexpr):
    # grid: (time chunks of NBLK blocks, channel blocks, batch). Writes this chunk's partial
    # dweight [BD, W] and dbias [BD]; with silu also da = dy * silu'(a) for the dx pass.
    i_c, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    o_w = tl.arange(0, WP)  # [WP] taps, padded to a power of two
    m_d = o_d < D
    p_x += i_b.to(tl.int64) * T * D
    p_dy += i_b.to(tl.int64) * T * D
    p_da += i_b.to(tl.int64) * T * D
    b_dw = tl.zeros([BD, WP], dtype=tl.float32)
    b_db = tl.zeros([BD], dtype=tl.float32)
    # blocks past T (in the last chunk) are fully masked and add nothing
    for i_blk in range(NBLK):
        o_t = (i_c * NBLK + i_blk) * BT + tl.arange(0, BT)  # [BT]
        m_t = o_t < T
        m_td = m_t[:, None] & m_d[None, :]
        b_seq, b_start, _ = _token_seq(p_seq_idx, p_cu, i_b, o_t, m_t, T, IS_VARLEN)
        b_da = tl.load(p_dy + _tile_offsets(o_t, o_d, D), mask=m_td, other=0.).to(tl.float32)  # [BT, BD]
        if SILU:
            b_a = _preactivation(p_x, p_w, p_b, p_h0, o_t, m_t, b_seq, b_start, o_d, m_d, D,
                                 W, HAS_BIAS, HAS_H0, BT, BD)
            b_sig = tl.sigmoid(b_a)
            # d silu(a) / da = sig(a) * (1 + a * (1 - sig(a)))
            b_da = b_da * b_sig * (1. + b_a * (1. - b_sig))
            tl.store(p_da + _tile_offsets(o_t, o_d, D), b_da, mask=m_td)
        b_db += tl.sum(b_da, axis=0)
        for k in tl.static_range(W):
            b_in = _load_input(p_x, p_h0, o_t - (W - 1) + k, m_t, b_seq, b_start, o_d, m_d, D, W, HAS_H0)
            b_dw += tl.where(o_w[None, :] == k, tl.sum(b_da * b_in, axis=0)[:, None], 0.)
    i_p = i_b * NC + i_c  # this program's partial
    tl.store(p_dw + i_p.to(tl.int64) * D * W + o_d[:, None] * W + o_w[None, :], b_dw,
             mask=m_d[:, None] & (o_w < W)[None, :])
    tl.store(p_db + i_p.to(tl.int64) * D + o_d, b_db, mask=m_d)


@triton.heuristics({"HAS_DHT": has("p_dht"), "IS_VARLEN": has("p_cu")})
@triton.autotune(TILE_CONFIGS, key=["D", "W"])
@triton.jit
def _conv_bwd_dx_kernel(p_da, p_w, p_dht, p_dx, p_cu, p_seq_idx, T, D,
                        W: tl.constexpr, HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr,
                        BT: tl.constexpr, BD: tl.constexpr):
    # grid: (time blocks, channel blocks, batch)
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)  # [BT]
    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    m_t, m_d = o_t < T, o_d < D
    b_seq, b_start, b_end = _token_seq(p_seq_idx, p_cu, i_b, o_t, m_t, T, IS_VARLEN)
    p_da += i_b.to(tl.int64) * T * D
    p_dx += i_b.to(tl.int64) * T * D
    b_dx = _load_dinput(p_da, p_w, p_dht, o_t, m_t, b_seq, b_start, b_end, o_d, m_d, D, W, HAS_DHT, BT, BD)
    tl.store(p_dx + _tile_offsets(o_t, o_d, D), b_dx.to(p_dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.heuristics({"HAS_DHT": has("p_dht"), "IS_VARLEN": has("p_cu")})
@triton.autotune(STATE_CONFIGS, key=["D", "W"])
@triton.jit
def _conv_bwd_dh0_kernel(p_da, p_w, p_dht, p_dh0, p_cu, T, D,
                         W: tl.constexpr, HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr,
                         BW: tl.constexpr, BD: tl.constexpr):
    # grid: (sequences, channel blocks); the initial state is the extended input at start-(W-1) .. start-1
    i_n, o_j, o_d, m_j, m_d, start, end, o_row = _state_tile(p_cu, T, D, W, IS_VARLEN, BW, BD)
    b_dh0 = _load_dinput(p_da + o_row, p_w, p_dht, start - (W - 1) + o_j, m_j, i_n, start, end, o_d, m_d, D,
                         W, HAS_DHT, BW, BD)  # [BW, BD]
    tl.store(p_dh0 + _state_offsets(i_n, o_j, o_d, D, W), b_dh0, mask=m_j[:, None] & m_d[None, :])


@triton.jit
def _load_window(p_row, b_x, o_c, m_d, stride_w, W: tl.constexpr):
    """Columns o_c [WP] of a row's window [state column 0 .. W-2, x]: fp32 [BD, WP]; 0 past W-1."""
    m_s = m_d[:, None] & (o_c < W - 1)[None, :]
    b_s = tl.load(p_row + o_c[None, :] * stride_w, mask=m_s, other=0.).to(tl.float32)
    return tl.where((o_c == W - 1)[None, :], b_x[:, None], b_s)


@triton.heuristics({"HAS_BIAS": has("p_b"), "HAS_IDX": has("p_idx")})
# the state is updated in place: every config timed must start from the same state
@triton.autotune(UPDATE_CONFIGS, key=["D", "W"], restore_value=["p_state"])
@triton.jit
def _conv_update_kernel(p_x, p_state, p_w, p_b, p_idx, p_y, D, stride_s, stride_d, stride_w,
                        W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr, SILU: tl.constexpr,
                        BD: tl.constexpr, WP: tl.constexpr):
    # grid: (batch rows, channel blocks)
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    o_w = tl.arange(0, WP)  # [WP] window columns, padded to a power of two
    if HAS_IDX:
        i_s = tl.load(p_idx + i_b).to(tl.int64)  # this row's slot, -1 for padding
    else:
        i_s = i_b.to(tl.int64)
    m_d = o_d < D
    # a padding row has no live channels: it reads and writes no state. (Written as one block
    # comparison: block & scalar-bool masks come out int32 in Triton's interpreter.)
    m_v = o_d < tl.where(i_s >= 0, D, 0)  # [BD]
    p_row = p_state + i_s * stride_s + o_d[:, None] * stride_d  # [BD, 1]
    b_x = tl.load(p_x + i_b.to(tl.int64) * D + o_d, mask=m_v, other=0.).to(tl.float32)  # [BD]
    b_win = _load_window(p_row, b_x, o_w, m_v, stride_w, W)  # [BD, WP]
    # the new state is the window shifted left by one: column j takes window column j + 1
    b_new = _load_window(p_row, b_x, o_w + 1, m_v, stride_w, W)  # [BD, WP]
    b_w = tl.load(p_w + o_d[:, None] * W + o_w[None, :], mask=m_d[:, None] & (o_w < W)[None, :],
                  other=0.).to(tl.float32)  # [BD, WP]
    b_y = tl.sum(b_win * b_w, axis=1)  # [BD]
    if HAS_BIAS:
        b_y += tl.load(p_b + o_d, mask=m_d, other=0.).to(tl.float32)
    if SILU:
        b_y = b_y * tl.sigmoid(b_y)
    b_y = tl.where(i_s >= 0, b_y, 0.)
    tl.store(p_y + i_b.to(tl.int64) * D + o_d, b_y.to(p_y.dtype.element_ty), mask=m_d)
    # the state is rewritten in place: every thread of the program must have read its old
    # columns before any thread overwrites them (threads read their neighbours' columns)
    tl.debug_barrier()
    tl.store(p_row + o_w[None, :] * stride_w, b_new.to(p_state.dtype.element_ty),
             mask=m_v[:, None] & (o_w < W - 1)[None, :])


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------

def _block_d(D: int) -> int:
    return min(128, triton.next_power_of_2(D))


def _tile_grid(T: int, D: int, B: int):
    """(time blocks, channel blocks, batch) for the autotuned [BT, BD] tile."""
    return lambda META: (triton.cdiv(T, META["BT"]), triton.cdiv(D, META["BD"]), B)


def _state_grid(N: int, D: int):
    """(sequences, channel blocks) for the autotuned BD."""
    return lambda META: (N, triton.cdiv(D, META["BD"]))


def _seq_idx(cu_seqlens: Optional[torch.Tensor], T: int) -> Optional[torch.Tensor]:
    """Sequence of every packed token, on the device (no host sync); empty sequences are skipped."""
    if cu_seqlens is None:
        return None
    t = torch.arange(T, dtype=torch.int32, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens, t, right=True, out_int32=True) - 1).contiguous()


@torch.library.custom_op("hybrid_lm::causal_conv1d_fwd", mutates_args=())
def _causal_conv1d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                       silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, final_state); the final state is always computed (O(N D W), negligible)."""
    x, weight, bias, initial_state = x.contiguous(), weight.contiguous(), contiguous(bias), contiguous(initial_state)
    B, T, D = x.shape
    W = weight.shape[1]
    N = num_seqs(x, cu_seqlens)
    y = new_output(x.shape, x.dtype, x.device)
    ht = new_output((N, D, W - 1), torch.float32, x.device)
    _conv_fwd_kernel[_tile_grid(T, D, B)](
        x, weight, bias, initial_state, y, cu_seqlens, _seq_idx(cu_seqlens, T), T, D, W=W, SILU=silu)
    _conv_final_state_kernel[_state_grid(N, D)](
        x, initial_state, ht, cu_seqlens, T, D, W=W, BW=triton.next_power_of_2(W - 1))
    return y, ht


@_causal_conv1d_fwd.register_fake
def _(x, weight, bias, initial_state, cu_seqlens, silu):
    N = num_seqs(x, cu_seqlens)
    return torch.empty_like(x), x.new_empty((N, x.shape[2], weight.shape[1] - 1), dtype=torch.float32)


@torch.library.custom_op("hybrid_lm::causal_conv1d_bwd", mutates_args=())
def _causal_conv1d_bwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], silu: bool,
                       dy: torch.Tensor, dht: Optional[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight, dbias, dinitial_state); the caller drops those of absent inputs."""
    x, weight, dy = x.contiguous(), weight.contiguous(), dy.contiguous()
    bias, initial_state, dht = contiguous(bias), contiguous(initial_state), contiguous(dht)
    B, T, D = x.shape
    W = weight.shape[1]
    N = num_seqs(x, cu_seqlens)
    seq_idx = _seq_idx(cu_seqlens, T)

    # dweight, dbias (and da with silu): time chunks of NBLK blocks, one fp32 partial each
    BD = _block_d(D)
    ND = triton.cdiv(D, BD)
    NT = triton.cdiv(T, BLOCK_T)
    NBLK = max(1, triton.cdiv(NT, triton.cdiv(BWD_PROGRAMS, ND * B)))
    NC = max(1, triton.cdiv(NT, NBLK))
    da = new_output(x.shape, torch.float32, x.device) if silu else dy
    dw_part = new_output((B * NC, D, W), torch.float32, x.device)
    db_part = new_output((B * NC, D), torch.float32, x.device)
    _conv_bwd_dw_kernel[(NC, ND, B)](
        x, weight, bias, initial_state, dy, da, dw_part, db_part, cu_seqlens, seq_idx, T, D, NC, NBLK,
        W=W, SILU=silu, BT=BLOCK_T, BD=BD, WP=triton.next_power_of_2(W))

    dx = new_output(x.shape, x.dtype, x.device)
    _conv_bwd_dx_kernel[_tile_grid(T, D, B)](da, weight, dht, dx, cu_seqlens, seq_idx, T, D, W=W)
    dh0 = new_output((N, D, W - 1), torch.float32, x.device)
    _conv_bwd_dh0_kernel[_state_grid(N, D)](
        da, weight, dht, dh0, cu_seqlens, T, D, W=W, BW=triton.next_power_of_2(W - 1))
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype), dh0


@_causal_conv1d_bwd.register_fake
def _(x, weight, bias, initial_state, cu_seqlens, silu, dy, dht):
    N = num_seqs(x, cu_seqlens)
    return (torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0]),
            x.new_empty((N, x.shape[2], weight.shape[1] - 1), dtype=torch.float32))


def _setup(ctx, inputs, output):
    x, weight, bias, initial_state, cu_seqlens, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_state, cu_seqlens)
    ctx.silu = silu
    # an unused output's gradient arrives as None instead of zeros: without output_final_state
    # (the common case) the backward skips the final-state gradient altogether
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dht):
    x, weight, bias, initial_state, cu_seqlens = ctx.saved_tensors
    if dy is None:  # only the final state was used
        dy = torch.zeros_like(x)
    dx, dw, db, dh0 = _causal_conv1d_bwd(x, weight, bias, initial_state, cu_seqlens, ctx.silu, dy, dht)
    return (dx, dw, None if bias is None else db, None if initial_state is None else dh0, None, None)


torch.library.register_autograd("hybrid_lm::causal_conv1d_fwd", _backward, setup_context=_setup)


@torch.library.custom_op("hybrid_lm::causal_conv1d_update", mutates_args=("conv_state",))
def _causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor], state_indices: Optional[torch.Tensor],
                          silu: bool) -> torch.Tensor:
    # conv_state keeps its own strides (it is updated in place: a contiguous copy would be lost)
    x, weight, bias = x.contiguous(), weight.contiguous(), contiguous(bias)
    B, D = x.shape
    W = weight.shape[1]
    y = new_output(x.shape, x.dtype, x.device)
    _conv_update_kernel[lambda META: (B, triton.cdiv(D, META["BD"]))](
        x, conv_state, weight, bias, state_indices, y, D, *conv_state.stride(),
        W=W, SILU=silu, WP=triton.next_power_of_2(W))
    return y


@_causal_conv1d_update.register_fake
def _(x, conv_state, weight, bias, state_indices, silu):
    return torch.empty_like(x)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------

def _check_weight(weight: torch.Tensor, x: torch.Tensor, dims: dict) -> int:
    """weight [D, W] in x's dtype or fp32 (fp32 master weights with half activations); returns W."""
    check("weight", weight, ("D", "W"), dims, same_dtype(x, torch.float32), x.device)
    width = weight.shape[1]
    if not MIN_WIDTH <= width <= MAX_WIDTH:
        raise ValueError(f"weight: expected width W in {MIN_WIDTH}..{MAX_WIDTH}, got shape {list(weight.shape)}")
    dims["W-1"] = width - 1
    return width


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None, initial_state: Optional[torch.Tensor] = None,
                  output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None):
    r"""Depthwise causal conv1d over time, differentiable in x, weight, bias and initial_state.

        y[t] = act(bias + sum_k weight[:, k] * x[t - W + 1 + k]),   k = 0 .. W-1

    with x before t = 0 taken from the initial state (zeros if None). Packed sequences never see
    each other. Gradients flow through the final state too. See docs/kernels.md.

    Args:
        x (torch.Tensor):
            Inputs of shape `[B, T, D]`, any float dtype.
        weight (torch.Tensor):
            Filters of shape `[D, W]`, W in 2..8, in x's dtype or fp32.
        bias (Optional[torch.Tensor]):
            Bias of shape `[D]`, any float dtype. Default: `None`.
        activation (Optional[str]):
            `None` or `"silu"`. Default: `None`.
        initial_state (Optional[torch.Tensor]):
            The W-1 inputs before t = 0, oldest first, of shape `[N, D, W-1]`, any float dtype
            (fp32 recommended); N = B, or the number of sequences with `cu_seqlens`.
            Default: `None` (zeros).
        output_final_state (bool):
            Whether to also return the final state. Default: `False`.
        cu_seqlens (Optional[torch.Tensor]):
            int32 offsets of shape `[N+1]` of N sequences packed along T (then B = 1): starting
            at 0, non-decreasing, ending at T (checked on the host for CPU tensors, by a
            device-side assert for CUDA ones). Default: `None`.

    Returns:
        y (torch.Tensor):
            Outputs of shape `[B, T, D]` in x's dtype.
        final_state (torch.Tensor):
            Only with `output_final_state=True`, as `(y, final_state)`: the last W-1 inputs of
            each sequence, oldest first, of shape `[N, D, W-1]`, fp32 (float64 for float64
            inputs). A sequence shorter than W-1 ends it with its initial state's tail.

    Example::
        >>> import torch
        >>> from hybrid_lm.kernels import causal_conv1d
        >>> x = torch.randn(2, 16, 8, requires_grad=True)
        >>> weight, bias = torch.randn(8, 4), torch.randn(8)
        >>> y, final_state = causal_conv1d(x, weight, bias, "silu", output_final_state=True)
        >>> y.shape, final_state.shape, final_state.dtype
        (torch.Size([2, 16, 8]), torch.Size([2, 8, 3]), torch.float32)
        >>> y.sum().backward()
        >>> # two sequences of 5 and 11 tokens packed in one row, each from its own state
        >>> cu_seqlens = torch.tensor([0, 5, 16], dtype=torch.int32)
        >>> y = causal_conv1d(torch.randn(1, 16, 8), weight, bias, "silu",
        ...                   initial_state=torch.randn(2, 8, 3), cu_seqlens=cu_seqlens)
        >>> y.shape
        torch.Size([1, 16, 8])
    """
    dims: dict = {}
    check("x", x, ("B", "T", "D"), dims, FLOAT_DTYPES)
    _check_weight(weight, x, dims)
    check("bias", bias, ("D",), dims, FLOAT_DTYPES, x.device, optional=True)
    check_activation(activation)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1], x.device)
    dims["N"] = num_seqs(x, cu_seqlens)
    check("initial_state", initial_state, ("N", "D", "W-1"), dims, FLOAT_DTYPES, x.device, optional=True)
    check_flag("output_final_state", output_final_state)
    if not use_triton(x):
        return reference.causal_conv1d(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens)
    with device_guard(x):
        y, final_state = _causal_conv1d_fwd(x, weight, bias, initial_state, cu_seqlens, activation == "silu")
    return (y, final_state) if output_final_state else y


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                         state_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""One decode step of causal_conv1d, updating conv_state in place; returns y [B, D].

    For row b with slot s = state_indices[b]: window = [conv_state[s], x[b]] (W columns),
    y[b] = act(bias + sum_k weight[:, k] * window[:, k]), then conv_state[s] = window[:, 1:].
    An inference op: its kernel has no backward. See docs/kernels.md.

    Args:
        x (torch.Tensor):
            This step's inputs, of shape `[B, D]`, any float dtype.
        conv_state (torch.Tensor):
            The last W-1 inputs of each of S slots, oldest first, of shape `[S, D, W-1]`, any
            float dtype and strides; updated in place (the slot is shifted left and x appended).
        weight, bias, activation:
            As in `causal_conv1d`.
        state_indices (Optional[torch.Tensor]):
            The slot of each row, int32/int64 of shape `[B]`. A row with index -1 is padding:
            its output is zeros and no slot changes. Indices are not read on the host (no sync,
            CUDA-graph safe), so they must lie in [-1, S) and be distinct. Default: `None`
            (row b uses slot b, which needs S >= B).

    Returns:
        y (torch.Tensor):
            Outputs of shape `[B, D]` in x's dtype, zeros on padding rows.

    Example::
        >>> import torch
        >>> from hybrid_lm.kernels import causal_conv1d_update
        >>> conv_state = torch.zeros(4, 8, 3)  # 4 slots, D = 8, W = 4
        >>> weight, bias = torch.randn(8, 4), torch.randn(8)
        >>> state_indices = torch.tensor([2, -1, 0])  # the second row is padding
        >>> y = causal_conv1d_update(torch.randn(3, 8), conv_state, weight, bias, "silu", state_indices)
        >>> y.shape, bool(y[1].eq(0).all())
        (torch.Size([3, 8]), True)
    """
    dims: dict = {}
    check("x", x, ("B", "D"), dims, FLOAT_DTYPES)
    _check_weight(weight, x, dims)
    check("conv_state", conv_state, ("S", "D", "W-1"), dims, FLOAT_DTYPES, x.device)
    check("bias", bias, ("D",), dims, FLOAT_DTYPES, x.device, optional=True)
    check_activation(activation)
    check("state_indices", state_indices, ("B",), dims, INDEX_DTYPES, x.device, optional=True)
    check_slots("conv_state", conv_state, x.shape[0], state_indices)
    if not use_triton(x):
        return reference.causal_conv1d_update(x, conv_state, weight, bias, activation, state_indices)
    with device_guard(x):
        return _causal_conv1d_update(x, conv_state, weight, bias, state_indices, activation == "silu")
