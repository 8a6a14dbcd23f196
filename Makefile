# Every target creates .venv when it is missing (see the `$(STAMP)` rule).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip
# -n 2 uses both cores; the test suite is CPU-bound float64 math.
PYTEST_ARGS ?= -n 2

.PHONY: venv demo demo-digits test test-portable test-slow test-all bench bench-samplers bench-likelihood bench-inverse \
	bench-few-step bench-latent lint format \
	clean lock

venv: $(STAMP)

# Every runtime and dev dependency is pinned in requirements.lock (and the `compare` extra's in
# requirements-compare.lock) to the versions the suite passed with; `make lock` refreshes both from
# pyproject.toml's ranges. torch is not in them: constraints.txt pins it to the CPU wheel of 2.13.0 that these
# machines provide, installed first (PyPI's own torch 2.13.0 would bring gigabytes of CUDA packages).
LOCK         := requirements.lock
COMPARE_LOCK := requirements-compare.lock

$(STAMP): pyproject.toml constraints.txt $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -r $(LOCK)
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/torchdiffusion demo --out demo-output --resume  # a second `make demo` reuses the trained run

# The image main job: a small U-Net on the bundled digits (about 7-12 minutes on 2 cores).
demo-digits: $(STAMP)
	$(BIN)/torchdiffusion train --config configs/digits.yaml --out runs/digits
	$(BIN)/torchdiffusion sample --checkpoint runs/digits --sampler dpmpp_2m --steps 20 --n 256 --out runs/digits/samples.npy
	$(BIN)/torchdiffusion evaluate --checkpoint runs/digits --data digits16 --n 1000 --steps 20

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite on baseline kernels, as on a CPU without AVX: PyTorch's default ATen kernels, numpy without its
# optional SIMD targets (those this CPU has: numpy refuses to disable its baseline) and, on x86-64, MKL's and
# OpenBLAS's SSE4.2 code paths. Sums and BLAS products then round in another order than in `make test`, so a
# tolerance copied from one machine's output, not derived from the conditioning, fails here.
ifeq ($(shell uname -m),x86_64)
BASELINE_BLAS := MKL_ENABLE_INSTRUCTIONS=SSE4_2 OPENBLAS_CORETYPE=Nehalem
endif

test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(BASELINE_BLAS) NPY_DISABLE_CPU_FEATURES="$$($(BIN)/python .ci/baseline_kernels.py)" \
	  sh -c '$(BIN)/python .ci/baseline_kernels.py --check && $(BIN)/python -m pytest $(PYTEST_ARGS)'

test-slow: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m ''

COMPARE := $(VENV)/.compare-installed

# k-diffusion, azula and deepinv go in with --no-deps: their packages require torchvision, which has no CPU build
# for the pinned torch here (PyPI's would replace torch with a CUDA build); what their code we run imports is in the
# compare extra (einops, torchmetrics, natsort for deepinv), and benchmarks/inverse_deepinv.py imports deepinv with
# a stub torchvision present only during the import.
$(COMPARE): $(STAMP) $(COMPARE_LOCK)
	$(PIP) install --quiet -c constraints.txt -r $(COMPARE_LOCK)
	$(PIP) install --quiet -c constraints.txt --no-deps k-diffusion==0.1.1.post1 azula==0.11.1 deepinv==0.5.0
	touch $(COMPARE)

# Benchmarks run next to the libraries people use today (the `compare` extra).
bench: $(COMPARE)
	$(BIN)/python benchmarks/bench_2d.py

# Sample quality per NFE against exact Gaussian mixtures, next to diffusers and k-diffusion (three mixtures, then the
# default on 50 random ones); then every sampler on
# trained models (2-D and digits, trained once into bench-output/models) against held-out data, with and without
# the data-box clip (TRAINED_ARGS=--no-digits skips the digits U-Net, ~10-30 minutes to train the first time).
bench-samplers: $(COMPARE)
	$(BIN)/python benchmarks/bench_samplers.py --out bench-output
	$(BIN)/python benchmarks/bench_family.py --out bench-output
	$(BIN)/python benchmarks/bench_trained.py --out bench-output $(TRAINED_ARGS)

# Posterior samplers against exact posteriors (Gaussian-mixture priors), next to azula, deepinv and diffusers'
# RePaint: SW2, weight error and residual per NFE, and the twisted diffusion sampler's cost to reach the floor
# (about 1.5 hours on 2 cores at the default n = 2000; INVERSE_ARGS="--n 1000" about half; --quick: minutes).
bench-inverse: $(COMPARE)
	$(BIN)/python benchmarks/bench_inverse.py --out bench-output $(INVERSE_ARGS)

# Likelihood accuracy and time against closed-form densities, next to k-diffusion.
bench-likelihood: $(COMPARE)
	$(BIN)/python benchmarks/bench_likelihood.py --out bench-output

# Few-step students (issue #13): progressive, consistency distillation and training, and reflow at 1, 2 and 4 NFE
# next to the teacher's best sampler at 5, 10 and 50 and the exact floor, on three mixtures and the digits (about
# 45 minutes on one core of a shared 2-core machine; the digits teacher is bench-samplers' bench-output/models/digits,
# trained once when missing). FEW_STEP_ARGS="--cases ring8 --methods cd-ict" reruns a part (finished students are
# reused); FEW_STEP_ARGS=--quick: a smoke run of every path in a few minutes, into bench-output/few_step/quick.
bench-few-step: $(STAMP)
	$(BIN)/python benchmarks/bench_few_step.py --out bench-output/few_step $(FEW_STEP_ARGS)

# Bigger images for the same cost (issue #14): a pixel U-Net, a latent model (autoencoder + U-Net on 4x4x4 latents)
# and a cascade (8x8 base + 8 -> 16 upsampler) on the 16x16 digits, each trained for the same wall time on 2 threads
# (LATENT_ARGS="--budget S", default 540 s each): FID against training time, samples/s and sampling memory; then the
# learned upsampler against zero-shot super-resolution with the posterior samplers (about 40 minutes on 2 quiet
# cores; runs are cached in bench-output/latent/runs and resumed). LATENT_ARGS=--quick: a smoke run in a few minutes,
# into bench-output/latent/quick.
bench-latent: $(STAMP)
	$(BIN)/python benchmarks/bench_latent.py --out bench-output/latent $(LATENT_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Refresh both locks to the newest releases within pyproject.toml's ranges (pip-compile from pip-tools; the
# compare lock is constrained by the main one, so the two agree), then run `make test` on them before committing.
# torch stays out (--unsafe-package) and a lock that names any nvidia-* or triton package is refused: that happens
# where pip sees only PyPI's CUDA build of torch, not the CPU wheel of constraints.txt.
PIP_TOOLS := pip-tools==7.6.2
LOCK_ARGS := --quiet --upgrade --strip-extras --constraint constraints.txt --unsafe-package torch \
	--no-emit-find-links --no-emit-index-url
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(PIP_TOOLS)
	$(BIN)/pip-compile $(LOCK_ARGS) --extra dev --output-file $(LOCK) pyproject.toml
	$(BIN)/pip-compile $(LOCK_ARGS) --extra dev --extra compare --constraint $(LOCK) --output-file $(COMPARE_LOCK) \
	  pyproject.toml
	! grep -Eil '^(nvidia|triton)' $(LOCK) $(COMPARE_LOCK)

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache demo-output
