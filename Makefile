# The README's two set-up commands: `make demo` and `make test`. Each creates .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# torch is pinned first so that pip does not pull the multi-GB CUDA stack on CPU machines; set
# TORCH_VERSION= (empty) to keep whatever torch pyproject.toml's range resolves to.
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.autoprune-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench-quick clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_VERSION)" ]; then $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/autoprune demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench-quick: $(STAMP)
	$(PY) benchmarks/allocators.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
