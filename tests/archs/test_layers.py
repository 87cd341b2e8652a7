"""Layers against naive float64 implementations written here from the specs (docs/models.md,
docs/phi4flash.md): differential attention (self, sliding, cross), plain attention (RoPE,
QK-norm, GQA, window), the GMU, the SwiGLU MLP and the Mamba-1 mixer (incl. its GMU memory and
its cached prefill + decode path). The models run on the PyTorch reference kernels on the CPU."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hybrid_lm
from hybrid_lm.archs.cache import HybridCache
from hybrid_lm.archs.layers import GMU, MLP, Attention, Mamba, Step

ATOL = 1e-5


def d64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def linear64(x, lin):
    y = x @ d64(lin.weight).T
    return y if lin.bias is None else y + d64(lin.bias)


def rms64(x, weight=None, eps=1e-5):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * d64(weight)


def plain_step(B, T):
    return Step(slots=torch.arange(T), valid=None, positions=torch.arange(T)[None].expand(B, T))


def naive_softmax_attention(q, k, v, q_slots, k_slots, window, scale):
    """q [B,Tq,Hq,Dh], k/v [B,Tk,Hk,Dv] float64; query head j reads KV head j // (Hq // Hk)."""
    Hq, Hk = q.shape[2], k.shape[2]
    group = Hq // Hk
    out = torch.zeros(q.shape[0], q.shape[1], Hq, v.shape[-1], dtype=torch.float64)
    for j in range(Hq):
        kh = j // group
        s = torch.einsum("bqd,bkd->bqk", q[:, :, j], k[:, :, kh]) * scale
        diff = q_slots[:, None] - k_slots[None, :]
        allowed = diff >= 0
        if window is not None:
            allowed &= diff < window
        s = s.masked_fill(~allowed, float("-inf"))
        out[:, :, j] = torch.softmax(s, -1) @ v[:, :, kh]
    return out


def randomize_diff(core):
    with torch.no_grad():
        for p in (core.lambda_q1, core.lambda_k1, core.lambda_q2, core.lambda_k2):
            p.normal_(0, 0.3)
        core.subln.weight.uniform_(0.5, 1.5)


def naive_diff_attention(att, x, layer_idx, window, kv_source=None, q_slots=None, k_slots=None):
    """Differential attention as docs/phi4flash.md describes it, float64.

    att: the module (weights only are read); x [B,T,d]; kv_source: (k, v) [B,Tk,Hkv,Dh] for
    cross attention, else K,V come from x."""
    H, Hkv, Dh = att.heads, att.kv_heads, att.head_dim
    B, T, _ = x.shape
    x = d64(x)
    qkv = linear64(x, att.Wqkv)
    q = qkv[..., :H * Dh].reshape(B, T, H, Dh)
    if kv_source is None:
        k = qkv[..., H * Dh:H * Dh + Hkv * Dh].reshape(B, T, Hkv, Dh)
        v = qkv[..., H * Dh + Hkv * Dh:].reshape(B, T, Hkv, Dh)
    else:
        k, v = (d64(t) for t in kv_source)
    q_slots = torch.arange(T) if q_slots is None else q_slots
    k_slots = torch.arange(k.shape[1]) if k_slots is None else k_slots
    q1, q2 = q[:, :, 0::2], q[:, :, 1::2]  # even / odd heads
    k1, k2 = k[:, :, 0::2], k[:, :, 1::2]
    v1, v2 = v[:, :, 0::2], v[:, :, 1::2]
    scale = 1 / math.sqrt(Dh)

    def A(qq, kk, vv):
        return naive_softmax_attention(qq, kk, vv, q_slots, k_slots, window, scale)

    attn1 = torch.cat([A(q1, k1, v1), A(q1, k1, v2)], dim=-1)  # [B,T,H/2,2Dh]
    attn2 = torch.cat([A(q2, k2, v1), A(q2, k2, v2)], dim=-1)
    core = att.inner_cross_attn
    lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_idx)
    lam = (torch.exp((d64(core.lambda_q1) * d64(core.lambda_k1)).sum())
           - torch.exp((d64(core.lambda_q2) * d64(core.lambda_k2)).sum()) + lambda_init)
    attn = rms64(attn1 - lam * attn2, core.subln.weight, 1e-5) * (1 - lambda_init)  # RMSNorm over 2*Dh
    # re-interleave: half-head j's [2 Dh] becomes heads 2j and 2j+1
    attn = attn.reshape(B, T, H // 2, 2, Dh).reshape(B, T, H, Dh)
    return linear64(attn.reshape(B, T, H * Dh), att.out_proj)


def diff_config(heads, kv_heads, bias, window=16):
    return hybrid_lm.config("sambay-da", hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            attention_bias=bias, sliding_window=window)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 4), (4, 4), (8, 2)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layer_idx,window", [(0, None), (3, 16), (17, None)])
