# The few commands the README names. Each target creates what it needs (virtual environment, npm packages)
# when it is missing or out of date, and does nothing again when it is there.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
NPM_STAMP := node_modules/.package-lock.json
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test lint synth bench docs clean

setup: $(STAMP) $(NPM_STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[ml,dev]'
	@touch $@

$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

demo: setup
	$(BIN)/invmon demo $(ARGS)

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest $(ARGS)

synth: setup
	npx cdk synth --quiet $(ARGS)
	@echo "templates written to cdk.out/"

docs: setup
	$(BIN)/python -m infra.reference

bench: setup
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf cdk.out .pytest_cache .ruff_cache
