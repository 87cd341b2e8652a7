"""Helpers shared by the kernel tests: devices, dtypes, tolerances and the error measure."""
import pytest
import torch

# CPU runs the Triton code interpreted; CUDA runs it compiled (and is where bf16 is meaningful:
# Triton's interpreter returns garbage, not an error, for tl.dot on bf16 operands).
CASES = [pytest.param("cpu", torch.float32, id="cpu-fp32")]
if torch.cuda.is_available():
    CASES += [pytest.param("cuda", torch.float32, id="cuda-fp32"),
              pytest.param("cuda", torch.bfloat16, id="cuda-bf16")]

# (forward, gradient) relative-error bounds
TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 5e-2), torch.float16: (5e-3, 2e-2)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64. NaN anywhere (an unwritten, poisoned element) gives NaN."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def leaf(t: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A fresh differentiable copy of `t` in the given dtype and device."""
    return t.detach().to(device=device, dtype=dtype).requires_grad_(True)
