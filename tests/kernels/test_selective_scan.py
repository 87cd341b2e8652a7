import importlib

import pytest
import torch
import torch.nn.functional as F

from hybrid_lm.kernels import reference, selective_scan, selective_state_update
from hybrid_lm.kernels._common import use_triton
from kernel_testing import CASES, TOL, assert_close, leaf

# the module (the package's `selective_scan` attribute is the function): CHUNK, BLOCK_D
ss_module = importlib.import_module("hybrid_lm.kernels.selective_scan")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
PER_TOKEN = ("u", "delta", "B", "C", "z")
# option sets: (D, z, delta_bias, delta_softplus, initial_state, output_final_state)
ALL = (True, True, True, True, True, True)
OPTIONS = {
    "all": ALL,
    "none": (False,) * 6,
    "D-bias-softplus-final": (True, False, True, True, False, True),
    "z-init": (False, True, False, False, True, False),
    "bias-init-final": (False, False, True, False, True, True),
    "D-z-softplus": (True, True, False, True, False, False),
}


def _inputs(batch, T, Dm, N, softplus=True, n_states=None, seed=0):
    """Random float64 inputs in the ranges a Mamba layer sees (never zeros), keyed by NAMES."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if softplus:  # pre-activations around softplus^-1 of typical steps (dt ~ 0.05 .. 1)
        delta = randn(batch, T, Dm) * 0.7 - 1.0
    else:  # raw steps, positive
        delta = torch.rand(batch, T, Dm, generator=g, dtype=torch.float64) * 0.5 + 0.02
    return {"u": randn(batch, T, Dm), "delta": delta, "A": -torch.exp(randn(Dm, N)),
            "B": randn(batch, T, N), "C": randn(batch, T, N), "D": randn(Dm), "z": randn(batch, T, Dm),
            "delta_bias": randn(Dm) * 0.2, "initial_state": randn(batch if n_states is None else n_states, Dm, N)}


def _leaves(x, use, dtype, device):
    """Differentiable copies for the kernel (A and states fp32) and the float64 reference, which
    sees the same rounded values; None where the option is off."""
    kern, ref = {}, {}
    for name, t in x.items():
        if not use.get(name, True):
            kern[name] = ref[name] = None
            continue
        kdtype = torch.float32 if name in ("A", "initial_state") else dtype
        kern[name] = leaf(t, kdtype, device)
        ref[name] = leaf(kern[name].double(), torch.float64, "cpu")
    return kern, ref


def _use(options):
    D, z, bias, softplus, init, final = options
    return {"D": D, "z": z, "delta_bias": bias, "initial_state": init}, softplus, final


def _scan(fn, t, softplus, final, cu=None):
    out = fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], softplus,
             t["initial_state"], final, cu)
    return out if final else (out, None)


def _backward(y, final, dy, dfinal):
    outs, grads = [y], [dy.to(device=y.device, dtype=y.dtype)]
    if final is not None:
        outs.append(final)
        grads.append(dfinal.to(device=final.device, dtype=final.dtype))
    torch.autograd.backward(outs, grads)


def _check_against_reference(x, options, dtype, device, cu=None, seed=1):
    """Forward, final state and the gradient of every tensor input against the float64 reference."""
    use, softplus, final = _use(options)
    kern, ref = _leaves(x, use, dtype, device)
    y, ht = _scan(selective_scan, kern, softplus, final, None if cu is None else cu.to(device))
    yr, htr = _scan(reference.selective_scan, ref, softplus, final, cu)
    fwd_tol, grad_tol = TOL[dtype]
    assert y.dtype == dtype
    assert_close(y, yr, fwd_tol, "y")
    if final:
        assert ht.dtype == torch.float32
        assert_close(ht, htr, fwd_tol, "final_state")
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(yr.shape, generator=g, dtype=torch.float64)
    dfinal = torch.randn(htr.shape, generator=g, dtype=torch.float64) if final else None
    _backward(y, ht, dy, dfinal)
    _backward(yr, htr, dy, dfinal)
    for name in NAMES:
        if kern[name] is not None:
            assert_close(kern[name].grad, ref[name].grad, grad_tol, f"d{name}")


# ---------------------------------------------------------------------------------------------
# the reference itself
# ---------------------------------------------------------------------------------------------

def _naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """A Python loop over tokens, straight from the definition: (y, final state)."""
    batch, T, Dm = u.shape
    dt = delta if delta_bias is None else delta + delta_bias
    dt = F.softplus(dt) if delta_softplus else dt
    h = torch.zeros(batch, Dm, A.shape[1], dtype=u.dtype) if initial_state is None else initial_state.clone()
    ys = []
    for t in range(T):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        y = (h * C[:, t, None, :]).sum(-1)
        if D is not None:
            y = y + D * u[:, t]
        if z is not None:
            y = y * F.silu(z[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), h


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("T", [1, 7, 30])
def test_reference_matches_naive_loop(options, T):
    use, softplus, _ = _use(options)
    x = {n: t if use.get(n, True) else None for n, t in _inputs(2, T, 5, 3, softplus).items()}
    y, ht = reference.selective_scan(*(x[n] for n in NAMES[:8]), softplus, x["initial_state"], True)
    y_n, ht_n = _naive(*(x[n] for n in NAMES[:8]), softplus, x["initial_state"])
    torch.testing.assert_close(y, y_n)
    torch.testing.assert_close(ht, ht_n)
    if T == 1:
        return
    # packed sequences are independent sequences, each with its own states
    bounds = (0, 3, T)
    packed = {n: t[:1] if n in PER_TOKEN and t is not None else t for n, t in x.items()}
    y, ht = reference.selective_scan(*(packed[n] for n in NAMES[:8]), softplus, packed["initial_state"], True,
                                     torch.tensor(bounds, dtype=torch.int32))
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        one = {n: t[:, s:e] if n in PER_TOKEN and t is not None else t for n, t in packed.items()}
        h0 = None if x["initial_state"] is None else x["initial_state"][i:i + 1]
        y_n, ht_n = _naive(*(one[n] for n in NAMES[:8]), softplus, h0)
        torch.testing.assert_close(y[:, s:e], y_n)
        torch.testing.assert_close(ht[i:i + 1], ht_n)


def test_reference_state_update_is_one_step():
    x = _inputs(3, 1, 6, 4)
    state = x["initial_state"].clone()
    y = reference.selective_state_update(state, x["u"][:, 0], x["delta"][:, 0], x["A"], x["B"][:, 0], x["C"][:, 0],
                                         x["D"], x["z"][:, 0], x["delta_bias"], True)
    y_n, ht_n = _naive(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True,
                       x["initial_state"])
    torch.testing.assert_close(y, y_n[:, 0])
    torch.testing.assert_close(state, ht_n)


# ---------------------------------------------------------------------------------------------
# selective_scan
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_selective_scan_options(device, dtype, options):
    # T = 70: one full chunk and a partial one; Dm, N not powers of two
    x = _inputs(2, 70, 13, 5, softplus=options[3])
    _check_against_reference(x, options, dtype, device)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", [(2, 1, 7, 16), (1, 130, 37, 5), (3, 64, 6, 1), (1, 129, 9, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_selective_scan_shapes(device, dtype, shape):
    _check_against_reference(_inputs(*shape), ALL, dtype, device)


@pytest.mark.parametrize("device,dtype", CASES)
def test_selective_scan_many_chunks_and_channel_blocks(device, dtype, monkeypatch):
    # small chunks and channel blocks: many chunks per sequence carried across, and the dB, dC
    # partials of several channel blocks summed
    monkeypatch.setattr(ss_module, "CHUNK", 8)
    monkeypatch.setattr(ss_module, "BLOCK_D", 8)
    _check_against_reference(_inputs(2, 45, 21, 5), ALL, dtype, device)


@pytest.mark.parametrize("device,dtype", CASES)
def test_selective_scan_gradient_through_final_state_only(device, dtype):
    x = _inputs(2, 70, 6, 4)
    kern, ref = _leaves(x, {}, dtype, device)
    _, ht = _scan(selective_scan, kern, True, True)
    _, htr = _scan(reference.selective_scan, ref, True, True)
    dfinal = torch.randn(htr.shape, dtype=torch.float64)
    ht.backward(dfinal.to(device=device, dtype=ht.dtype))
    htr.backward(dfinal)
    for name in NAMES:
        if name in ("C", "D", "z"):  # they only reach y, which is unused
            assert kern[name].grad is None or not kern[name].grad.any(), f"d{name} should be zero"
        else:
            assert_close(kern[name].grad, ref[name].grad, TOL[dtype][1], f"d{name}")


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("chunk", [64, 8])
def test_varlen_equals_sequences_one_by_one(device, dtype, chunk, monkeypatch):
    monkeypatch.setattr(ss_module, "CHUNK", chunk)
    bounds = [0, 1, 70, 70, 75, 110]  # includes an empty sequence
    cu = torch.tensor(bounds, dtype=torch.int32)
    n_seq = len(bounds) - 1
    x = _inputs(1, bounds[-1], 11, 5, n_states=n_seq)
    packed, _ = _leaves(x, {}, dtype, device)
    y, ht = _scan(selective_scan, packed, True, True, cu.to(device))
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    dfinal = torch.randn(ht.shape, generator=g, dtype=torch.float64)
    _backward(y, ht, dy, dfinal)

    fwd_tol, grad_tol = TOL[dtype]
    shared_grads = {n: 0 for n in ("A", "D", "delta_bias")}
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        if s == e:  # an empty sequence passes its state, and the state's gradient, straight through
            assert torch.equal(ht[i], packed["initial_state"][i].detach())
            assert torch.equal(packed["initial_state"].grad[i], dfinal[i].to(device=device, dtype=torch.float32))
            continue
        one, _ = _leaves({n: t[:, s:e] if n in PER_TOKEN else t for n, t in x.items()}, {}, dtype, device)
        one["initial_state"] = leaf(x["initial_state"][i:i + 1], torch.float32, device)
        y1, ht1 = _scan(selective_scan, one, True, True)
        _backward(y1, ht1, dy[:, s:e], dfinal[i:i + 1])
        assert_close(y[:, s:e], y1, fwd_tol, f"y of sequence {i}")
        assert_close(ht[i:i + 1], ht1, fwd_tol, f"final_state of sequence {i}")
        for n in PER_TOKEN:
            assert_close(packed[n].grad[:, s:e], one[n].grad, grad_tol, f"d{n} of sequence {i}")
        assert_close(packed["initial_state"].grad[i:i + 1], one["initial_state"].grad, grad_tol,
                     f"dinitial_state of sequence {i}")
        for n in shared_grads:
            shared_grads[n] = shared_grads[n] + one[n].grad.double()
    for n, total in shared_grads.items():
        assert_close(packed[n].grad, total, grad_tol, f"d{n} summed over sequences")


@pytest.mark.parametrize("device,dtype", CASES)
def test_varlen_matches_reference(device, dtype):
    cu = torch.tensor([0, 5, 5, 71, 100], dtype=torch.int32)  # sequence 1 is empty
    _check_against_reference(_inputs(1, 100, 7, 16, n_states=4), ALL, dtype, device, cu=cu)


@pytest.mark.parametrize("device,dtype", CASES)
def test_backward_keeps_one_state_per_chunk(device, dtype):
    """What autograd saves grows with T / CHUNK states, not with T states."""
    batch, T, Dm, N = 2, 150, 8, 16
    x = _inputs(batch, T, Dm, N)
    kern, _ = _leaves(x, {}, dtype, device)
    if not use_triton(kern["u"]):
        pytest.skip("this device runs the reference")
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = selective_scan(kern["u"], kern["delta"], kern["A"], kern["B"], kern["C"], kern["D"], kern["z"],
                           kern["delta_bias"], True, kern["initial_state"])
    inputs = {id(t) for t in kern.values()}
    extra = [t for t in saved if id(t) not in inputs]
    n_chunks = batch * -(-T // ss_module.CHUNK)
    assert [tuple(t.shape) for t in extra] == [(n_chunks, Dm, N)]
    assert extra[0].dtype == torch.float32
    assert n_chunks < batch * T // 32  # far fewer than one state per token
    y.sum().backward()  # and backward runs from just that


@pytest.mark.parametrize("device,dtype", CASES)
def test_custom_ops_pass_opcheck(device, dtype):
    """Schemas, fake (meta) kernels and autograd registration hold up under torch.compile's tracing."""
    x = _inputs(1, 11, 4, 3, n_states=2)
    kern, _ = _leaves(x, {}, dtype, device)
    if not use_triton(kern["u"]):
        pytest.skip("this device runs the reference")
    args = [kern[n] for n in NAMES[:8]]
    for cu in (None, torch.tensor([0, 4, 11], dtype=torch.int32, device=device)):
        h0 = kern["initial_state"][:1] if cu is None else kern["initial_state"]
        torch.library.opcheck(torch.ops.hybrid_lm.selective_scan_fwd.default, (*args, True, h0, cu))
    state = torch.randn(3, 4, 3, device=device)
    idx = torch.tensor([2, -1], dtype=torch.int32, device=device)
    step = [t.detach()[:, 0].expand(2, -1).contiguous() if n in PER_TOKEN else t.detach() for n, t in zip(NAMES, args)]
    torch.library.opcheck(torch.ops.hybrid_lm.selective_state_update.default, (state, *step, True, idx))


