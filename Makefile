# Every target creates .venv when it is missing (see the `$(STAMP)` rule).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip
# -n 2 uses both cores; the test suite is CPU-bound float64 math.
PYTEST_ARGS ?= -n 2

.PHONY: venv demo demo-digits test test-slow test-all bench bench-samplers bench-likelihood lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/torchdiffusion demo --out demo-output

# The image main job: a small U-Net on the bundled digits (about 7-12 minutes on 2 cores).
demo-digits: $(STAMP)
	$(BIN)/torchdiffusion train --config configs/digits.yaml --out runs/digits
	$(BIN)/torchdiffusion sample --checkpoint runs/digits --sampler dpmpp_2m --steps 20 --n 256 --out runs/digits/samples.npy
	$(BIN)/torchdiffusion evaluate --checkpoint runs/digits --data digits16 --n 1000 --steps 20

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m ''

COMPARE := $(VENV)/.compare-installed

$(COMPARE): $(STAMP)
	$(PIP) install --quiet -c constraints.txt -e '.[dev,compare]'
	$(PIP) install --quiet -c constraints.txt --no-deps k-diffusion
	touch $(COMPARE)

# Benchmarks run next to the libraries people use today (the `compare` extra).
bench: $(COMPARE)
	$(BIN)/python benchmarks/bench_2d.py

# Sample quality per NFE against exact Gaussian mixtures, next to diffusers and k-diffusion.
bench-samplers: $(COMPARE)
	$(BIN)/python benchmarks/bench_samplers.py --out bench-output

# Likelihood accuracy and time against closed-form densities, next to k-diffusion.
bench-likelihood: $(COMPARE)
	$(BIN)/python benchmarks/bench_likelihood.py --out bench-output

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache demo-output
