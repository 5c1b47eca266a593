# The few commands the README names. Each target creates what it needs (virtual environment, npm packages)
# when it is missing or out of date, and does nothing again when it is there.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
NPM_STAMP := node_modules/.package-lock.json
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test lint synth bench docs clean browser

CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-stamp

setup: $(STAMP) $(NPM_STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[ml,dev]'
	@touch $@

# checkov in an environment of its own (its boto3 pin conflicts with the dev extra's), at the version pyproject's
# "checkov" extra pins.
$(CHECKOV_STAMP): pyproject.toml
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet "$$($(PYTHON) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["checkov"][0])')"
	@touch $@

$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

demo: setup
	$(BIN)/invmon demo $(ARGS)

lint: setup
	$(BIN)/ruff check .

# The review page's test drives the system's Chromium; Debian's packages install it (as root), and the test skips
# with its reason where none can be installed.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && apt-get install -y -q chromium chromium-driver; \
	  else echo "no Chromium here: the review page's browser test will skip (install chromium, chromium-driver)"; fi; }

test: lint browser $(CHECKOV_STAMP)
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
