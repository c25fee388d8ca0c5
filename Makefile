# Quickstart targets. Each makes its own virtualenv (.venv) on first use, so a fresh machine needs only Python >= 3.10.
# PyTorch: the CPU build by default; for a GPU, install the PyTorch build for your CUDA first, or pass TORCH=...
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

$(BIN)/wanalpha: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/wanalpha

# The main job on the embedded tiny base, no downloaded weights: the whole pipeline, prepare → … → generate.
demo: install
	$(BIN)/wanalpha demo --out demo_out

# The test command CI runs (.ci/run calls `make test`).
test: install
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache src/*.egg-info
