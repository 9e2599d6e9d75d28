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

.PHONY: pretrained pretrained-classifier pretrained-vae pretrained-prior install test test-reliability soak test-slow test-all lint bench bench-serve run clean help image

help:
	@echo "make run       set up .venv; search, train the best config on Ray, evaluate (short budget)"
	@echo "make test      set up .venv and run the default test suite"
	@echo "make test-slow / test-all, lint, bench, bench-serve, clean"

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

# Chaos and security tests: replica/proxy/worker/driver kills under load, S3 uploads killed
# midway, 1,000+ malformed requests, token auth. Figures go to RELIABILITY.md.
test-reliability: install
	$(BIN)/python -m pytest tests/reliability -m "" $(PYTEST_ARGS)

# A 10-minute soak of the serving data plane (bench/soak.py; not in CI, whose
# `make test-reliability` runs a 60 s one): mixed traffic with 1 bad request in 20, a hot swap
# and a replica kill; no failed valid request, every bad one a 4xx, no RSS growth or descriptor
# leak over the second half. SOAK_S=... sets the length.
SOAK_S ?= 600
soak: install
	$(BIN)/python bench/soak.py --duration $(SOAK_S) --json runs/soak.json

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check mve mve_cli cluster serve_app tests bench

bench: install
	$(BIN)/python bench/bench_train.py $(DATA_ARG) --out BENCHMARKS.md

# Serving against the peers (needs Debian's wrk; Triton: bash bench/peers/setup_pytriton.sh).
# About 35 minutes per TTA mode on 2 cores; prints the markdown for BENCHMARKS.md.
bench-serve: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/bench_serve.py --tta flip_translate none --rounds 3 --duration 8

# The main job, on the embedded Ray, with the recommended recipe (`fast`): a short ASHA + Optuna
# search around it, then the best config trained longer with Ray Train, then evaluated;
# $(RUN_DIR)/model is a servable checkpoint with its REPORT.md (`mve serve --classifier
# $(RUN_DIR)/model`). On 2 quiet cores: about 7 minutes, 73.9% (n=1, reproduced exactly; README);
# up to about 10 minutes when the winner has a whitening layer. Grow the budgets with e.g.
# `make run SAMPLES=16 TUNE_EPOCHS=5 TUNE_LIMIT=20000 EPOCHS=10 LIMIT=` (LIMIT= is all 45,000).
SAMPLES ?= 4
TUNE_EPOCHS ?= 1
TUNE_LIMIT ?= 2500
EPOCHS ?= 4
LIMIT ?= 12500
run: install
	$(BIN)/mve tune classifier --preset fast --space cluster/spaces/classifier-fast.yaml \
		--set model.convs_per_group=2 --set model.tta=none \
		$(DATA_ARG) --samples $(SAMPLES) --max-epochs $(TUNE_EPOCHS) --limit $(TUNE_LIMIT) \
		--val-size 1000 --storage $(abspath $(RUN_DIR))/ray --out $(RUN_DIR)/tune
	$(BIN)/mve train classifier $(DATA_ARG) --config $(RUN_DIR)/tune/best.yaml \
		--epochs $(EPOCHS) $(if $(LIMIT),--limit $(LIMIT)) --set data.val_size=5000 \
		--cpus-per-worker 2 --storage $(abspath $(RUN_DIR))/ray --out $(RUN_DIR)/model
	$(BIN)/mve evaluate $(RUN_DIR)/model $(DATA_ARG) --out $(RUN_DIR)/evaluation
	@$(BIN)/python -m mve.runs $(RUN_DIR)/model \
		--title "make run: done (the evaluation's confusion matrix: $(RUN_DIR)/evaluation)"

# Re-create the shipped default checkpoints in models/ (what `mve serve` and `mve evaluate` use
# when given none). On a GPU each takes about a minute; on 2 CPU cores the classifier's 40
# epochs take hours (pass PRETRAINED_ARGS= there: bf16 autocast only pays on a GPU).
PRETRAINED_DEVICE ?= auto
PRETRAINED_ARGS ?= --set precision=bf16 --set channels_last=true
SHIPPED_FILES := model.safetensors mve.json REPORT.md config.yaml history.json *.png
pretrained: pretrained-classifier pretrained-vae pretrained-prior

