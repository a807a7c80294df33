# beamvision developer entry points. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What is installed, one stamp per extra: the demo needs only '.[demo]'; everything else '.[test]',
# which holds the demo's packages too (so after it, the demo's stamp is current as well).
STAMP := $(VENV)/.installed-test
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: install lint format test demo docs docs-reference bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): setup.py | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): setup.py | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $(DEMO_STAMP)

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

demo: $(DEMO_STAMP)
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
	$(BIN)/python benchmarks/catalog.py
	$(BIN)/python benchmarks/archives.py
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/sizing.py
	$(BIN)/python benchmarks/resume.py
	$(BIN)/python benchmarks/small_data.py
	$(BIN)/python benchmarks/multilabel.py --seeds 2
	$(BIN)/python benchmarks/convert.py
	$(BIN)/python benchmarks/serve.py --engines tensorflow openvino

clean:
	rm -rf $(VENV) demo-output site .pytest_cache .ruff_cache *.egg-info
