import torch
import pytest

from hybrid_lm.kernels import gmu, reference
from kernel_testing import CASES, TOL, assert_close, leaf


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", [(1,), (3, 7, 33), (2, 1, 1025)])
def test_gmu_matches_reference(device, dtype, shape):
    g64 = torch.randn(shape, dtype=torch.float64) * 3
    m64 = torch.randn(shape, dtype=torch.float64)
    g, m = leaf(g64, dtype, device), leaf(m64, dtype, device)
    gr, mr = leaf(g64, torch.float64, "cpu"), leaf(m64, torch.float64, "cpu")
    out, ref = gmu(g, m), reference.gmu(gr, mr)
    fwd_tol, grad_tol = TOL[dtype]
    assert out.dtype == dtype
    assert_close(out, ref, fwd_tol, "out")
    dout = torch.randn(shape, dtype=torch.float64)
    out.backward(dout.to(device=device, dtype=dtype))
    ref.backward(dout)
    assert_close(g.grad, gr.grad, grad_tol, "dgate")
    assert_close(m.grad, mr.grad, grad_tol, "dmemory")


def test_reference_is_memory_times_silu_gate():
    g, m = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(reference.gmu(g, m), m * g * torch.sigmoid(g))


def test_gmu_rejects_bad_input():
    g = torch.randn(2, 3)
    with pytest.raises(ValueError, match="memory: expected shape"):
        gmu(g, torch.randn(2, 4))
    with pytest.raises(ValueError, match="memory: expected dtype"):
        gmu(g, torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="gate: expected a torch.Tensor"):
        gmu([1.0], g)


def test_custom_ops_pass_opcheck():
    g, m = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.hybrid_lm.gmu_fwd.default, (g, m))
    torch.library.opcheck(torch.ops.hybrid_lm.gmu_bwd.default, (g.detach(), m.detach(), torch.randn(3, 5)))
