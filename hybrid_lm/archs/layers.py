"""Layers shared by every architecture: norms, SwiGLU MLP, attention (full, sliding, cross,
differential), the Mamba-1 mixer and the GMU, on hybrid_lm.kernels.

Tensor names follow the released Phi-4-mini-flash checkpoint (docs/phi4flash.md) so its
weights load as they are: a layer's mixer is `attn` (whatever it is), attention projections are
a fused `Wqkv` and `out_proj`, the MLP is `fc1` (gate | up) and `fc2`.

Every mixer takes (x, step): `step` (a `Step`, below) says where the new tokens sit (their
slots), which earlier slots hold real tokens (left padding), their position ids, and holds the
cache. Slots count tokens fed to the model, padding included; positions count real tokens.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_lm import kernels as K

try:  # optional fast path on GPUs
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

from .cache import HybridCache, MambaState
from .config import HybridConfig

Tensor = torch.Tensor


class Step:
    """What every layer needs to know about one forward call.

    A plain object, not a dataclass: wrappers such as FSDP2 copy dataclass arguments on their way
    into a layer, and layers write into the step (shared_kv) for the layers after them.

    slots: [T] slot index of each new token; valid: [B, S] True where slot s holds a real token,
    for every slot so far (S = slots[-1] + 1), or None when nothing is padded; positions: [B, T]
    position ids of the new tokens (for RoPE and LRT's subsets); cache: the cache being filled,
    or None; memory: the GMU memory, set by SambaY's memory layer; shared_kv: (k, v, key slots)
    of SambaY's full-attention layer, which its cross-attention layers read (never copy);
    last_only: SambaY prefill, where the cross-decoder runs on the last token only; cu_seqlens
    (int32 [N+1]) and docs ([1, T] document id per token): a packed batch of N documents (batch
    size 1, no cache), attention stays within a document and Mamba restarts its state at each.
    hidden_states / attentions: lists that the decoder layers and attention layers append to when
    the caller asked for them (output_hidden_states / output_attentions), else None.

    Serving (`Step.serving`, hybrid_lm.serve) sets positions only: vLLM's metadata holds slots,
    validity and state. LRT's passes there also set rows ([n] the pass's tokens among the batch's
    N) and kv (per layer, the batch's latest (k, v), None before the first pass).
    """

    def __init__(self, slots: Optional[Tensor], valid: Optional[Tensor], positions: Tensor,
                 cache: Optional[HybridCache] = None, cu_seqlens: Optional[Tensor] = None,
                 docs: Optional[Tensor] = None) -> None:
        self.slots, self.valid, self.positions, self.cache = slots, valid, positions, cache
        self.cu_seqlens, self.docs = cu_seqlens, docs
        self.memory: Optional[Tensor] = None
        self.shared_kv: Optional[tuple[Tensor, Tensor, Tensor]] = None
        self.last_only = False
        self.hidden_states: Optional[list[Tensor]] = None
        self.attentions: Optional[list[Tensor]] = None
        self.rows: Optional[Tensor] = None
        self.kv: Optional[list[Optional[tuple[Tensor, Tensor]]]] = None

    @classmethod
    def serving(cls, positions: Tensor) -> "Step":
        """The step of one vLLM forward over its flat batch: positions [N] (as a batch of one row)."""
        return cls(None, None, positions[None])

    @property
    def recording(self) -> bool:
        """True when hidden states or attention maps are asked for: every token then runs every layer."""
        return self.hidden_states is not None or self.attentions is not None

    def new_valid(self) -> Optional[Tensor]:
        """[B, T] validity of the new tokens, or None without padding."""
        return None if self.valid is None else self.valid[:, self.slots]


def norm(config: HybridConfig, dim: int) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return nn.RMSNorm(dim, eps=config.norm_eps)


class MLP(nn.Module):
    """SwiGLU: fc2(silu(gate) * up) with fc1 = [gate | up]."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * up)


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary embedding of x [B, T, H, Dh] at positions [B, T] (rotate-half convention)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # [half]
    angles = positions.float()[..., None] * freqs  # [B, T, half]
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention_mask(q_slots: Tensor, k_slots: Tensor, valid: Optional[Tensor], window: Optional[int],
                   docs: Optional[Tensor] = None) -> Tensor:
    """[B or 1, 1, Tq, Tk] bool: key j is visible to query i (causal, in the window, a real token).

    k_slots may hold -1 for an empty entry of a static cache's ring buffer. A query always sees
    itself, so a padded query row is never empty (its output is ignored)."""
    diff = q_slots[:, None] - k_slots[None, :]  # [Tq, Tk]
    mask = (diff >= 0) & (k_slots >= 0)[None, :]
    if window is not None:
        mask = mask & (diff < window)
    if valid is not None:
        mask = (mask[None] & valid[:, None, k_slots.clamp(min=0)]) | (diff == 0)[None]
    else:
        mask = mask[None]
    if docs is not None:  # a packed batch: keys of the query's own document only
        mask = mask & (docs[:, q_slots, None] == docs[:, None, k_slots])
    return mask[:, None]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: Optional[float] = None) -> Tensor:
    """Softmax attention, token-major: q [B, Tq, H, Dh], k [B, Tk, Hkv, Dh], v [B, Tk, Hkv, Dv]
    (GQA by head groups). mask [B|1, 1, Tq, Tk] bool, or None for plain causal with Tq == Tk."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=mask is None, scale=scale,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def attention_map(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: Optional[float] = None) -> Tensor:
    """The softmax map [B, H, Tq, Tk] of `attend` (same layouts and mask), softmax in fp32, for
    output_attentions. Query head h reads KV head h // (H / Hkv)."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is None:
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril(k.shape[1] - q.shape[1])
    return scores.masked_fill(~mask, float("-inf")).softmax(-1).to(q.dtype)


