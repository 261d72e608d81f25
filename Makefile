# The two commands of the README: `make run` (set up + default pipeline), `make test` (set up + tests).
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
# dvc.yaml's commands call `ferd`: put the venv first on PATH for everything make runs.
export PATH := $(BIN):$(PATH)

.PHONY: all setup data run report compare preset test lint bench

all: run

setup: $(VENV)/.ferd-installed

$(VENV)/.ferd-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Debian's Fashion-MNIST, installed when missing; the fetch-data stage (first in dvc.yaml) copies it
# into data/raw/fashion-mnist, a DVC output (other datasets: data.source or data.download, docs/scaling.md).
data:
	scripts/ensure-fashion-mnist.sh data/raw/fashion-mnist

run: setup data
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show
	$(BIN)/ferd report

report: setup
	$(BIN)/ferd report

# FERD vs its ablations and the baselines, 3 seeds each, as dvc experiments; table in reports/compare.md.
# JOBS=N runs N experiments at a time in DVC's experiment queue (docs/scaling.md); 1 = in the workspace.
JOBS ?= 1
compare: setup data
	$(BIN)/ferd compare --run --jobs $(JOBS)

# A paper setting from configs/ (make preset PRESET=cifar10-resnet18): writes params.yaml, runs the pipeline.
preset: setup
	@test -n "$(PRESET)" || { echo "error: name a preset: make preset PRESET=NAME (ferd preset --list)" >&2; exit 1; }
	$(BIN)/ferd preset $(PRESET)
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q

bench: setup data
	$(BIN)/python benchmarks/bench_stages.py
	$(BIN)/python benchmarks/bench_evaluate.py

lint: setup
	$(BIN)/ruff check ferd stages tests benchmarks
