import importlib

import pytest
import torch
import torch.nn.functional as F

from hybrid_lm.kernels import causal_conv1d, causal_conv1d_update, reference
from kernel_testing import CASES, TOL, assert_close, leaf

WIDTHS = list(range(2, 9))


def _inputs(B, T, D, W, N=None, seed=0):
    """Random float64 x [B,T,D], weight [D,W], bias [D], initial_state [N or B,D,W-1] (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    N = B if N is None else N
    return (torch.randn(B, T, D, generator=g, dtype=torch.float64),
            torch.randn(D, W, generator=g, dtype=torch.float64) / W ** 0.5,
            torch.randn(D, generator=g, dtype=torch.float64),
            torch.randn(N, D, W - 1, generator=g, dtype=torch.float64))


def _leaves(x, w, b, h0, dtype, device):
    """Differentiable copies for the kernel (states stay fp32) and for the float64 reference."""
    kern = [leaf(x, dtype, device), leaf(w, dtype, device), leaf(b, dtype, device), leaf(h0, torch.float32, device)]
    ref = [leaf(t, torch.float64, "cpu") for t in (x, w, b, h0)]
    return kern, ref


def _naive(x, w, b, h0, silu):
    """Python loop over batch, time and taps, straight from the definition."""
    B, T, D = x.shape
    W = w.shape[1]
    xp = torch.cat([h0.transpose(1, 2), x], dim=1)  # [B, W-1+T, D]: position t of x is row t + W-1
    y = torch.zeros_like(x)
    for i_b in range(B):
        for t in range(T):
            acc = b.clone()
            for k in range(W):
                acc = acc + w[:, k] * xp[i_b, t + k]
            y[i_b, t] = F.silu(acc) if silu else acc
    return y, xp[:, T:].transpose(1, 2)


@pytest.mark.parametrize("W", [2, 4, 8])
@pytest.mark.parametrize("silu", [False, True])
def test_reference_matches_naive_loop(W, silu):
    x, w, b, h0 = _inputs(2, 6, 3, W)  # T=6 < W-1 for W=8: the final state keeps part of h0
    act = "silu" if silu else None
    y, ht = reference.causal_conv1d(x, w, b, act, h0, True)
    y_n, ht_n = _naive(x, w, b, h0, silu)
    torch.testing.assert_close(y, y_n)
    torch.testing.assert_close(ht, ht_n)
    # no initial state means zeros
    torch.testing.assert_close(reference.causal_conv1d(x, w, b, act), _naive(x, w, b, torch.zeros_like(h0), silu)[0])
    # packed sequences are independent sequences, each with its own states
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    xs = x[:1].reshape(1, 6, 3)
    y, ht = reference.causal_conv1d(xs, w, b, act, h0, True, cu)
    for i, (s, e) in enumerate([(0, 2), (2, 6)]):
        y_n, ht_n = _naive(xs[:, s:e], w, b, h0[i:i + 1], silu)
        torch.testing.assert_close(y[:, s:e], y_n)
        torch.testing.assert_close(ht[i:i + 1], ht_n)


def _run(x, w, b, act, h0, final, cu=None):
    """causal_conv1d with optional pieces switched off by passing None; returns (y, final or None)."""
    out = causal_conv1d(x, w, b, act, h0, final, cu)
    return out if final else (out, None)


def _check_fwd_bwd(kern, ref, use_bias, act, use_h0, final, dtype, cu=None, seed=1):
    """Forward, final state and every gradient of the kernel against the float64 reference."""
    fwd_tol, grad_tol = TOL[dtype]
    x, w, b, h0 = kern
    xr, wr, br, h0r = ref
    y, ht = _run(x, w, b if use_bias else None, act, h0 if use_h0 else None, final, cu)
    yr, htr = _run(xr, wr, br if use_bias else None, act, h0r if use_h0 else None, final,
                   None if cu is None else cu.cpu())
    assert y.dtype == dtype
    assert_close(y, yr, fwd_tol, "y")
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(yr.shape, generator=g, dtype=torch.float64)
    loss, loss_r = (y * dy.to(y)).sum(), (yr * dy).sum()
    if final:
        assert ht.dtype == torch.float32
        assert_close(ht, htr, fwd_tol, "final_state")
        dht = torch.randn(htr.shape, generator=g, dtype=torch.float64)
        loss, loss_r = loss + (ht * dht.to(ht)).sum(), loss_r + (htr * dht).sum()
    loss.backward()
    loss_r.backward()
    assert_close(x.grad, xr.grad, grad_tol, "dx")
    assert_close(w.grad, wr.grad, grad_tol, "dweight")
    if use_bias:
        assert_close(b.grad, br.grad, grad_tol, "dbias")
    if use_h0:
        assert_close(h0.grad, h0r.grad, grad_tol, "dinitial_state")


# (bias, activation, initial_state, output_final_state)
CONFIGS = {
    "all": (True, "silu", True, True),
    "plain": (False, None, False, False),
    "final-no-init": (True, None, False, True),
    "init-no-final": (False, "silu", True, False),
}


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("W", WIDTHS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("B,T,D", [(2, 1, 5), (2, "W-2", 3), (1, 70, 40)], ids=["T=1", "T<W-1", "T=70"])
def test_causal_conv1d_matches_reference(device, dtype, W, config, B, T, D):
    T = max(1, W - 2) if T == "W-2" else T
    kern, ref = _leaves(*_inputs(B, T, D, W), dtype, device)
    _check_fwd_bwd(kern, ref, *CONFIGS[config], dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("W", [2, 5])
def test_gradient_through_final_state_only(device, dtype, W):
    """Only the final state is used: its gradient must reach x's last inputs and initial_state."""
    grad_tol = TOL[dtype][1]
    (x, w, b, h0), (xr, wr, br, h0r) = _leaves(*_inputs(2, 3, 6, W), dtype, device)
    _, ht = causal_conv1d(x, w, b, "silu", h0, True)
    _, htr = reference.causal_conv1d(xr, wr, br, "silu", h0r, True)
    dht = torch.randn(htr.shape, dtype=torch.float64)
    (ht * dht.to(ht)).sum().backward()
    (htr * dht).sum().backward()
    assert_close(x.grad, xr.grad, grad_tol, "dx")
    assert_close(h0.grad, h0r.grad, grad_tol, "dinitial_state")
    assert w.grad.abs().max() == 0 and b.grad.abs().max() == 0


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("programs", [1, 3])
def test_dweight_partials_over_chunks(device, dtype, programs, monkeypatch):
    """Force several time blocks per program (and a partly empty last chunk): the per-chunk
    dweight/dbias partials must still sum to the full reduction; D=130 spans two channel blocks."""
    monkeypatch.setattr(importlib.import_module("hybrid_lm.kernels.causal_conv1d"), "BWD_PROGRAMS", programs)
    kern, ref = _leaves(*_inputs(1, 300, 130, 4), dtype, device)
    _check_fwd_bwd(kern, ref, True, "silu", True, True, dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("W", [2, 4, 7])
def test_varlen_matches_reference_and_sequences(device, dtype, W):
    """Packed sequences (some shorter than W-1, one spanning time blocks) against the float64
    reference; then, with an empty sequence added, equal to running each sequence on its own
    (outputs, final states, dx, dinitial_state per sequence; dweight, dbias summed over them)."""
    def cu_of(lengths):
        return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)

    x, w, b, h0 = _inputs(1, 78, 6, W, N=4)
    _check_fwd_bwd(*_leaves(x, w, b, h0, dtype, device), True, "silu", True, True, dtype,
                   cu_of([5, 1, 70, 2]).to(device))

    lengths = [5, 0, 1, 70, 2]  # (the reference cannot run an empty sequence, the kernel can)
    T, D, N = sum(lengths), 6, len(lengths)
    cu = cu_of(lengths)
    x, w, b, h0 = _inputs(1, T, D, W, N=N, seed=2)
    fwd_tol, grad_tol = TOL[dtype]
    (xk, wk, bk, h0k), _ = _leaves(x, w, b, h0, dtype, device)
    y, ht = causal_conv1d(xk, wk, bk, "silu", h0k, True, cu.to(device))
    dy, dht = torch.randn_like(y), torch.randn_like(ht)
    ((y * dy).sum() + (ht * dht).sum()).backward()
    dw, db = torch.zeros_like(wk), torch.zeros_like(bk)
    for i in range(N):
        s, e = cu[i].item(), cu[i + 1].item()
        xs, ws, bs = leaf(x[:, s:e], dtype, device), leaf(w, dtype, device), leaf(b, dtype, device)
        h0s = leaf(h0[i:i + 1], torch.float32, device)
        ys, hts = causal_conv1d(xs, ws, bs, "silu", h0s, True)
        ((ys * dy[:, s:e]).sum() + (hts * dht[i:i + 1]).sum()).backward()
        if e > s:
            assert_close(ys, y[:, s:e], fwd_tol, f"y of sequence {i}")
            assert_close(xs.grad, xk.grad[:, s:e], grad_tol, f"dx of sequence {i}")
        assert_close(hts, ht[i:i + 1], fwd_tol, f"final state of sequence {i}")
        assert_close(h0s.grad, h0k.grad[i:i + 1], grad_tol, f"dinitial_state of sequence {i}")
        dw, db = dw + ws.grad, db + bs.grad
    assert_close(dw, wk.grad, grad_tol, "dweight")
    assert_close(db, bk.grad, grad_tol, "dbias")