def test_differential_attention_matches_naive(heads, kv_heads, bias, layer_idx, window):
    cfg = diff_config(heads, kv_heads, bias)
    att = Attention(cfg, layer_idx, window=window)
    if bias:
        with torch.no_grad():
            att.Wqkv.bias.normal_(0, 0.3)
            att.out_proj.bias.normal_(0, 0.3)
    randomize_diff(att.inner_cross_attn)
    assert att.inner_cross_attn.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * layer_idx))
    B, T = 2, 37  # longer than the window of 16
    x = torch.randn(B, T, cfg.hidden_size)
    with torch.no_grad():
        got = att(x, plain_step(B, T))
    want = naive_diff_attention(att, x, layer_idx, window)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 4)])
def test_differential_cross_attention_matches_naive(heads, kv_heads):
    """Cross attention: Q only (Wqkv [d, d]), reads another layer's K,V, causal by slot, no window."""
    cfg = diff_config(heads, kv_heads, bias=True)
    layer_idx = 7
    att = Attention(cfg, layer_idx, cross=True)
    assert tuple(att.Wqkv.weight.shape) == (heads * cfg.head_dim, cfg.hidden_size)
    with torch.no_grad():
        att.Wqkv.bias.normal_(0, 0.3)
    randomize_diff(att.inner_cross_attn)
    B, T = 2, 29
    k = torch.randn(B, T, kv_heads, cfg.head_dim)
    v = torch.randn(B, T, kv_heads, cfg.head_dim)
    slots = torch.arange(T)
    # every new token as queries
    x = torch.randn(B, T, cfg.hidden_size)
    step = plain_step(B, T)
    step.shared_kv = (k, v, slots)
    with torch.no_grad():
        got = att(x, step)
    want = naive_diff_attention(att, x, layer_idx, None, kv_source=(k, v))
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=1e-5)
    # prefill: the last token only, against all keys
    with torch.no_grad():
        got_last = att(x[:, -1:], step)
    want_last = naive_diff_attention(att, x[:, -1:], layer_idx, None, kv_source=(k, v), q_slots=slots[-1:])
    torch.testing.assert_close(got_last.double(), want_last, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(got_last, got[:, -1:], atol=ATOL, rtol=1e-5)


def naive_rope(x, theta):
    """rotate-half RoPE, x [B,T,H,Dh] float64 at positions 0..T-1."""
    T, Dh = x.shape[1], x.shape[-1]
    half = Dh // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freqs
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("qk_norm,rope_theta", [(True, 10000.0), (False, None)])
def test_plain_attention_matches_naive(window, qk_norm, rope_theta):
    cfg = hybrid_lm.config("transformer", hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                           qk_norm=qk_norm, rope_theta=rope_theta)
    att = Attention(cfg, 1, window=window)
    B, T = 2, 35
    x = torch.randn(B, T, 64)
    with torch.no_grad():
        got = att(x, plain_step(B, T))
    H, Hkv, Dh = 8, 2, cfg.head_dim
    qkv = linear64(d64(x), att.Wqkv)
    q = qkv[..., :H * Dh].reshape(B, T, H, Dh)
    k = qkv[..., H * Dh:(H + Hkv) * Dh].reshape(B, T, Hkv, Dh)
    v = qkv[..., (H + Hkv) * Dh:].reshape(B, T, Hkv, Dh)
    if qk_norm:
        q, k = rms64(q, eps=cfg.norm_eps), rms64(k, eps=cfg.norm_eps)
    if rope_theta is not None:
        q, k = naive_rope(q, rope_theta), naive_rope(k, rope_theta)
    o = naive_softmax_attention(q, k, v, torch.arange(T), torch.arange(T), window, Dh ** -0.5)
    want = linear64(o.reshape(B, T, H * Dh), att.out_proj)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=1e-5)