# ---------------------------------------------------------------------------------------------
# selective_state_update
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("options", [ALL, (False, False, False, False, True, True)], ids=["all", "bare"])
def test_decode_steps_equal_the_scan(device, dtype, options):
    """Decoding token by token from the initial state reproduces selective_scan's y and final state."""
    use, softplus, _ = _use(options)
    batch, T, Dm, N, slots = 3, 9, 10, 5, 6
    x = _inputs(batch, T, Dm, N, softplus)
    kern, _ = _leaves(x, use, dtype, device)
    kern = {n: None if t is None else t.detach() for n, t in kern.items()}
    y_scan, ht_scan = selective_scan(kern["u"], kern["delta"], kern["A"], kern["B"], kern["C"], kern["D"], kern["z"],
                                     kern["delta_bias"], softplus, kern["initial_state"], True)
    idx = torch.tensor([4, 0, 2], device=device)
    state = torch.randn(slots, Dm, N, dtype=torch.float32, device=device)
    state[idx] = kern["initial_state"]
    for t in range(T):
        y = selective_state_update(state, kern["u"][:, t], kern["delta"][:, t], kern["A"], kern["B"][:, t],
                                   kern["C"][:, t], kern["D"], None if kern["z"] is None else kern["z"][:, t],
                                   kern["delta_bias"], softplus, idx)
        assert_close(y, y_scan[:, t], TOL[dtype][0], f"y at step {t}")
    assert_close(state[idx], ht_scan, TOL[dtype][0], "state after the last step")


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_decode_padding_rows_and_unused_slots(device, dtype, index_dtype):
    batch, Dm, N, slots = 4, 37, 16, 7
    x = _inputs(batch, 1, Dm, N, n_states=slots)
    idx = torch.tensor([5, -1, 0, 3], dtype=index_dtype, device=device)
    state = x["initial_state"].to(device=device, dtype=torch.float32)
    before = state.clone()
    args = [x[n][:, 0] if n in PER_TOKEN else x[n] for n in NAMES[:8]]
    kargs = [a.to(device=device, dtype=torch.float32 if n == "A" else dtype) for n, a in zip(NAMES, args)]
    y = selective_state_update(state, *kargs[:6], kargs[6], kargs[7], True, idx)
    ref_state = before.double().cpu()
    rargs = [a.double().cpu() for a in kargs]
    y_ref = reference.selective_state_update(ref_state, *rargs[:6], rargs[6], rargs[7], True, idx.cpu())
    assert y.dtype == dtype
    assert torch.equal(y[1], torch.zeros_like(y[1])), "a padding row outputs zeros"
    assert_close(y, y_ref, TOL[dtype][0], "y")
    used = [5, 0, 3]
    assert_close(state[used], ref_state[used], TOL[dtype][0], "updated slots")
    unused = [1, 2, 4, 6]
    assert torch.equal(state[unused], before[unused]), "slots no row points at stay bit-exact"


