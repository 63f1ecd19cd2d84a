# sfvideo: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch where no GPU is present (it lies on local disk here); a CUDA build otherwise.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo "torch>=2.5"; else echo "torch==2.13.0"; fi)
EXTRAS ?= dev
PYTEST_ARGS ?=
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: install browser test demo reproduce smoke lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

# Headless Chromium for the browser test of `sfvideo serve` (Debian's chromium + chromium-driver, about 35 s
# with apt-get update on a machine without them). Where it cannot be installed, say so loudly; the test then
# skips, except under CI where it fails.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver for the browser test (apt-get)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver >/dev/null; } || echo "WARNING: apt-get could not install chromium: the browser test of sfvideo serve will not run"; \
	else echo "WARNING: chromium/chromedriver are missing and cannot be installed here (needs root and apt-get): the browser test of sfvideo serve will not run"; fi

test: install browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The main job on the embedded toy world, on CPU: initialise the causal generator from the shipped teacher,
# run Self Forcing with DMD, generate sample videos and print metrics for generator and teacher.
demo: install
	$(VENV)/bin/sfvideo demo

# Table 2 and Figure 6 of the paper at toy scale: every paradigm at one budget, chunk- and frame-wise (<= 90 min on
# 2 CPU cores; docs/reproduction.md). Report, plots and JSON in lightning_logs/reproduce/.
reproduce: install
	$(VENV)/bin/sfvideo reproduce --out lightning_logs/reproduce

smoke: install
	$(VENV)/bin/sfvideo fit --config configs/toy/dmd.yaml --trainer.max_steps 2

lint: install
	$(VENV)/bin/ruff check src tests

bench: install
	$(VENV)/bin/sfvideo bench generate

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
