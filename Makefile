# The commands people type. Every target uses ./.venv, created by `make install` when missing.
VENV      ?= .venv
PY        := $(VENV)/bin/python
CAPSDIST  := $(VENV)/bin/capsdist
SAMPLE    ?= data/mnist_sample
DEMO_RUN  ?= runs/mnist_sample
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test lint format clean launch bench ensemble gpu-check gpu-wheels cluster-tools

install: $(VENV)/.installed

# torch is pinned in pyproject.toml (on these machines 2.13.0 is a local CPU wheel; unpinned,
# deepspeed's requirement pulls a multi-GB CUDA build). pip, not uv: uv ignores the local wheel.
# The fused routing kernel is built here rather than in the first run (for this CPU kind: other
# CPUs build their own on first use; without a C++ compiler it warns and routing uses torch ops).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c 'from capsdist.models.routing import cpu_kernels; cpu_kernels()'
	touch $@

$(SAMPLE)/meta.json: | install
	$(CAPSDIST) data mnist-sample --out $(SAMPLE)

demo: install $(SAMPLE)/meta.json
	$(CAPSDIST) train -c configs/mnist_sample.yaml data.root=$(SAMPLE) run.dir=$(DEMO_RUN) $(DEMO_ARGS)
	$(CAPSDIST) eval -c configs/mnist_sample.yaml data.root=$(SAMPLE) ckpt=$(DEMO_RUN)

test: install cluster-tools
	WANDB_MODE=disabled RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest $(PYTEST_ARGS)

# The cluster software the tests run for real (tests/slurm_cluster.py brings up a private SLURM
# in a temp dir): installed when missing if we are root with apt-get (Debian/Ubuntu CI),
# otherwise what to install is printed and the SLURM tests fail. Removing man-db's auto-update
# flag skips its trigger (5 minutes on a fresh machine).
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
cluster-tools:
	@PATH="$$PATH:/usr/sbin:/sbin"; \
	missing=$$(for tool in slurmctld slurmd sbatch munged mungekey; do \
	  command -v $$tool > /dev/null || echo $$tool; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
	  echo "cluster-tools: installing $(SLURM_PACKAGES)"; \
	  rm -f /var/lib/man-db/auto-update; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $(SLURM_PACKAGES) > /dev/null || exit 1; \
	else \
	  echo "cluster-tools: missing" $$missing "- the SLURM tests will fail. Install (Debian/Ubuntu," \
	    "as root): apt-get install --no-install-recommends $(SLURM_PACKAGES)" >&2; \
	fi

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The standard benchmark set (issue 6): MNIST and CIFAR-10 CapsNets, fp32 and bf16, each beside
# the plain PyTorch CapsNet (capsdist/models/plain.py); writes docs/bench.md and
# `## Performance` in docs/results.md. ~15 min on 2 CPU cores. BENCH_ARGS e.g. "--steps 20" or "train.batch_size=128".
BENCH_OUT  ?= runs/bench
BENCH_ARGS ?= train.batch_size=64
bench: install
	mkdir -p $(BENCH_OUT)
	for cfg in mnist cifar10; do for prec in fp32 bf16; do \
	  WANDB_MODE=disabled $(PY) -m capsdist bench model --compare-plain -c configs/$$cfg.yaml \
	    ds.precision=$$prec $(BENCH_ARGS) > $(BENCH_OUT)/$$cfg-$$prec.log || exit 1; \
	  tail -n 1 $(BENCH_OUT)/$$cfg-$$prec.log > $(BENCH_OUT)/$$cfg-$$prec.json; \
	done; done
	$(PY) -m capsdist.bench.report $(BENCH_OUT)/mnist-fp32.json $(BENCH_OUT)/mnist-bf16.json \
	  $(BENCH_OUT)/cifar10-fp32.json $(BENCH_OUT)/cifar10-bf16.json

# One command for a machine with one NVIDIA GPU (docs/gpu.md), <= 8 minutes, offline: the model
# tests on the GPU against the fp64 CPU reference, bench model (MNIST, CIFAR-10; fp32, bf16) and
# 4 minutes of Fashion-MNIST training + eval; gpu_check.json + gpu_check.md in $OUT (else
# runs/gpu_check). Uses the machine's python3 (CUDA PyTorch), not ./.venv, and the wheels of
# `make gpu-wheels`. GPU_CHECK_DRY=1: the same on the CPU, tiny (tests/integration/test_gpu_check_dry.py).
gpu-check:
	bash launch/gpu_check.sh

# What gpu-check needs on a GPU machine with no registry: wheels (python 3.12) of the packages a
# CUDA PyTorch image lacks, and Fashion-MNIST's IDX files, into .gpu_carry/ (~37 MB, ignored).
gpu-wheels: install
	$(PY) launch/gpu_wheels.py

# Start training with any launcher; settings from the environment (see launch/launch.sh and
# docs/launch.md), e.g. NPROC=2 CONFIG=configs/debug_cpu.yaml ARGS="data.root=..." make launch
launch: install
	bash launch/launch.sh

# The reference's CIFAR-10 ensemble: train ENSEMBLE_N members (seeds 0..N-1) one after another,
# then evaluate them and their ensemble in one pass (the Ray way: configs/sweeps/cifar10_ensemble.yaml).
# Tiny CPU version: make ensemble ENSEMBLE_CONFIG=configs/debug_cpu.yaml ENSEMBLE_DATA=$(SAMPLE) ENSEMBLE_N=3
ENSEMBLE_CONFIG ?= configs/cifar10.yaml
ENSEMBLE_DATA   ?= data/cifar10
ENSEMBLE_N      ?= 7
ENSEMBLE_RUNS   ?= runs/$(basename $(notdir $(ENSEMBLE_CONFIG)))_ensemble/member
ensemble: install
	for i in $$(seq 0 $$(($(ENSEMBLE_N) - 1))); do \
		$(CAPSDIST) train -c $(ENSEMBLE_CONFIG) data.root=$(ENSEMBLE_DATA) seed=$$i \
			run.dir=$(ENSEMBLE_RUNS)$$i || exit 1; \
	done
	$(CAPSDIST) ensemble-eval -c $(ENSEMBLE_CONFIG) data.root=$(ENSEMBLE_DATA) \
		--checkpoints '$(ENSEMBLE_RUNS){}' --num-trials $(ENSEMBLE_N)