def apply_map(probs: Tensor, v: Tensor) -> Tensor:
    """probs [B, H, Tq, Tk] over v [B, Tk, Hkv, Dv] -> [B, Tq, H, Dv]: the map returned is the
    one the output is computed from (its gradient is the output's)."""
    v = v.repeat_interleave(probs.shape[1] // v.shape[2], dim=2)
    return torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)


def use_flash(q: Tensor, v: Tensor, valid: Optional[Tensor], docs: Optional[Tensor] = None) -> bool:
    """flash-attn serves half-precision CUDA attention without padding (its causal mask is
    aligned bottom-right: our queries are always the last slots of their keys)."""
    return (flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and valid is None and docs is None and q.shape[-1] == v.shape[-1])


class DifferentialCore(nn.Module):
    """Differential attention's combination (named `inner_cross_attn` as in the release).

    Heads split into even (1) and odd (2) halves; attn_i = softmax(q_i k_i) [v1 | v2];
    out = RMSNorm(attn_1 - lambda attn_2) * (1 - lambda_init), re-interleaved to H heads.
    Its attention map (output_attentions) is per query head: head 2i holds softmax(q_1 k_1) of
    differential pair i (weighted +1), head 2i+1 its softmax(q_2 k_2) (weighted -lambda)."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        dh = config.head_dim
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_idx)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.zeros(dh, dtype=torch.float32)) for _ in range(4))
        self.subln = nn.RMSNorm(2 * dh, eps=1e-5)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                maps: Optional[list[Tensor]] = None) -> Tensor:
        """maps: a list to append the [B, H, Tq, Tk] attention map to (output_attentions)."""
        v12 = torch.cat([v[:, :, 0::2], v[:, :, 1::2]], dim=-1)  # [B, Tk, Hkv/2, 2 dh]
        scale = q.shape[-1] ** -0.5
        if maps is None:
            a1 = attend(q[:, :, 0::2], k[:, :, 0::2], v12, mask, scale)  # [B, T, H/2, 2 dh]
            a2 = attend(q[:, :, 1::2], k[:, :, 1::2], v12, mask, scale)
        else:
            m = torch.stack([attention_map(q[:, :, 0::2], k[:, :, 0::2], mask, scale),
                             attention_map(q[:, :, 1::2], k[:, :, 1::2], mask, scale)], dim=2).flatten(1, 2)
            maps.append(m)  # [B, H, Tq, Tk] in query head order
            a1, a2 = apply_map(m[:, 0::2], v12), apply_map(m[:, 1::2], v12)
        return self.combine(a1, a2)

    def combine(self, a1: Tensor, a2: Tensor) -> Tensor:
        """[..., H/2, 2 dh] attention outputs of the even and odd heads -> [..., H, dh]."""
        lam = (torch.exp((self.lambda_q1 * self.lambda_k1).sum()) - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
               + self.lambda_init)
        out = self.subln((a1.float() - lam * a2.float()).to(self.subln.weight.dtype)) * (1 - self.lambda_init)
        return out.to(a1.dtype).unflatten(-1, (2, -1)).flatten(-3, -2)


class Attention(nn.Module):
    """Self-attention (full or sliding window) or, with cross=True, queries only against the
    K,V of another layer (SambaY's shared cache). GQA, optional RoPE and QK-norm, optional
    differential attention; a fused Wqkv as in the release."""

    def __init__(self, config: HybridConfig, layer_idx: int, window: Optional[int] = None, cross: bool = False,
                 shares_kv: bool = False):
        super().__init__()
        self.layer_idx, self.window, self.cross, self.shares_kv = layer_idx, window, cross, shares_kv
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = self.q_size if cross else self.q_size + 2 * self.kv_size
        self.Wqkv = nn.Linear(config.hidden_size, out, bias=config.attention_bias)
        self.out_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.attention_bias)
        self.qk_norm, self.rope_theta, self.eps = config.qk_norm, config.rope_theta, config.norm_eps
        self.differential = config.differential_attention
        if self.differential:
            self.inner_cross_attn = DifferentialCore(config, layer_idx)

    def _q(self, x: Tensor, positions: Tensor) -> Tensor:
        q = F.linear(x, self.Wqkv.weight[:self.q_size], None if self.Wqkv.bias is None else self.Wqkv.bias[:self.q_size])
        return self._pos(q.unflatten(-1, (self.heads, self.head_dim)), positions)

    def _kv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        w, b = self.Wqkv.weight[self.q_size:], None if self.Wqkv.bias is None else self.Wqkv.bias[self.q_size:]
        k, v = F.linear(x, w, b).unflatten(-1, (2 * self.kv_heads, self.head_dim)).chunk(2, dim=2)
        return self._pos(k, positions), v

    def _pos(self, t: Tensor, positions: Tensor) -> Tensor:
        if self.qk_norm:
            t = F.rms_norm(t, (self.head_dim,), eps=self.eps)
        if self.rope_theta is not None:
            t = rope(t, positions, self.rope_theta)
        return t

    def core(self, q: Tensor, k: Tensor, v: Tensor, q_slots: Tensor, k_slots: Tensor, valid: Optional[Tensor],
             window: Optional[int], docs: Optional[Tensor] = None, maps: Optional[list[Tensor]] = None) -> Tensor:
        """Attention of the queries at q_slots over the keys at k_slots (causal, window, padding);
        differential or plain; returns [B, Tq, H * Dh]. maps: a list to append the attention map
        [B, H, Tq, Tk] to (output_attentions; the keys in the order the cache holds them)."""
        if self.differential:
            mask = attention_mask(q_slots, k_slots, valid, window, docs)
            return self.inner_cross_attn(q, k, v, mask, maps).flatten(2)
        if maps is not None:
            maps.append(attention_map(q, k, attention_mask(q_slots, k_slots, valid, window, docs)))
            return apply_map(maps[-1], v).flatten(2)
        if use_flash(q, v, valid, docs):
            return flash_attn_func(q, k, v, causal=True, window_size=(-1, 0) if window is None else (window - 1, 0)
                                   ).flatten(2)
        plain_causal = valid is None and docs is None and window is None and q.shape[1] == k.shape[1]
        mask = None if plain_causal else attention_mask(q_slots, k_slots, valid, window, docs)
        return attend(q, k, v, mask).flatten(2)

    def forward(self, x: Tensor, step: Step) -> Tensor:
        if self.cross:
            return self._cross(x, step)
        k, v = self._kv(x, step.positions)
        k_slots = step.slots
        if step.cache is not None:
            k, v, k_slots = step.cache.layers[self.layer_idx].update(k, v, step.slots)
        if self.shares_kv:
            step.shared_kv = (k, v, k_slots)
        q_slots, xq, positions = step.slots, x, step.positions
        if step.last_only:  # SambaY's shared layer in prefill: K,V for all tokens, output for the last
            q_slots, xq, positions = step.slots[-1:], x[:, -1:], step.positions[:, -1:]
        q = self._q(xq, positions)
        return self.out_proj(self.core(q, k, v, q_slots, k_slots, step.valid, self.window, step.docs,
                                       step.attentions))

    def _cross(self, x: Tensor, step: Step) -> Tensor:
        k, v, k_slots = step.shared_kv
        q_slots = step.slots[-x.shape[1]:]  # the last token only in prefill, else every new token
        q = self._q(x, step.positions[:, -x.shape[1]:])
        return self.out_proj(self.core(q, k, v, q_slots, k_slots, step.valid, None, step.docs, step.attentions))


class Mamba(nn.Module):
    """Mamba-1 mixer on our kernels. With return_memory it also returns the scan output before
    the z gate (D*u included): SambaY's GMU memory."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        d, di = config.hidden_size, config.mamba_d_inner
        self.layer_idx, self.d_inner = layer_idx, di
        self.d_state, self.dt_rank = config.mamba_d_state, config.mamba_dt_rank
        self.in_proj = nn.Linear(d, 2 * di, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(di, di, config.mamba_d_conv, groups=di, bias=config.mamba_conv_bias)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        self.A_log = nn.Parameter(torch.zeros(di, self.d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=config.mamba_proj_bias)

    def forward(self, x: Tensor, step: Step, return_memory: bool = False):
        valid = step.new_valid()
        x, z = self.in_proj(x).chunk(2, dim=-1)
        if valid is not None:  # padded tokens feed zeros, so no state sees them
            x = x * valid[..., None]
        weight = self.conv1d.weight.squeeze(1)  # [Di, W]
        state: Optional[MambaState] = None if step.cache is None else step.cache.layers[self.layer_idx]
        if state is not None and x.shape[1] == 1:  # decode: in-place state updates, no host sync
            u = K.causal_conv1d_update(x[:, 0], state.conv, weight, self.conv1d.bias, "silu")[:, None]
        elif state is not None:
            u, conv_final = K.causal_conv1d(x, weight, self.conv1d.bias, "silu", state.conv, True)
            state.conv.copy_(conv_final)
        else:
            u = K.causal_conv1d(x, weight, self.conv1d.bias, "silu", cu_seqlens=step.cu_seqlens)
        if valid is not None:
            u = u * valid[..., None]
        delta, B, C = self.ssm_inputs(u)
        A, D, bias = self.ssm_constants()
        gate = None if return_memory else z  # the memory layer gates outside the scan
        if state is not None and x.shape[1] == 1:
            y = K.selective_state_update(state.ssm, u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D,
                                         None if gate is None else gate[:, 0], bias, True)[:, None]
        elif state is not None:
            y, ssm_final = K.selective_scan(u, delta, A, B, C, D, gate, bias, True, state.ssm, True)
            state.ssm.copy_(ssm_final)
        else:
            y = K.selective_scan(u, delta, A, B, C, D, gate, bias, True, cu_seqlens=step.cu_seqlens)
        return self.output(y, z, return_memory)

    def ssm_inputs(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """delta (before dt_proj's bias, which the scan adds), B and C of the conv output u."""
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def ssm_constants(self) -> tuple[Tensor, Tensor, Tensor]:
        """A = -exp(A_log), D and the delta bias, in fp32."""
        return -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float()

    def output(self, y: Tensor, z: Tensor, return_memory: bool):
        """out_proj of the scan output y (already gated unless return_memory: then gate here and
        also return y, the GMU memory)."""
        if not return_memory:
            return self.out_proj(y)
        return self.out_proj(y * F.silu(z)), y


class GMU(nn.Module):
    """Gated Memory Unit: out_proj(memory * silu(in_proj(x))), memory from SambaY's memory layer."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.in_proj = nn.Linear(config.hidden_size, config.mamba_d_inner, bias=False)
        self.out_proj = nn.Linear(config.mamba_d_inner, config.hidden_size, bias=False)

    def forward(self, x: Tensor, step: Step) -> Tensor:
        memory = step.memory[:, -x.shape[1]:]  # the last token only in prefill
        return self.out_proj(K.gmu(self.in_proj(x), memory.to(x.dtype)))


class LayerFactory(Protocol):
    """The mixer classes a family's layout is built from (hybrid_lm.archs.samba): this module
    itself for transformers, hybrid_lm.serve.layers.PagedLayerFactory for vLLM (the same layers
    over vLLM's paged cache and state slots)."""

    def Mamba(self, config: HybridConfig, layer_idx: int) -> Mamba: ...

    def Attention(self, config: HybridConfig, layer_idx: int, window: Optional[int] = None, cross: bool = False,
                  shares_kv: bool = False) -> Attention: ...

    def GMU(self, config: HybridConfig) -> GMU: ...