def test_gmu_matches_naive():
    cfg = hybrid_lm.config("sambay")
    gmu = GMU(cfg)
    assert gmu.in_proj.bias is None and gmu.out_proj.bias is None
    assert tuple(gmu.in_proj.weight.shape) == (cfg.mamba_d_inner, cfg.hidden_size)
    B, T = 3, 11
    x = torch.randn(B, T, cfg.hidden_size)
    memory = torch.randn(B, T, cfg.mamba_d_inner)
    step = plain_step(B, T)
    step.memory = memory
    with torch.no_grad():
        got = gmu(x, step)
        got_last = gmu(x[:, -1:], step)  # prefill: the last token reads the memory at that token
    g = linear64(d64(x), gmu.in_proj)
    want = linear64(d64(memory) * g * torch.sigmoid(g), gmu.out_proj)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(got_last.double(), want[:, -1:], atol=ATOL, rtol=1e-5)


def test_mlp_is_swiglu_gate_first():
    cfg = hybrid_lm.config("transformer")
    mlp = MLP(cfg)
    x = torch.randn(2, 5, cfg.hidden_size)
    with torch.no_grad():
        got = mlp(x)
    h = linear64(d64(x), mlp.fc1)
    gate, up = h[..., :cfg.intermediate_size], h[..., cfg.intermediate_size:]
    want = linear64(gate * torch.sigmoid(gate) * up, mlp.fc2)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=1e-5)


# -- Mamba-1 -------------------------------------------------------------------------------------


def make_mamba(d_conv=4, proj_bias=False, d_state=16):
    cfg = hybrid_lm.config("samba", mamba_d_conv=d_conv, mamba_proj_bias=proj_bias, mamba_d_state=d_state)
    m = Mamba(cfg, 0)
    with torch.no_grad():
        for lin in (m.in_proj, m.x_proj, m.dt_proj, m.out_proj):
            lin.weight.normal_(0, 1 / math.sqrt(lin.in_features))
        if proj_bias:
            m.in_proj.bias.normal_(0, 0.3)
            m.out_proj.bias.normal_(0, 0.3)
        m.conv1d.weight.normal_(0, 0.5)
        m.conv1d.bias.normal_(0, 0.3)
        m.dt_proj.bias.uniform_(-4, 0)
        m.A_log.copy_(torch.log(torch.rand(m.d_inner, m.d_state) * 8 + 0.5))
        m.D.normal_(1, 0.5)
    return cfg, m


