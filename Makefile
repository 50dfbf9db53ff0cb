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

.PHONY: install demo test test-compat test-serving lint bench bench-gpu clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# requirements/triton.txt: the Triton kernels' tests run under its interpreter on the CPU.
$(STAMP): pyproject.toml requirements/pinned.txt requirements/data.txt requirements/lm-eval.txt \
		requirements/triton.txt Makefile | $(PY)
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -r requirements/pinned.txt -r requirements/lm-eval.txt -r requirements/triton.txt
	$(PIP) install --no-deps -r requirements/data.txt
	$(PIP) install --no-deps -e .
	@touch $@

# The demo uses fewer tokens and levels than the commands' defaults to stay near 10 minutes on
# 2 cores: an 8,192-token profile, mlp routers trained on 4,096 tokens, a carved MoE (8-neuron
# experts, 12.5 % shared, activation split, lstsq router fitted on 4,096 tokens), and a sweep
# scored on 2,048 evaluation tokens (1,024 compared with dense) with thresholds calibrated and
# carved experts allocated on 2,048 tokens. Levels are the kept share of the FFN: experts at
# 50 / 25 %, thresholds at 25 / 40 / 50 / 65 % target sparsity (and TEAL and WINA also at 75 %),
# the best training-free method (SCAP centring with one global budget) at 50 / 65 %, dynamic k at
# tau 0.9 / 0.8. Raise them, e.g.
# make demo DEMO_EVAL_TOKENS=8192 DEMO_LEVELS=0.5,0.25,0.125.
DEMO_PROFILE_TOKENS ?= 8192
DEMO_ROUTER_TOKENS ?= 4096
DEMO_CARVE_TOKENS ?= 4096
DEMO_EVAL_TOKENS ?= 2048
DEMO_AGREEMENT_TOKENS ?= 1024
DEMO_CALIBRATION_TOKENS ?= 2048
DEMO_METHODS ?= dense,moe-oracle,moe-mlp,moe-dynk,moe-carved,moe-carved-oracle,teal,cats,chess,wina,topk,scap:budget=global
DEMO_LEVELS ?= 0.5,0.25
DEMO_SPARSIFY_LEVELS ?= 0.75,0.6,0.5,0.35
DEMO_TASKS ?= perplexity,agreement
DEMO_LEVEL_ARGS = --level moe-dynk=0.9,0.8 \
	$(foreach m,cats chess topk,--level $(m)=$(DEMO_SPARSIFY_LEVELS)) \
	$(foreach m,teal wina,--level $(m)=$(DEMO_SPARSIFY_LEVELS),0.25) \
	--level scap:budget=global=0.5,0.35
MOEFY := $(VENV)/bin/moefy

demo: $(STAMP)
	$(MOEFY) profile --model smollm2-135m --data bbc-news --tokens $(DEMO_PROFILE_TOKENS) \
		--coactivation --out $(RUNS)/profile --overwrite
	$(MOEFY) convert --model smollm2-135m --experts 64 --method coactivation \
		--profile $(RUNS)/profile --out $(RUNS)/moe --overwrite
	$(MOEFY) train-routers --model $(RUNS)/moe --data bbc-news --router mlp \
		--tokens $(DEMO_ROUTER_TOKENS) --eval-tokens 0 --out $(RUNS)/moe-routed --overwrite
	$(MOEFY) convert --model smollm2-135m --expert-size 8 --shared 0.125 --method activation \
		--profile $(RUNS)/profile --router lstsq --data bbc-news --tokens $(DEMO_CARVE_TOKENS) \
		--out $(RUNS)/carved --overwrite
	$(MOEFY) sweep --model smollm2-135m --data bbc-news --methods $(DEMO_METHODS) \
		--levels $(DEMO_LEVELS) $(DEMO_LEVEL_ARGS) --tokens $(DEMO_EVAL_TOKENS) \
		--agreement-tokens $(DEMO_AGREEMENT_TOKENS) --tasks $(DEMO_TASKS) \
		--calibration-tokens $(DEMO_CALIBRATION_TOKENS) --moe $(RUNS)/moe \
		--routed $(RUNS)/moe-routed --carved $(RUNS)/carved --profile $(RUNS)/profile \
		--out $(RUNS)/sweep
	@echo "demo results: $(RUNS)/profile (profile, plots), $(RUNS)/moe (moefied model), $(RUNS)/moe-routed (mlp routers, router_report.json), $(RUNS)/carved (carved MoE), $(RUNS)/sweep/report.html (open in a browser)"

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# Sparse kernels and sparse decoding against dense in one run (BENCH_ARGS=--quick for a short run),
# then decoding again through the compiled static-cache step (a few minutes of compiling).
BENCH_ARGS ?=
bench: $(STAMP)
	$(MOEFY) bench $(BENCH_ARGS) --out $(RUNS)/bench.json --overwrite
	$(MOEFY) bench --only decode --compile $(BENCH_ARGS) --out $(RUNS)/bench-compiled.json --overwrite
	$(PY) benchmarks/profile_overhead.py

# The Triton kernels against cuBLAS on a CUDA GPU, then decode of a random Llama-3-8B-shaped
# model under CUDA graphs (BENCH_GPU_ARGS=--quick for a short run).
BENCH_GPU_ARGS ?=
bench-gpu: $(STAMP)
	$(MOEFY) bench --device cuda $(BENCH_GPU_ARGS) --out $(RUNS)/bench-gpu.json --overwrite

# The test suite under the oldest versions it is checked with: torch 2.11 and transformers 5.17,
# what the GPU machines of benchmarks/gpu_session.sh run (CPU here; not part of `make test`).
COMPAT_VENV ?= .venv-compat
COMPAT_STAMP := $(COMPAT_VENV)/.moefy-installed
COMPAT_PINS := torch==2.11.0 transformers==5.17.0 tokenizers==0.23.2
$(COMPAT_STAMP): pyproject.toml requirements/pinned.txt requirements/data.txt Makefile
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip --disable-pip-version-check -q install $(COMPAT_PINS) \
		-r <(grep -v -E '^(transformers|tokenizers)==' requirements/pinned.txt) -r requirements/triton.txt
	$(COMPAT_VENV)/bin/python -m pip --disable-pip-version-check -q install --no-deps \
		-r requirements/data.txt
	$(COMPAT_VENV)/bin/python -m pip --disable-pip-version-check -q install --no-deps -e .
	@touch $@

test-compat: $(COMPAT_STAMP)
	$(COMPAT_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Serving checks (optional; CI does not run them): `moefy export` writes $(SERVING_MOE) (the demo's
# carved MoE, built when missing) as a Qwen2-MoE folder and a GGUF file; vLLM's CPU build and
# llama.cpp, each in its own venv (.venv-vllm, .venv-llamacpp, built once by
# serving/setup_venvs.sh), must reproduce greedy transformers on 5 prompts x 32 tokens, and are
# timed against dense SmolLM2. Results: $(SERVING_OUT)/vllm.json, llamacpp.json. See docs/serving.md.
SERVING_OUT ?= $(RUNS)/serving
SERVING_MOE ?= $(RUNS)/carved
SERVING_ENGINES ?= vllm llamacpp
SERVING_EXPORT_ARGS ?= --keep 0.25 --eval-tokens 0
test-serving: $(STAMP)
	SERVING_OUT=$(SERVING_OUT) SERVING_MOE=$(SERVING_MOE) SERVING_ENGINES="$(SERVING_ENGINES)" \
		SERVING_EXPORT_ARGS="$(SERVING_EXPORT_ARGS)" RUNS=$(RUNS) serving/run_checks.sh

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(RUNS)