@pytest.mark.parametrize("device,dtype", CASES)
def test_decode_without_indices_and_strided_state(device, dtype):
    # no state_indices: row b uses slot b; the state is a transposed view and is updated in place
    batch, Dm, N = 3, 12, 5
    x = _inputs(batch, 1, Dm, N, softplus=False, n_states=batch + 1)
    storage = x["initial_state"].transpose(1, 2).contiguous().to(device=device, dtype=torch.float32)
    state = storage.transpose(1, 2)  # [S, Dm, N] with non-unit stride along N
    ref_state = state.double().cpu().clone()
    args = [x[n][:, 0] if n in PER_TOKEN else x[n] for n in NAMES[:8]]
    kargs = [a.to(device=device, dtype=torch.float32 if n == "A" else dtype) for n, a in zip(NAMES, args)]
    y = selective_state_update(state, *kargs)
    y_ref = reference.selective_state_update(ref_state, *[a.double().cpu() for a in kargs])
    assert_close(y, y_ref, TOL[dtype][0], "y")
    assert_close(storage.transpose(1, 2), ref_state, TOL[dtype][0], "state (through the storage)")
    assert torch.equal(storage.transpose(1, 2)[batch].cpu(), x["initial_state"][batch].float()), "slot 3 untouched"


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def test_selective_scan_rejects_bad_input():
    x = {n: t.float() for n, t in _inputs(2, 5, 4, 3).items()}
    u, delta, A, B, C = (x[n] for n in NAMES[:5])
    with pytest.raises(ValueError, match=r"delta: expected shape \[batch=2, T=5, Dm=4\], got \[2, 5, 3\]"):
        selective_scan(u, delta[..., :3], A, B, C)
    with pytest.raises(ValueError, match="A: expected dtype in \\(float32, float64\\), got bfloat16"):
        selective_scan(u, delta, A.bfloat16(), B, C)
    with pytest.raises(ValueError, match="B: expected shape"):
        selective_scan(u, delta, A, B[..., :2], C)
    with pytest.raises(ValueError, match="C: expected dtype"):
        selective_scan(u, delta, A, B, C.long())
    with pytest.raises(ValueError, match="D: expected shape"):
        selective_scan(u, delta, A, B, C, D=torch.ones(5))
    with pytest.raises(ValueError, match="z: expected shape"):
        selective_scan(u, delta, A, B, C, z=u[:, :4])
    with pytest.raises(ValueError, match="delta_bias: expected a torch.Tensor"):
        selective_scan(u, delta, A, B, C, delta_bias=[0.0])
    with pytest.raises(ValueError, match=r"initial_state: expected shape \[S=2, Dm=4, N=3\]"):
        selective_scan(u, delta, A, B, C, initial_state=torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="initial_state: expected dtype"):
        selective_scan(u, delta, A, B, C, initial_state=torch.zeros(2, 4, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="cu_seqlens: packed batches need batch size 1"):
        selective_scan(u, delta, A, B, C, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens: expected dtype"):
        selective_scan(u[:1], delta[:1], A, B[:1], C[:1], cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="delta_softplus: expected a bool"):
        selective_scan(u, delta, A, B, C, delta_softplus="yes")


def test_selective_state_update_rejects_bad_input():
    state = torch.zeros(4, 6, 3)
    x, dt, z = torch.randn(2, 6), torch.rand(2, 6), torch.randn(2, 6)
    A, B, C = -torch.rand(6, 3), torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"x: expected shape \[batch, Dm=6\], got \[2, 5\]"):
        selective_state_update(state, x[:, :5], dt, A, B, C)
    with pytest.raises(ValueError, match="dt: expected dtype"):
        selective_state_update(state, x, dt.int(), A, B, C)
    with pytest.raises(ValueError, match="A: expected shape"):
        selective_state_update(state, x, dt, A.T, B, C)
    with pytest.raises(ValueError, match="B: expected shape"):
        selective_state_update(state, x, dt, A, B[:1], C)
    with pytest.raises(ValueError, match="state_indices: expected dtype"):
        selective_state_update(state, x, dt, A, B, C, state_indices=torch.zeros(2))
    with pytest.raises(ValueError, match="state_indices: expected shape"):
        selective_state_update(state, x, dt, A, B, C, state_indices=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="state: expected at least B=2 slots"):
        selective_state_update(state[:1], x, dt, A, B, C)
    with pytest.raises(ValueError, match="z: expected shape"):
        selective_state_update(state, x, dt, A, B, C, z=z[:1])
