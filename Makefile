# `make run` and `make test` each create .venv when it is missing, install torch (pinned, the CPU wheel) and the
# package with every extra the tests and the default run need, at the versions of constraints.txt, then run.
# pyproject.toml itself states ranges; the exact pins live here and in constraints.txt only.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_INSTALL := $(BIN)/pip install --quiet -c constraints.txt

.PHONY: run test docs bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(PIP_INSTALL) -e '.[all,test,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/invertnet train --config digits_dense

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --hypothesis-profile=ci

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(PIP_INSTALL) -e '.[all,bench]'
	$(BIN)/python benchmarks/iresnet_block.py
	$(BIN)/python benchmarks/digits_density.py
	$(BIN)/python benchmarks/toy2d.py
	$(BIN)/python benchmarks/mintnet_layer.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/memory_saving.py
	$(BIN)/python benchmarks/implicit_gradients.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site