def _conv_state(S, D, W, layout, device):
    """Slots [S, D, W-1] filled with random values; 'transposed' stores them as [S, W-1, D]."""
    st = torch.randn(S, W - 1, D, dtype=torch.float32, device=device)
    return st.transpose(1, 2) if layout == "transposed" else st.transpose(1, 2).contiguous()


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("W", [2, 4, 8])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64, None])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_update_steps_equal_full_conv(device, dtype, W, index_dtype, layout):
    """Prefill some tokens, then decode the rest step by step in permuted slots: the outputs are
    those of one causal_conv1d over the whole sequence, and the slots end as its final state."""
    B, D, T0, T1, S = 3, 20, 2, 5, 5
    x, w, b, h0 = _inputs(B, T0 + T1, D, W)
    y_full, ht_full = reference.causal_conv1d(x, w, b, "silu", h0, True)
    xk, wk, bk = (t.to(device=device, dtype=dtype) for t in (x, w, b))
    _, ht0 = causal_conv1d(xk[:, :T0], wk, bk, "silu", h0.float().to(device), True)
    slots = torch.tensor([4, 0, 2]) if index_dtype is not None else torch.arange(B)
    conv_state = _conv_state(S, D, W, layout, device)
    conv_state[slots.to(device)] = ht0
    idx = None if index_dtype is None else slots.to(device=device, dtype=index_dtype)
    fwd_tol, _ = TOL[dtype]
    for t in range(T0, T0 + T1):
        y = causal_conv1d_update(xk[:, t], conv_state, wk, bk, "silu", idx)
        assert y.dtype == dtype
        assert_close(y, y_full[:, t], fwd_tol, f"y at step {t}")
    assert_close(conv_state[slots.to(device)], ht_full, fwd_tol, "conv_state")


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_update_padding_rows_touch_nothing(device, dtype, index_dtype, layout):
    """Rows with index -1 output zeros and change nothing: every slot no live row names stays
    bit-exact; the named slots and the live rows' outputs match the reference update."""
    B, D, W, S = 4, 33, 4, 6
    x, w, b, _ = _inputs(1, B, D, W)
    xk, wk, bk = (t.to(device=device, dtype=dtype) for t in (x[0], w, b))
    slots = torch.tensor([3, -1, 0, -1])
    conv_state = _conv_state(S, D, W, layout, device)
    before = conv_state.clone()
    y = causal_conv1d_update(xk, conv_state, wk, bk, "silu", slots.to(device=device, dtype=index_dtype))
    expect = before.double().cpu()
    y_ref = reference.causal_conv1d_update(x[0], expect, w, b, "silu", slots)
    assert torch.equal(y[1], torch.zeros_like(y[1])) and torch.equal(y[3], torch.zeros_like(y[3]))
    live = slots >= 0
    assert_close(y[live], y_ref[live], TOL[dtype][0], "y")
    for s in range(S):
        if s in (3, 0):
            assert_close(conv_state[s], expect[s], TOL[dtype][0], f"slot {s}")
        else:
            assert torch.equal(conv_state[s], before[s]), f"slot {s} changed"


