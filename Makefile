# Every target does its own setup: a fresh clone needs only Python 3.10+ and pip.
#   make demo    offline main job: builds/caches a small base, federates 4 clients with comigs, local and fedavg
#   make test    the whole test suite (slow tests included), as CI runs it
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0; on a GPU machine: make install TORCH=torch
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_OUT ?= outputs/demo
STRATEGIES := comigs local fedavg

.PHONY: install demo test test-fast test-slow bench lint style quality clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@for strategy in $(STRATEGIES); do \
		echo "== $$strategy =="; \
		$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
			recipes/federated.py --config recipes/configs/demo.yaml strategy=$$strategy \
			output_dir=$(DEMO_OUT)/$$strategy || exit 1; \
	done
	$(BIN)/python recipes/compare.py $(foreach s,$(STRATEGIES),$(DEMO_OUT)/$(s))

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/benchmark.py --json outputs/benchmark.json

lint quality: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

style: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) outputs build *.egg-info
