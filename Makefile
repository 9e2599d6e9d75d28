# mve: the two commands that matter are `make run` (set up + main job) and `make test`
# (set up + default test run). Everything installs into ./.venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the releases this project is tested with.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
SHARED_DATA := ../shared/data/cifar10-train-jpeg.tar.gz
# Data resolution: DATA=..., else $$MVE_DATA (read by mve itself), else the shared archive when
# present, else mve falls back to the official CIFAR-10 in ~/.cache/mve.
DATA ?= $(if $(MVE_DATA),,$(wildcard $(SHARED_DATA)))
DATA_ARG := $(if $(DATA),--data $(DATA))
RUN_DIR ?= runs/make-run
PYTEST_ARGS ?=

.PHONY: install test test-slow test-all lint bench run clean help

help:
	@echo "make run       set up .venv and train + evaluate the classifier (no Ray, short budget)"
	@echo "make test      set up .venv and run the default test suite"
	@echo "make test-slow / test-all, lint, bench, clean"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Unit tests (no Ray) run in a process of their own, so the no-Ray guard is meaningful; then
# the integration layers (real Ray, Serve, Prometheus, manifests).
test: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)
	$(BIN)/python -m pytest tests/integration tests/k8s $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check mve cluster serve_app tests bench

bench: install
	$(BIN)/python bench/bench_train.py $(DATA_ARG) --out BENCHMARKS.md

# The main job. Until Ray Train lands this trains the classifier in one process on a
# stratified 10,000-image subset for 3 epochs, then evaluates it on the 5,000-image
# validation split (about 5 minutes on 2 CPU cores).
run: install
	$(BIN)/mve train classifier --local $(DATA_ARG) --epochs 3 --limit 10000 --out $(RUN_DIR)
	$(BIN)/mve evaluate $(RUN_DIR) $(DATA_ARG) --json

clean:
	rm -rf runs .pytest_cache .ruff_cache
