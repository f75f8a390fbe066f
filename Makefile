# Two entry points for a fresh machine (Python 3.11, pip, make, git):
#   make run    install, then serve on the embedded defaults (mock upstream, SQLite)
#   make check  install, then ruff + mypy --strict + the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $(STAMP)

.PHONY: install run check lint typecheck test stress bench services playground
install: $(STAMP)

run: $(STAMP)
	$(BIN)/trio-stream serve

# The browser playground over h2 with TLS on https://127.0.0.1:8443/ (a local
# test certificate in .playground/; it prints how to open it in Chromium).
playground: $(STAMP)
	$(BIN)/python tools/playground.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

services:
	tools/install-services.sh

test: $(STAMP) services
	$(BIN)/pytest -q -p no:cacheprovider

check: lint typecheck test

# The stress suite at full size (1M tokens, 1K x 10K-character messages, 100K
# create/cancel cycles; the messages and 25K cycles again over h2c): about 12
# minutes on 2 cores, almost all of it the cycles.  One test:
# make stress ARGS='-k many_long_messages' (about 20 s per protocol).
# make check runs the same suite at CI size.
stress: $(STAMP)
	TRIO_STREAM_STRESS=full $(BIN)/pytest -q -p no:cacheprovider -m stress --durations=0 --durations-min=1 $(ARGS)

bench: $(STAMP)
	$(BIN)/python tools/bench.py
