# Two commands for a new user: `make run` and `make test`. Everything installs into ./.venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint bench fuzz install install-test services-packages clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet -e ".[test]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Embedded profile: SQLite under ./var, in-process bus, local-disk objects, SMS to var/sms.log.
run: install
	mkdir -p var
	HOST=$(HOST) PORT=$(PORT) DEMO_DATA=$${DEMO_DATA:-1} $(BIN)/python -m app run

# Redis comes from Debian; PostgreSQL's server binaries and Chromium (the browser call client) too. Installed
# only when missing.
services-packages:
	@if ! command -v redis-server >/dev/null || ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 \
	    || ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server postgresql chromium \
	      >/dev/null; \
	  else echo "need redis-server, postgresql and chromium: sudo apt-get install -y redis-server postgresql chromium"; \
	    exit 1; fi; \
	fi

lint: install-test
	$(BIN)/ruff check app tests bench migrations
	$(BIN)/mypy

# The whole suite on real PostgreSQL, Redis and SeaweedFS, then the embedded profile's run.
# pytest exits 5 when it collected nothing; any non-zero status fails the target.
test: install-test services-packages lint
	$(BIN)/python -m tests.harness $(BIN)/python -m pytest -q -p no:cacheprovider
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The long fuzz: 50 generated requests per operation, mode and role, on both profiles (make test runs 2).
fuzz: install-test services-packages
	FUZZ_EXAMPLES=50 $(BIN)/python -m tests.harness $(BIN)/python -m pytest -q -p no:cacheprovider tests/fuzz
	FUZZ_EXAMPLES=50 $(BIN)/python -m pytest -q -p no:cacheprovider tests/fuzz

bench: install-test services-packages
	$(BIN)/python -m tests.harness $(BIN)/python -m bench.accounts
	$(BIN)/python -m tests.harness $(BIN)/python -m bench.scheduling
	$(BIN)/python -m tests.harness $(BIN)/python -m bench.chat
	$(BIN)/python -m tests.harness $(BIN)/python -m bench.chat_writer
	$(BIN)/python -m tests.harness $(BIN)/python -m bench.notifications
	$(BIN)/python -m tests.harness $(BIN)/python -m bench.documents
	$(BIN)/python -m tests.harness $(BIN)/python -m bench.audit
	$(BIN)/python -m tests.harness $(BIN)/python -m bench.reads
	$(BIN)/python -m bench.sfu

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache
