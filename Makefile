# The commands people type. Every target uses ./.venv, created by `make install` when missing.
VENV      ?= .venv
PY        := $(VENV)/bin/python
CAPSDIST  := $(VENV)/bin/capsdist
SAMPLE    ?= data/mnist_sample
DEMO_RUN  ?= runs/mnist_sample
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test lint format clean launch

install: $(VENV)/.installed

# torch is pinned in pyproject.toml (on these machines 2.13.0 is a local CPU wheel; unpinned,
# deepspeed's requirement pulls a multi-GB CUDA build). pip, not uv: uv ignores the local wheel.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(SAMPLE)/meta.json: | install
	$(CAPSDIST) data mnist-sample --out $(SAMPLE)

demo: install $(SAMPLE)/meta.json
	$(CAPSDIST) train -c configs/mnist_sample.yaml data.root=$(SAMPLE) run.dir=$(DEMO_RUN) $(DEMO_ARGS)
	$(CAPSDIST) eval -c configs/mnist_sample.yaml data.root=$(SAMPLE) ckpt=$(DEMO_RUN)

test: install
	WANDB_MODE=disabled RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Start training with any launcher; settings from the environment (see launch/launch.sh and
# docs/launch.md), e.g. NPROC=2 CONFIG=configs/debug_cpu.yaml ARGS="data.root=..." make launch
launch: install
	bash launch/launch.sh
