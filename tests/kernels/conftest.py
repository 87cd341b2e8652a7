"""Kernel tests run the Triton code: on CUDA when present, else through Triton's interpreter.

The interpreter must be switched on before triton is imported, so these tests run as their own
pytest invocation (see the Makefile); here we set it if nothing imported triton yet and refuse
to run otherwise, rather than quietly comparing the reference with itself.
"""
import os
import sys

import pytest

os.environ["HYBRID_LM_POISON"] = "1"  # outputs start as NaN: an unwritten element fails the test

if not os.environ.get("TRITON_INTERPRET") and "triton" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("HYBRID_LM_BACKEND", "triton")


def pytest_collection_modifyitems(config, items):
    import torch

    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("HYBRID_LM_BACKEND") == "triton"
    if not torch.cuda.is_available() and not interpreted:
        raise pytest.UsageError("kernel tests need CUDA or TRITON_INTERPRET=1 HYBRID_LM_BACKEND=triton set "
                                "before triton is imported: run them as their own pytest invocation (make test)")
