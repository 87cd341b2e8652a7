"""interleaved_attention: the kernels against the float64 reference, the reference against a
naive loop and against SDPA, block skipping, the custom-op registrations and input validation."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from hybrid_lm.kernels import interleaved_attention, reference
from kernel_testing import CASES, TOL, assert_close, leaf

# Each config: B, T (keys), H, Hkv, Dh, q_pos (a function of T), window, scale.
# Sizes are small (the CPU runs the kernels interpreted) but cross the kernels' block sizes
# (16 for fp32, up to 64 for bf16), so several query and key blocks and ragged tails occur.
CONFIGS = {
    "causal-gqa": (2, 37, 4, 2, 24, lambda T: torch.arange(T), None, None),
    "causal-window1": (1, 21, 2, 2, 16, lambda T: torch.arange(T, dtype=torch.int32), 1, None),
    "stride2-i1-mqa": (2, 40, 4, 1, 32, lambda T: torch.arange(1, T, 2, dtype=torch.int32), None, None),
    "stride3-i0-window5": (1, 50, 4, 2, 24, lambda T: torch.arange(0, T, 3), 5, 0.3),
    "stride3-i2-window7": (1, 34, 2, 2, 24, lambda T: torch.arange(2, T, 3, dtype=torch.int32), 7, None),
    "unsorted-subset": (2, 45, 3, 1, 20, lambda T: torch.randperm(T)[:19].int(), 7, None),
    "unsorted-all-no-window": (1, 29, 2, 1, 24, lambda T: torch.randperm(T), None, None),
    # T+2 sees the window's last keys, T+50 and -1 see no key at all
    "beyond-T-and-unseen": (1, 20, 2, 1, 24, lambda T: torch.tensor([T + 2, 5, -1, T + 50, 0, T - 1]), 8, None),
    "beyond-T-no-window": (2, 18, 2, 2, 8, lambda T: torch.tensor([40, 17, 3, 100], dtype=torch.int32), None, None),
    "T1-Tq1": (2, 1, 2, 1, 24, lambda T: torch.tensor([0]), None, None),
    "decode-Tq1": (1, 45, 4, 2, 64, lambda T: torch.tensor([T - 1]), None, None),
    "dh200-window9": (1, 23, 2, 2, 200, lambda T: torch.arange(2, T, 4), 9, None),
    "no-queries": (1, 9, 2, 1, 16, lambda T: torch.zeros(0, dtype=torch.long), None, None),
}


def _visible(q_pos: torch.Tensor, T: int, window) -> torch.Tensor:
    """[Tq, T] bool: query i sees key j."""
    pos, j = q_pos.long()[:, None], torch.arange(T)[None, :]
    mask = j <= pos
    return mask if window is None else mask & (pos - j < window)


def _inputs(B, Tq, T, H, Hkv, Dh):
    q = torch.randn(B, Tq, H, Dh, dtype=torch.float64)
    k = torch.randn(B, T, Hkv, Dh, dtype=torch.float64)
    v = torch.randn(B, T, Hkv, Dh, dtype=torch.float64)
    return q, k, v


def _assert_grad_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """assert_close, except where the true gradient is exactly zero (every query sees one key,
    so the softmax does not depend on q): no relative error exists there, so the rounding
    residue, O(eps) for O(1) inputs, must stay below tol in absolute terms."""
    if ref.numel() and not ref.any():
        err = out.detach().abs().max().item()
        assert err <= tol, f"{what}: max |{what}| {err:.3e} > {tol:.0e} where the reference is exactly 0"
    else:
        assert_close(out, ref, tol, what)


def _naive(q, k, v, q_pos, window, scale):
    """One query, one head at a time, straight from the definition."""
    B, Tq, H, Dh = q.shape
    group = H // k.shape[2]
    scale = Dh ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                p = int(q_pos[i])
                keys = [j for j in range(k.shape[1]) if j <= p and (window is None or p - j < window)]
                if not keys:
                    continue
                s = torch.stack([(q[b, i, h] * k[b, j, h // group]).sum() * scale for j in keys])
                w = torch.softmax(s, dim=0)
                out[b, i, h] = sum(w[n] * v[b, j, h // group] for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_interleaved_attention_matches_reference(device, dtype, name):
    B, T, H, Hkv, Dh, make_pos, window, scale = CONFIGS[name]
    q_pos = make_pos(T)
    q64, k64, v64 = _inputs(B, len(q_pos), T, H, Hkv, Dh)
    q, k, v = (leaf(t, dtype, device) for t in (q64, k64, v64))
    qr, kr, vr = (leaf(t, torch.float64, "cpu") for t in (q64, k64, v64))
    out = interleaved_attention(q, k, v, q_pos.to(device), window, scale)
    ref = reference.interleaved_attention(qr, kr, vr, q_pos, window, scale)
    fwd_tol, grad_tol = TOL[dtype]
    assert out.dtype == dtype
    assert_close(out, ref, fwd_tol, "o")

    dout = torch.randn_like(ref)
    out.backward(dout.to(device=device, dtype=dtype))
    ref.backward(dout)
    _assert_grad_close(q.grad, qr.grad, grad_tol, "dq")
    _assert_grad_close(k.grad, kr.grad, grad_tol, "dk")
    _assert_grad_close(v.grad, vr.grad, grad_tol, "dv")

    # a query that sees no key outputs exact zeros and gets an exact zero gradient
    unseen = ~_visible(q_pos, T, window).any(-1)
    assert (out[:, unseen.to(device)] == 0).all()
    assert (q.grad[:, unseen.to(device)] == 0).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_matches_naive_loop(name):
    B, T, H, Hkv, Dh, make_pos, window, scale = CONFIGS[name]
    q_pos = make_pos(T)
    q, k, v = _inputs(B, len(q_pos), T, H, Hkv, Dh)
    torch.testing.assert_close(reference.interleaved_attention(q, k, v, q_pos, window, scale),
                               _naive(q, k, v, q_pos, window, scale))


@pytest.mark.parametrize("device,dtype", CASES)
def test_causal_matches_sdpa(device, dtype):
    B, T, H, Dh = 2, 33, 3, 16
    q64, k64, v64 = _inputs(B, T, T, H, H, Dh)
    q, k, v = (leaf(t, dtype, device) for t in (q64, k64, v64))
    qr, kr, vr = (leaf(t, torch.float64, "cpu") for t in (q64, k64, v64))
    out = interleaved_attention(q, k, v, torch.arange(T, device=device))
    # SDPA is head-major [B, H, T, Dh]
    ref = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2),
                                         is_causal=True).transpose(1, 2)
    fwd_tol, grad_tol = TOL[dtype]
    assert_close(out, ref, fwd_tol, "o")
    assert_close(reference.interleaved_attention(q64, k64, v64, torch.arange(T)), ref, 1e-12, "reference o")
    dout = torch.randn_like(ref)
    out.backward(dout.to(device=device, dtype=dtype))
    ref.backward(dout)
    assert_close(q.grad, qr.grad, grad_tol, "dq")
    assert_close(k.grad, kr.grad, grad_tol, "dk")
    assert_close(v.grad, vr.grad, grad_tol, "dv")


@pytest.mark.parametrize("device,dtype", CASES)
def test_skips_key_blocks_no_query_sees(device, dtype):
    """White-box check of block skipping: keys 0..127 lie outside every query's window and in
    whole key blocks of any block size the kernels use (<= 64), so they must never be read.
    NaN there would reach the outputs through 0 * NaN if a kernel visited those blocks."""
    T, W = 200, 4
    q_pos = torch.arange(150, T).flip(0)
    q64, k64, v64 = _inputs(1, len(q_pos), T, 2, 1, 16)
    q, k, v = (leaf(t, dtype, device) for t in (q64, k64, v64))
    with torch.no_grad():
        k[:, :128] = float("nan")
        v[:, :128] = float("nan")
    qr, kr, vr = (leaf(t, torch.float64, "cpu") for t in (q64, k64, v64))
    out = interleaved_attention(q, k, v, q_pos.to(device), W)
    ref = reference.interleaved_attention(qr, kr, vr, q_pos, W)
    fwd_tol, grad_tol = TOL[dtype]
    assert_close(out, ref, fwd_tol, "o")
    dout = torch.randn_like(ref)
    out.backward(dout.to(device=device, dtype=dtype))
    ref.backward(dout)
    assert_close(q.grad, qr.grad, grad_tol, "dq")
    assert_close(k.grad, kr.grad, grad_tol, "dk")
    assert_close(v.grad, vr.grad, grad_tol, "dv")


@pytest.mark.parametrize("device,dtype", CASES)
def test_custom_ops_pass_opcheck(device, dtype):
    """Schema, fake (meta) implementations and autograd registration, as torch.compile uses them."""
    ops = importlib.import_module("hybrid_lm.kernels.interleaved_attention")
    q, k, v = (leaf(t, dtype, device) for t in _inputs(1, 5, 9, 2, 1, 16))
    q_pos = torch.tensor([8, 0, 3, 2, 5], device=device)
    torch.library.opcheck(ops._attention_fwd, (q, k, v, q_pos, 3, 0.25))
    # the backward op has no derivative of its own (no double backward): check it on plain tensors
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = ops._attention_fwd(q, k, v, q_pos, None, 0.25)
    torch.library.opcheck(ops._attention_bwd, (q, k, v, q_pos, o, lse, torch.randn_like(o), None, 0.25))


@pytest.mark.parametrize("device,dtype", CASES)
def test_non_contiguous_inputs(device, dtype):
    """Views as a model makes them: q from a head-major tensor, k and v from one packed [.., 2, ..] buffer."""
    B, T, H, Hkv, Dh = 2, 19, 4, 2, 16
    q_pos = torch.arange(1, T, 2)
    q64 = torch.randn(B, H, len(q_pos), Dh, dtype=torch.float64)
    kv64 = torch.randn(B, T, 2, Hkv, Dh, dtype=torch.float64)
    q, kv = leaf(q64, dtype, device), leaf(kv64, dtype, device)
    qr, kvr = leaf(q64, torch.float64, "cpu"), leaf(kv64, torch.float64, "cpu")
    out = interleaved_attention(q.transpose(1, 2), kv[:, :, 0], kv[:, :, 1], q_pos.to(device), 6)
    ref = reference.interleaved_attention(qr.transpose(1, 2), kvr[:, :, 0], kvr[:, :, 1], q_pos, 6)
    fwd_tol, grad_tol = TOL[dtype]
    assert_close(out, ref, fwd_tol, "o")
    dout = torch.randn_like(ref)
    out.backward(dout.to(device=device, dtype=dtype))
    ref.backward(dout)
    assert_close(q.grad, qr.grad, grad_tol, "dq")
    assert_close(kv.grad, kvr.grad, grad_tol, "dkv")


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = (t.float() for t in _inputs(1, 5, 7, 2, 1, 12))
    q_pos = torch.tensor([6, 0, 3, 2, 5])
    torch.testing.assert_close(interleaved_attention(q, k, v, q_pos),
                               interleaved_attention(q, k, v, q_pos, scale=1 / math.sqrt(12)))


def test_interleaved_attention_rejects_bad_input():
    q, k, v = (t.float() for t in _inputs(2, 5, 7, 4, 2, 8))
    q_pos = torch.arange(5)
    with pytest.raises(ValueError, match=r"q: expected shape \[B, Tq, H, Dh\]"):
        interleaved_attention(q[0], k, v, q_pos)
    with pytest.raises(ValueError, match=r"k: expected shape \[B=2, T, Hkv, Dh=8\]"):
        interleaved_attention(q, k[..., :4], v, q_pos)
    with pytest.raises(ValueError, match=r"v: expected shape \[B=2, T=7, Hkv=2, Dh=8\]"):
        interleaved_attention(q, k, v[:, :6], q_pos)
    with pytest.raises(ValueError, match="k: expected a number of KV heads Hkv dividing H=4, got Hkv=3"):
        interleaved_attention(q, torch.randn(2, 7, 3, 8), torch.randn(2, 7, 3, 8), q_pos)
    with pytest.raises(ValueError, match=r"q_pos: expected shape \[Tq=5\], got \[4\]"):
        interleaved_attention(q, k, v, q_pos[:4])
    with pytest.raises(ValueError, match="q_pos: expected dtype in"):
        interleaved_attention(q, k, v, q_pos.float())
    with pytest.raises(ValueError, match="k: expected dtype in"):
        interleaved_attention(q, k.double(), v, q_pos)
    with pytest.raises(ValueError, match="q: expected dtype in"):
        interleaved_attention(q.int(), k, v, q_pos)
    with pytest.raises(ValueError, match="q_pos: expected a torch.Tensor"):
        interleaved_attention(q, k, v, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="q: expected head dim Dh in"):
        interleaved_attention(torch.randn(1, 1, 1, 257), torch.randn(1, 1, 1, 257), torch.randn(1, 1, 1, 257),
                              torch.tensor([0]))
    for window in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window: expected a positive int or None"):
            interleaved_attention(q, k, v, q_pos, window=window)
    with pytest.raises(ValueError, match="scale: expected a float or None"):
        interleaved_attention(q, k, v, q_pos, scale="0.5")
    # device mismatch: the meta device exists on every machine
    with pytest.raises(ValueError, match="k: expected device cpu, got meta"):
        interleaved_attention(q, k.to("meta"), v, q_pos)
    with pytest.raises(ValueError, match="q_pos: expected device cpu, got meta"):
        interleaved_attention(q, k, v, q_pos.to("meta"))
