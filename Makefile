# The whole set-up on a fresh machine: `make train` and `make test` create .venv and install everything, at the
# versions in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
ARGS ?=
EXTRAS := dev,sweep,tensorboard,weights
# The exact versions installed (constraints.txt); pyproject.toml only has the ranges users' installs accept.
CONSTRAINTS := constraints.txt
LOCK_VENV := .lock-venv
# `make lock` keeps torch at this version unless told otherwise: make lock TORCH=2.14.0
TORCH ?= $(shell sed -n 's/^torch==\([^,]*\).*/\1/p' $(CONSTRAINTS))

.PHONY: install train test test-fast test-slow bench lint format study lock clean docs-images

# Re-installs only when pyproject.toml or constraints.txt changed since the last install (or .venv is missing).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

train: install
	$(BIN)/python -m ranprm.train $(ARGS)

# The suite runs in one pytest process per usable core (pytest-xdist), at most 8, each with torch at one thread
# (tests/conftest.py): two processes whose thread pools share the cores wait on each other at every op, and the suite
# ran several times slower that way. One process: make test TEST_WORKERS=0; one file: make test ARGS=tests/test_x.py
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; f = getattr(os, 'sched_getaffinity', None); print(min(8, len(f(0)) if f else os.cpu_count() or 1))")
PYTEST := WANDB_MODE=disabled $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

test: install
	$(PYTEST) $(ARGS)

test-fast: install
	$(PYTEST) -m "not slow" $(ARGS)

test-slow: install
	$(PYTEST) -m slow $(ARGS)

bench: install
	$(BIN)/python -m ranprm.bench all $(ARGS)

# The README's pictures from the current code: the default run's panel (trained into outputs/docs-images unless
# CKPT= names a checkpoint), written to docs/images/. ARGS go to ranprm.docs_images, e.g. a real-photo panel:
# ARGS="--photo-ckpt RUN/checkpoints/last.ckpt --photo-data data.root=... --photo-provenance FILE.provenance.json"
DOCS_RUN := outputs/docs-images
docs-images: install
ifeq ($(CKPT),)
	$(BIN)/python -m ranprm.train hydra.run.dir=$(DOCS_RUN) overwrite=true logger=csv print_config=false
	$(BIN)/python -m ranprm.docs_images --ckpt $(DOCS_RUN)/checkpoints/last.ckpt $(ARGS)
else
	$(BIN)/python -m ranprm.docs_images --ckpt $(CKPT) $(ARGS)
endif

# The attention-PRM study (experiments/attention_prm/README.md): runs the missing cells, then writes RESULTS.md.
#   make study ARGS="--budget-min 150"   |   make study ARGS=--report   |   make study ARGS=--list
study: install
	$(BIN)/python -m experiments.attention_prm $(ARGS)

lint: install
	$(BIN)/ruff check ranprm tests experiments
	$(BIN)/ruff format --check ranprm tests experiments

format: install
	$(BIN)/ruff format ranprm tests experiments
	$(BIN)/ruff check --fix ranprm tests experiments

# Re-resolve every dependency at the newest version pyproject.toml allows (torch at $(TORCH)) in a scratch venv, and
# write what got installed to constraints.txt (its comment header kept). Review the diff, run `make test`, commit.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet ".[$(EXTRAS)]" "torch==$(TORCH),!=$(TORCH)+cpu"
	grep '^#' $(CONSTRAINTS) > $(CONSTRAINTS).new
	$(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^ranprm' \
		| sed 's/^torch==$(TORCH)$$/torch==$(TORCH),!=$(TORCH)+cpu/' >> $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(LOCK_VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
