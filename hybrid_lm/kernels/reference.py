"""Plain-PyTorch definitions of every op: the ground truth for the kernel tests and the CPU path.

Math runs in fp32 (float64 when the inputs are float64, which is how the tests build their
ground truth); outputs come back in the input dtype, recurrent states stay fp32/fp64.
Arguments are assumed valid: the public functions in hybrid_lm.kernels check them first.
Semantics are documented in docs/kernels.md and on the public functions.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _acc(x: Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _slots(state_indices: Optional[Tensor], batch: int, device) -> Tensor:
    """Each row's state slot; -1 marks a padding row."""
    if state_indices is None:
        return torch.arange(batch, device=device)
    return state_indices.long()


def _per_sequence(run, cu_seqlens: Tensor, initial_state: Optional[Tensor], output_final_state: bool):
    """A packed batch [1, T, ...] as its sequences one by one: `run(time_slice, initial_state_row)`
    returns (y, final_state) of one sequence; the outputs join along T, the final states along N."""
    bounds = cu_seqlens.tolist()
    ys, finals = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        y, final = run(slice(start, end), None if initial_state is None else initial_state[i:i + 1])
        ys.append(y)
        finals.append(final)
    y = torch.cat(ys, dim=1)
    return (y, torch.cat(finals, dim=0)) if output_final_state else y


def gmu(gate: Tensor, memory: Tensor) -> Tensor:
    acc = _acc(memory)
    return (memory.to(acc) * F.silu(gate.to(acc))).to(memory.dtype)


# ---------------------------------------------------------------------------------------------
# causal conv1d
# ---------------------------------------------------------------------------------------------

def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None,
                  initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                  cu_seqlens: Optional[Tensor] = None):
    if cu_seqlens is not None:
        return _per_sequence(lambda t, init: causal_conv1d(x[:, t], weight, bias, activation, init, True),
                             cu_seqlens, initial_state, output_final_state)

    batch, T, dim = x.shape
    width = weight.shape[1]
    acc = _acc(x)
    if initial_state is None:
        initial_state = x.new_zeros(batch, dim, width - 1, dtype=acc)
    # [B, D, W-1+T]: the W-1 inputs before t=0, then the sequence
    xp = torch.cat([initial_state.to(acc), x.to(acc).transpose(1, 2)], dim=2)
    # W shifted multiply-adds rather than a depthwise F.conv1d: same sums, and a backward that is
    # cheap on a CPU (conv1d's weight gradient for groups=D is many times slower there)
    w = weight.to(acc)
    y = xp.new_zeros(batch, dim, T) if bias is None else bias.to(acc)[:, None].expand(batch, dim, T)
    for k in range(width):
        y = y + w[:, k, None] * xp[:, :, k:k + T]
    if activation == "silu":
        y = F.silu(y)
    y = y.transpose(1, 2).to(x.dtype)
    if not output_final_state:
        return y
    final = xp[:, :, xp.shape[2] - (width - 1):]
    return y, final  # fp32 (fp64 for fp64 inputs), like every recurrent state


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = None, state_indices: Optional[Tensor] = None) -> Tensor:
    batch = x.shape[0]
    acc = _acc(x)
    slots = _slots(state_indices, batch, x.device)
    valid = slots >= 0
    window = torch.cat([conv_state[slots.clamp(min=0)].to(acc), x.to(acc).unsqueeze(-1)], dim=-1)  # [B, D, W]
    y = (window * weight.to(acc)).sum(-1)
    if bias is not None:
        y = y + bias.to(acc)
    if activation == "silu":
        y = F.silu(y)
    y = torch.where(valid[:, None], y, torch.zeros_like(y))
    with torch.no_grad():
        conv_state[slots[valid]] = window[valid, :, 1:].to(conv_state.dtype)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# selective scan (Mamba-1)
# ---------------------------------------------------------------------------------------------