@pytest.mark.parametrize("W", [2, 4])
def test_reference_update_steps_equal_full_conv(W):
    """The CPU path: the reference decode step reproduces the reference full conv step by step."""
    x, w, b, h0 = _inputs(2, 4, 3, W)
    y_full, ht_full = reference.causal_conv1d(x, w, b, None, h0, True)
    state = h0.clone()
    for t in range(4):
        torch.testing.assert_close(reference.causal_conv1d_update(x[:, t], state, w, b), y_full[:, t])
    torch.testing.assert_close(state, ht_full)


def test_custom_ops_pass_opcheck():
    """Schemas, fake implementations, autograd registration and the in-place mutation declaration."""
    x, w, b, h0 = (t.float().requires_grad_(True) for t in _inputs(1, 5, 4, 3, N=2))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    ops = torch.ops.hybrid_lm
    torch.library.opcheck(ops.causal_conv1d_fwd, (x, w, b, h0, cu, True))
    torch.library.opcheck(ops.causal_conv1d_fwd, (x, w, None, None, None, False))
    dy, dht = torch.randn_like(x), torch.randn(1, 4, 2)
    torch.library.opcheck(ops.causal_conv1d_bwd, (x.detach(), w.detach(), b.detach(), h0[:1].detach(), None, True,
                                                  dy, dht))
    torch.library.opcheck(ops.causal_conv1d_update, (torch.randn(3, 4), torch.randn(4, 4, 2), w.detach(),
                                                     b.detach(), torch.tensor([2, -1, 0]), True))


