# Two commands for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv from pinned dependencies first; nothing needs installing by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel first, so nothing below can pull a CUDA build of torch.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -c requirements.lock -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The embedded default end to end: `dvc repro` of every stage under one MLflow parent run.
demo: setup
	$(BIN)/cascade repro

# The whole test suite (CI runs exactly this). Two xdist workers: the end-to-end DVC and KFP runs are
# mostly single-threaded process start-up, so they overlap well on 2 cores. One test per hand-out
# (--maxschedchunk 1) so tests/conftest.py's ordering decides which worker starts a slow test.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxschedchunk 1

clean:
	rm -rf artifacts metrics plots mlflow.db mlruns .dvc/tmp