pretrained-classifier: install
	$(BIN)/mve train classifier --preset best --local --device $(PRETRAINED_DEVICE) $(DATA_ARG) \
		$(PRETRAINED_ARGS) --out runs/pretrained/classifier
	rm -rf models/cifar10-classifier && mkdir -p models/cifar10-classifier
	cd runs/pretrained/classifier && cp $(SHIPPED_FILES) $(CURDIR)/models/cifar10-classifier/

# The VAE, then its GMM latent prior, then REPORT.md with PSNR/SSIM/bits-per-dim and Inception
# FID/KID on 10,000 samples (needs the `fid` extra: pip install -e '.[fid]').
pretrained-vae: install
	$(BIN)/mve train vae --preset sd --epochs 30 --local --device $(PRETRAINED_DEVICE) $(DATA_ARG) \
		$(PRETRAINED_ARGS) --out runs/pretrained/vae
	$(BIN)/mve vae fit-prior runs/pretrained/vae --in-place $(DATA_ARG) --components 10 \
		--limit 20000 --device $(PRETRAINED_DEVICE)
	$(BIN)/mve vae report runs/pretrained/vae --in-place $(DATA_ARG) --fid 10000 \
		--device $(PRETRAINED_DEVICE)
	rm -rf models/cifar10-vae && mkdir -p models/cifar10-vae
	cd runs/pretrained/vae && cp $(SHIPPED_FILES) $(CURDIR)/models/cifar10-vae/

# The VAE's latent diffusion prior (models/cifar10-vae/prior/, what its samplers use): the recipe
# of the shipped one, trained on 2 CPU cores in 16 minutes. A new VAE needs a new prior (a prior
# records its VAE's sha256). prior/REPORT.md and its pictures come from bench/prior_cpu.py.
PRIOR_ARGS ?= --preset small --epochs 8 --set lr=1e-3 --set warmup_steps=200
PRIOR_OUT ?= models/cifar10-vae/prior
pretrained-prior: install
	$(BIN)/mve train prior --vae models/cifar10-vae --local --device $(PRETRAINED_DEVICE) \
		$(DATA_ARG) $(PRIOR_ARGS) --out runs/pretrained/prior
	mkdir -p $(PRIOR_OUT)
	cd runs/pretrained/prior && cp model.safetensors mve.json history.json $(CURDIR)/$(PRIOR_OUT)/

clean:
	rm -rf runs .pytest_cache .ruff_cache

# -- container image (Dockerfile) -------------------------------------------------------------
# Versions come from k8s/base/versions.env, the one place they are pinned (RAY_VERSION,
# PYTHON_TAG). `make image` builds the CPU image mve:<ray>-<py> (kind/minikube: then
# `kind load docker-image mve:2.60.0-py311`); `make image RAY_VARIANT=gpu IMAGE=REGISTRY/mve`
# builds REGISTRY/mve:<ray>-<py>-gpu for k8s/overlays/gpu.
include k8s/base/versions.env
RAY_VARIANT ?= cpu
IMAGE ?= mve
IMAGE_SUFFIX := $(if $(filter gpu,$(RAY_VARIANT)),-gpu,)
IMAGE_TAG ?= $(RAY_VERSION)-$(PYTHON_TAG)$(IMAGE_SUFFIX)
TORCH_INDEX_URL ?= $(if $(filter gpu,$(RAY_VARIANT)),https://pypi.org/simple,https://download.pytorch.org/whl/cpu)

image:
	docker build \
		--build-arg RAY_VERSION=$(RAY_VERSION) \
		--build-arg PYTHON_TAG=$(PYTHON_TAG) \
		--build-arg RAY_IMAGE_SUFFIX=$(IMAGE_SUFFIX) \
		--build-arg TORCH_SPEC="$(TORCH_SPEC)" \
		--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) \
		-t $(IMAGE):$(IMAGE_TAG) .