def test_causal_conv1d_rejects_bad_input():
    x, w, b, h0 = (t.float() for t in _inputs(2, 5, 4, 3))
    cases = [
        (dict(x=x[0]), "x: expected shape"),
        (dict(x=x.long()), "x: expected dtype"),
        (dict(weight=w[:3]), "weight: expected shape"),
        (dict(weight=w.half()), "weight: expected dtype"),
        (dict(weight=w.to("meta")), "weight: expected device"),
        (dict(weight=torch.randn(4, 9)), "weight: expected width"),
        (dict(weight=torch.randn(4, 1)), "weight: expected width"),
        (dict(bias=b[:2]), "bias: expected shape"),
        (dict(bias=b.long()), "bias: expected dtype"),
        (dict(activation="relu"), "activation: expected"),
        (dict(initial_state=h0[:, :, :1]), "initial_state: expected shape"),
        (dict(initial_state=h0[:1]), "initial_state: expected shape"),
        (dict(initial_state=h0.long()), "initial_state: expected dtype"),
        (dict(output_final_state=1), "output_final_state: expected a bool"),
        (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "cu_seqlens: packed batches need batch size 1"),
        (dict(x=x[:1], cu_seqlens=torch.tensor([0, 5])), "cu_seqlens: expected dtype"),
        (dict(x=x[:1], cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32), initial_state=h0[:1]),
         "initial_state: expected shape"),
    ]
    for bad, match in cases:
        args = dict(x=x, weight=w, bias=b, activation="silu", initial_state=h0, output_final_state=True)
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            causal_conv1d(**args)


def test_causal_conv1d_update_rejects_bad_input():
    x, w, b = torch.randn(3, 4), torch.randn(4, 3), torch.randn(4)
    state, idx = torch.randn(5, 4, 2), torch.tensor([0, 1, -1])
    cases = [
        (dict(x=x[None]), "x: expected shape"),
        (dict(conv_state=state[:, :, :1]), "conv_state: expected shape"),
        (dict(conv_state=state[:, :3]), "conv_state: expected shape"),
        (dict(conv_state=state.long()), "conv_state: expected dtype"),
        (dict(conv_state=state.to("meta")), "conv_state: expected device"),
        (dict(weight=torch.randn(4, 9), conv_state=torch.randn(5, 4, 8)), "weight: expected width"),
        (dict(bias=b[:3]), "bias: expected shape"),
        (dict(activation="gelu"), "activation: expected"),
        (dict(state_indices=idx[:2]), "state_indices: expected shape"),
        (dict(state_indices=idx.float()), "state_indices: expected dtype"),
        (dict(state_indices=None, conv_state=state[:2]), "conv_state: expected at least B=3 slots"),
    ]
    for bad, match in cases:
        args = dict(x=x, conv_state=state, weight=w, bias=b, activation=None, state_indices=idx)
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            causal_conv1d_update(**args)