def naive_mamba(m, x):
    """Mamba-1, one token at a time, float64: in_proj -> causal conv + silu -> x_proj ->
    softplus(dt_proj) -> scan with D -> gate silu(z) -> out_proj. Returns (out, pre-gate y)."""
    x = d64(x)
    B, T, _ = x.shape
    xz = linear64(x, m.in_proj)
    xs, z = xz.chunk(2, dim=-1)
    Di = xs.shape[-1]
    w = d64(m.conv1d.weight)[:, 0]  # [Di, W]
    W = w.shape[1]
    cb = torch.zeros(Di, dtype=torch.float64) if m.conv1d.bias is None else d64(m.conv1d.bias)
    A = -torch.exp(d64(m.A_log))
    N = A.shape[1]
    Dskip = d64(m.D)
    h = torch.zeros(B, Di, N, dtype=torch.float64)
    ys = []
    for t in range(T):
        acc = cb.expand(B, Di).clone()
        for j in range(W):  # weight[:, j] multiplies x[t - W + 1 + j]
            s = t - W + 1 + j
            if s >= 0:
                acc = acc + w[:, j] * xs[:, s]
        u = F.silu(acc)  # [B, Di]
        dbc = u @ d64(m.x_proj.weight).T
        dt, Bt, Ct = dbc[:, :m.dt_rank], dbc[:, m.dt_rank:m.dt_rank + N], dbc[:, m.dt_rank + N:]
        delta = F.softplus(dt @ d64(m.dt_proj.weight).T + d64(m.dt_proj.bias))  # [B, Di]
        h = torch.exp(delta[:, :, None] * A) * h + (delta * u)[:, :, None] * Bt[:, None, :]
        ys.append((h * Ct[:, None, :]).sum(-1) + Dskip * u)
    y = torch.stack(ys, 1)
    out = linear64(y * F.silu(z), m.out_proj)
    return out, y


@pytest.mark.parametrize("d_conv,proj_bias", [(4, False), (3, True), (2, False)])
def test_mamba_matches_naive_token_loop(d_conv, proj_bias):
    cfg, m = make_mamba(d_conv, proj_bias)
    B, T = 2, 21
    x = torch.randn(B, T, cfg.hidden_size)
    want_out, want_y = naive_mamba(m, x)
    with torch.no_grad():
        out = m(x, plain_step(B, T))
        out2, memory = m(x, plain_step(B, T), return_memory=True)
    torch.testing.assert_close(out.double(), want_out, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out2.double(), want_out, atol=ATOL, rtol=1e-5)
    # the memory is the scan output before the z gate, D*u included
    torch.testing.assert_close(memory.double(), want_y, atol=ATOL, rtol=1e-5)
    assert memory.shape == (B, T, cfg.mamba_d_inner)


@pytest.mark.parametrize("return_memory", [False, True])
def test_mamba_cached_prefill_and_decode_match_naive(return_memory):
    """Prefill a chunk with a cache, then decode token by token: same as the naive loop over the
    whole sequence; the states are fp32 and shaped [B, Di, W-1] / [B, Di, N]."""
    cfg, m = make_mamba(4, False)
    B, T, T0 = 2, 15, 6
    x = torch.randn(B, T, cfg.hidden_size)
    want_out, want_y = naive_mamba(m, x)
    cache = HybridCache(["mamba"], B, cfg.mamba_d_inner, cfg.mamba_d_conv, cfg.mamba_d_state)
    outs, ys = [], []
    with torch.no_grad():
        chunks = [(0, T0)] + [(t, t + 1) for t in range(T0, T)]
        for a, b in chunks:
            step = Step(slots=torch.arange(a, b), valid=None, positions=torch.arange(a, b)[None].expand(B, b - a),
                        cache=cache)
            r = m(x[:, a:b], step, return_memory=return_memory)
            if return_memory:
                r, y = r
                ys.append(y)
            outs.append(r)
            cache.seen = b
    torch.testing.assert_close(torch.cat(outs, 1).double(), want_out, atol=ATOL, rtol=1e-5)
    if return_memory:
        torch.testing.assert_close(torch.cat(ys, 1).double(), want_y, atol=ATOL, rtol=1e-5)
    state = cache.layers[0]
    assert state.conv.dtype == torch.float32 and state.ssm.dtype == torch.float32
    assert state.conv.shape == (B, cfg.mamba_d_inner, cfg.mamba_d_conv - 1)
    assert state.ssm.shape == (B, cfg.mamba_d_inner, cfg.mamba_d_state)
