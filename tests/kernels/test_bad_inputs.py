"""Bad arguments fail with a ValueError naming them before anything reaches a kernel: cu_seqlens
contents (on both backends: the interpreter must not abort on an out-of-bounds read) and the
dtype rules the ops' docstrings state."""
import os
import re

import pytest
import torch

from hybrid_lm.kernels import (causal_conv1d, causal_conv1d_update, gmu, interleaved_attention, selective_scan,
                               selective_state_update)
from hybrid_lm.kernels._common import check_cu_seqlens

T, D, N, W = 16, 4, 3, 3


def _conv(cu):
    """causal_conv1d over a packed [1, T, D] batch -> (y, final_state, initial_state)."""
    h0 = torch.randn(cu.numel() - 1, D, W - 1)
    y, final = causal_conv1d(torch.randn(1, T, D), torch.randn(D, W), initial_state=h0, output_final_state=True,
                             cu_seqlens=cu)
    return y, final, h0


def _scan(cu):
    """selective_scan over a packed [1, T, D] batch -> (y, final_state, initial_state)."""
    h0 = torch.randn(cu.numel() - 1, D, N)
    y, final = selective_scan(torch.randn(1, T, D), torch.rand(1, T, D), -torch.rand(D, N), torch.randn(1, T, N),
                              torch.randn(1, T, N), initial_state=h0, output_final_state=True, cu_seqlens=cu)
    return y, final, h0


PACKED_OPS = [pytest.param(_conv, id="causal_conv1d"), pytest.param(_scan, id="selective_scan")]
BACKENDS = ["reference", "triton"]


