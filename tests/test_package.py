"""The package installs, imports and exposes its command line."""
import subprocess
import sys

import hybrid_lm
import hybrid_lm.kernels as K


def test_public_kernels_exported():
    for name in ("gmu", "causal_conv1d", "causal_conv1d_update", "selective_scan",
                 "selective_state_update", "interleaved_attention"):
        assert callable(getattr(K, name)), name
        assert getattr(K, name).__doc__, f"{name} has no docstring"


def test_cli_help_lists_bench_kernels():
    out = subprocess.run([sys.executable, "-m", "hybrid_lm", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in out.stdout
    out = subprocess.run([sys.executable, "-m", "hybrid_lm", "bench", "--help"], capture_output=True, text=True,
                         check=True)
    assert "kernels" in out.stdout


def test_version():
    out = subprocess.run([sys.executable, "-m", "hybrid_lm", "--version"], capture_output=True, text=True, check=True)
    assert hybrid_lm.__version__ in out.stdout


def test_bad_backend_is_a_clear_error(monkeypatch):
    import pytest
    import torch

    monkeypatch.setenv("HYBRID_LM_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="HYBRID_LM_BACKEND"):
        K.gmu(torch.randn(3), torch.randn(3))