def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                   cu_seqlens: Optional[Tensor] = None):
    """Chunked scan: a Python loop of about 2*sqrt(T) steps, each vectorised over the batch,
    all chunks, channels and state. Within a chunk every chunk starts from zero in parallel; a
    second loop carries the true state across chunk boundaries and adds its decayed
    contribution back. Fast enough on a CPU to train tiny models, and fully differentiable."""
    if cu_seqlens is not None:
        return _per_sequence(lambda t, init: selective_scan(u[:, t], delta[:, t], A, B[:, t], C[:, t], D,
                                                            None if z is None else z[:, t], delta_bias,
                                                            delta_softplus, init, True),
                             cu_seqlens, initial_state, output_final_state)

    batch, T, dim = u.shape
    N = A.shape[1]
    acc = _acc(u)
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)
    if delta_softplus:
        dt = F.softplus(dt)
    h0 = u.new_zeros(batch, dim, N, dtype=acc) if initial_state is None else initial_state.to(acc)
    if T == 0:  # an empty sequence in a packed batch: no outputs, the state passes through
        return (u.new_zeros(batch, 0, dim), h0) if output_final_state else u.new_zeros(batch, 0, dim)

    L = max(1, math.isqrt(T))
    nc = -(-T // L)
    pad = nc * L - T  # padded steps have dt = 0: decay 1, no input, so the state passes through

    def chunks(t: Tensor) -> Tensor:  # [B, T, ...] -> [B, nc, L, ...]
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, nc, L, *t.shape[2:])

    dA = chunks(dt)[..., None] * A.to(acc)                                     # [B, nc, L, Dm, N]
    dBu = chunks(dt * u.to(acc))[..., None] * chunks(B.to(acc))[:, :, :, None, :]
    # Steps are taken with unbind, not indexing: the backward of one unbind is one stack, while
    # every indexed step's backward would zero-fill a gradient of the whole [B, nc, L, Dm, N].
    local, h = [], torch.zeros_like(dA[:, :, 0])
    for dA_i, dBu_i in zip(dA.unbind(2), dBu.unbind(2)):  # every chunk from a zero state at once
        h = torch.exp(dA_i) * h + dBu_i
        local.append(h)
    local = torch.stack(local, dim=2)                                          # [B, nc, L, Dm, N]
    decay = torch.exp(torch.cumsum(dA, dim=2))                                 # within-chunk decay
    starts, H = [], h0
    # carry the true state across chunks
    for decay_c, local_c in zip(decay[:, :, -1].unbind(1), local[:, :, -1].unbind(1)):
        starts.append(H)
        H = decay_c * H + local_c
    states = local + decay * torch.stack(starts, dim=1)[:, :, None]            # h_t for every t
    y = torch.einsum("bcldn,bcln->bcld", states, chunks(C.to(acc))).reshape(batch, nc * L, dim)[:, :T]
    if D is not None:
        y = y + D.to(acc) * u.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(u.dtype)
    return (y, H) if output_final_state else y


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                           dt_softplus: bool = False, state_indices: Optional[Tensor] = None) -> Tensor:
    batch = x.shape[0]
    acc = torch.promote_types(_acc(x), state.dtype)
    slots = _slots(state_indices, batch, x.device)
    valid = slots >= 0
    h = state[slots.clamp(min=0)].to(acc)                                       # [B, Dm, N]
    dt = dt.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    if dt_softplus:
        dt = F.softplus(dt)
    h = torch.exp(dt[:, :, None] * A.to(acc)) * h + (dt * x.to(acc))[:, :, None] * B.to(acc)[:, None, :]
    y = (h * C.to(acc)[:, None, :]).sum(-1)
    if D is not None:
        y = y + D.to(acc) * x.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = torch.where(valid[:, None], y, torch.zeros_like(y))
    with torch.no_grad():
        state[slots[valid]] = h[valid].to(state.dtype)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# interleaved attention
# ---------------------------------------------------------------------------------------------

def interleaved_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, window: Optional[int] = None,
                          scale: Optional[float] = None) -> Tensor:
    """Dense masked attention. A query that sees no key at all outputs zeros."""
    heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    scale = head_dim ** -0.5 if scale is None else scale
    acc = _acc(q)
    group = heads // kv_heads
    k = k.to(acc).repeat_interleave(group, dim=2)
    v = v.to(acc).repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k) * scale
    pos = q_pos.long()[:, None]
    j = torch.arange(k.shape[1], device=q.device)[None, :]
    mask = j <= pos
    if window is not None:
        mask = mask & (pos - j < window)
    seen = mask.any(-1, keepdim=True)                                        # [Tq, 1]
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~seen, 0.0)           # no NaN in empty rows
    p = torch.softmax(s, dim=-1) * seen
    return torch.einsum("bhqk,bkhd->bqhd", p, v).to(q.dtype)
