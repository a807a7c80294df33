# beamvision developer entry points. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lint format test demo docs docs-reference bench clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The suite runs on every core (at most 4 workers: each holds a TensorFlow process).
test: lint
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist worksteal

demo: $(STAMP)
	$(BIN)/beamvision demo --workdir demo-output

# The user guide as a static site in site/ (built strictly: a broken link or a missing page fails).
docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict --site-dir site

# docs/reference.md is generated from the commands' parsers; the suite fails when it is stale.
docs-reference: $(STAMP)
	$(BIN)/python tests/docs_reference.py

# Benchmarks are never part of `make test`: they time whole processes and need minutes.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/throughput.py --images 800
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/incremental.py
	$(BIN)/python benchmarks/archives.py
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/sizing.py
	$(BIN)/python benchmarks/resume.py

clean:
	rm -rf $(VENV) demo-output site .pytest_cache .ruff_cache *.egg-info