def _backend(monkeypatch, backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors run the Triton code only under TRITON_INTERPRET=1")
    monkeypatch.setenv("HYBRID_LM_BACKEND", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", PACKED_OPS)
@pytest.mark.parametrize("bounds", [[1, 5, 16], [0, 9, 5, 16], [0, 5, 10], [0, 5, 100]],
                         ids=["not-from-0", "decreasing", "short-of-T", "beyond-T"])
def test_bad_cu_seqlens_raise_before_any_launch(op, bounds, backend, monkeypatch):
    _backend(monkeypatch, backend)
    expected = "cu_seqlens: expected non-decreasing offsets starting at 0 and ending at T=16"
    with pytest.raises(ValueError, match=re.escape(f"{expected}, got {bounds}")):
        op(torch.tensor(bounds, dtype=torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", PACKED_OPS)
def test_good_cu_seqlens_with_an_empty_sequence_run(op, backend, monkeypatch):
    _backend(monkeypatch, backend)
    y, final, h0 = op(torch.tensor([0, 5, 5, 16], dtype=torch.int32))
    assert y.shape == (1, T, D) and not y.isnan().any()
    assert torch.equal(final[1], h0[1]), "an empty sequence passes its state through"


def test_async_check_when_compiling(monkeypatch):
    """Under torch.compile (and on CUDA) the check is a device-side assert, no host read: on a CPU
    tensor _assert_async raises at once, which shows that branch runs and what it checks."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for bounds in ([0, 5, 16], [0, 5, 5, 16]):
        check_cu_seqlens(torch.tensor(bounds, dtype=torch.int32), 1, 16, torch.device("cpu"))
    for bounds in ([1, 5, 16], [0, 9, 5, 16], [0, 5, 10], [0, 5, 100]):
        with pytest.raises(RuntimeError, match="cu_seqlens: expected non-decreasing offsets"):
            check_cu_seqlens(torch.tensor(bounds, dtype=torch.int32), 1, 16, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# dtype rules as the docstrings state them, one case each
# ---------------------------------------------------------------------------------------------

def _scan_args(**bad):
    args = dict(u=torch.randn(1, T, D), delta=torch.rand(1, T, D), A=-torch.rand(D, N), B=torch.randn(1, T, N),
                C=torch.randn(1, T, N), D=torch.randn(D), delta_bias=torch.randn(D),
                initial_state=torch.randn(1, D, N))
    return selective_scan, {**args, **bad}


def _step_args(**bad):
    args = dict(state=torch.randn(2, D, N), x=torch.randn(2, D), dt=torch.rand(2, D), A=-torch.rand(D, N),
                B=torch.randn(2, N), C=torch.randn(2, N))
    return selective_state_update, {**args, **bad}


def _conv_args(**bad):
    args = dict(x=torch.randn(1, T, D), weight=torch.randn(D, W))
    return causal_conv1d, {**args, **bad}


def _conv_update_args(**bad):
    args = dict(x=torch.randn(2, D), conv_state=torch.randn(2, D, W - 1), weight=torch.randn(D, W))
    return causal_conv1d_update, {**args, **bad}


def _attention_args(**bad):
    args = dict(q=torch.randn(1, 3, 2, 8), k=torch.randn(1, 5, 1, 8), v=torch.randn(1, 5, 1, 8),
                q_pos=torch.tensor([0, 2, 4]))
    return interleaved_attention, {**args, **bad}


def _gmu_args(**bad):
    return gmu, {"gate": torch.randn(2, 5), "memory": torch.randn(2, 5), **bad}


f64, bf16, f16 = torch.float64, torch.bfloat16, torch.float16
DTYPE_RULES = [  # ((op, arguments with one bad), its name, the dtypes the message lists, the bad dtype)
    pytest.param(_scan_args(B=torch.randn(1, T, N, dtype=f64)), "B", "float32", "float64", id="scan-B-like-u"),
    pytest.param(_scan_args(C=torch.randn(1, T, N, dtype=bf16)), "C", "float32", "bfloat16", id="scan-C-like-u"),
    pytest.param(_scan_args(u=torch.randn(1, T, D, dtype=bf16), B=torch.randn(1, T, N, dtype=bf16),
                            C=torch.randn(1, T, N, dtype=bf16), D=torch.randn(D, dtype=f16)),
                 "D", "bfloat16, float32", "float16", id="scan-D-like-u-or-fp32"),
    pytest.param(_scan_args(delta_bias=torch.randn(D, dtype=f64)), "delta_bias", "float32", "float64",
                 id="scan-delta_bias-like-u-or-fp32"),
    pytest.param(_scan_args(A=-torch.rand(D, N, dtype=bf16)), "A", "float32, float64", "bfloat16", id="scan-A"),
    pytest.param(_scan_args(initial_state=torch.randn(1, D, N, dtype=f16)), "initial_state", "float32, float64",
                 "float16", id="scan-initial_state"),
    pytest.param(_step_args(A=-torch.rand(D, N, dtype=f16)), "A", "float32, float64", "float16", id="step-A"),
    pytest.param(_conv_args(weight=torch.randn(D, W, dtype=f16)), "weight", "float32", "float16",
                 id="conv-weight-like-x-or-fp32"),
    pytest.param(_conv_update_args(weight=torch.randn(D, W, dtype=f64)), "weight", "float32", "float64",
                 id="conv_update-weight-like-x-or-fp32"),
    pytest.param(_attention_args(k=torch.randn(1, 5, 1, 8, dtype=f64)), "k", "float32", "float64", id="attn-k-like-q"),
    pytest.param(_attention_args(v=torch.randn(1, 5, 1, 8, dtype=bf16)), "v", "float32", "bfloat16",
                 id="attn-v-like-q"),
    pytest.param(_gmu_args(memory=torch.randn(2, 5, dtype=f64)), "memory", "float32", "float64",
                 id="gmu-memory-like-gate"),
]


@pytest.mark.parametrize("call,name,expected,got", DTYPE_RULES)
def test_dtype_rules(call, name, expected, got, monkeypatch):
    monkeypatch.setenv("HYBRID_LM_BACKEND", "reference")  # the checks come first: no kernel is needed
    op, args = call
    with pytest.raises(ValueError, match=rf"^{name}: expected dtype in \({expected}\), got {got}$"):
        op(**args)


def test_documented_mixed_dtypes_pass(monkeypatch):
    """What the docstrings allow, as the models call it under bf16 autocast: half activations
    with fp32 A, D, delta_bias and conv weights."""
    monkeypatch.setenv("HYBRID_LM_BACKEND", "reference")
    x = torch.randn(1, T, D, dtype=bf16)
    u = causal_conv1d(x, torch.randn(D, W), torch.randn(D), "silu")
    y = selective_scan(u, torch.rand(1, T, D, dtype=bf16), -torch.rand(D, N), torch.randn(1, T, N, dtype=bf16),
                       torch.randn(1, T, N, dtype=bf16), torch.randn(D), torch.randn(1, T, D, dtype=bf16),
                       torch.randn(D), True)
    assert u.dtype == y.dtype == bf16
