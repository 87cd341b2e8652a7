"""torch.compile traces through every op (custom ops with fake implementations) without graph
breaks, forward and backward, and gives the eager results. Needs a GPU: torch.compile over kernels
run by Triton's interpreter (TRITON_INTERPRET=1) fails, and on the CPU the ops take the reference."""
import pytest
import torch

import hybrid_lm.kernels as K
from kernel_testing import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile over the kernels needs CUDA")


def _layer(x, conv_w, A, B, C, D, gate, q_pos):
    """A Mamba-ish block through every differentiable op, so one graph holds them all."""
    u = K.causal_conv1d(x, conv_w, activation="silu")
    y, h = K.selective_scan(u, x, A, B, C, D, delta_softplus=True, output_final_state=True)
    y = K.gmu(gate, y)
    b, t, d = y.shape
    q = y.view(b, t, 4, d // 4)
    o = K.interleaved_attention(q[:, q_pos], q, q, q_pos)
    return o.float().square().mean() + h.square().mean()


def test_compiled_ops_match_eager():
    torch.manual_seed(0)
    dev, b, t, d, n = "cuda", 2, 100, 64, 16
    args = [torch.randn(b, t, d, device=dev), torch.randn(d, 4, device=dev), -torch.rand(d, n, device=dev) - 0.1,
            torch.randn(b, t, n, device=dev), torch.randn(b, t, n, device=dev), torch.randn(d, device=dev),
            torch.randn(b, t, d, device=dev)]
    q_pos = torch.arange(1, t, 2, device=dev)
    eager = [a.clone().requires_grad_() for a in args]
    comp = [a.clone().requires_grad_() for a in args]
    loss_e = _layer(*eager, q_pos)
    loss_c = torch.compile(_layer, fullgraph=True)(*comp, q_pos)
    assert_close(loss_c, loss_e, 1e-4, "loss")
    loss_e.backward()
    loss_c.backward()
    for i, (a, b_) in enumerate(zip(comp, eager)):
        assert_close(a.grad, b_.grad, 1e-3, f"grad {i}")


def test_decode_ops_compile_in_place():
    dev, b, d, n, w = "cuda", 8, 64, 16, 4
    conv_state, state = torch.randn(10, d, w - 1, device=dev), torch.randn(10, d, n, device=dev)
    idx = torch.tensor([3, -1, 0, 9, 2, 1, 5, 4], device=dev)
    x, weight = torch.randn(b, d, device=dev), torch.randn(d, w, device=dev)
    A, B, C = -torch.rand(d, n, device=dev), torch.randn(b, n, device=dev), torch.randn(b, n, device=dev)

    def step(conv_state, state):
        u = K.causal_conv1d_update(x, conv_state, weight, activation="silu", state_indices=idx)
        return K.selective_state_update(state, u, x, A, B, C, dt_softplus=True, state_indices=idx)

    cs_e, s_e = conv_state.clone(), state.clone()
    y_e = step(cs_e, s_e)
    y_c = torch.compile(step, fullgraph=True)(conv_state, state)
    assert_close(y_c, y_e, 1e-4, "y")
    assert torch.equal(conv_state, cs_e) and torch.equal(state, s_e)
