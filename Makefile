# The whole set-up on a fresh machine: `make train` and `make test` create .venv and install everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
ARGS ?=

.PHONY: install train test test-fast test-slow bench lint format study clean

# Re-installs only when pyproject.toml changed since the last install (or .venv is missing).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,sweep,tensorboard,weights]"
	touch $(STAMP)

install: $(STAMP)

train: install
	$(BIN)/python -m ranprm.train $(ARGS)

test: install
	WANDB_MODE=disabled $(BIN)/python -m pytest $(ARGS)

test-fast: install
	WANDB_MODE=disabled $(BIN)/python -m pytest -m "not slow" $(ARGS)

test-slow: install
	WANDB_MODE=disabled $(BIN)/python -m pytest -m slow $(ARGS)

bench: install
	$(BIN)/python -m ranprm.bench all $(ARGS)

study: install
	experiments/ran_vs_resnet/run.sh $(ARGS)

lint: install
	$(BIN)/ruff check ranprm tests experiments
	$(BIN)/ruff format --check ranprm tests experiments

format: install
	$(BIN)/ruff format ranprm tests experiments
	$(BIN)/ruff check --fix ranprm tests experiments

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
