# Two commands for a new user: `make run` and `make test`. Everything installs into ./.venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint bench fuzz install install-test services-packages compile clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv

# Bytecode is compiled at install (and the project's own before each run): where PYTHONDONTWRITEBYTECODE is set,
# as on many build machines, Python would otherwise compile every module again in every process it starts
# (measured here: 8.5 s to import the app without, 3.6 s with).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet --compile-bytecode -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet --compile-bytecode -e ".[test]"
	touch $(VENV)/.installed $@

compile: install
	$(BIN)/python -m compileall -q -j 0 app tests bench migrations >/dev/null

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Embedded profile: SQLite under ./var, in-process bus, local-disk objects, SMS to var/sms.log.
run: install compile
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

# The whole suite twice at once: on real PostgreSQL, Redis and SeaweedFS (printed as it runs), and on the embedded
# profile (SQLite, in-process bus, local disk; its output follows when both are done). Neither shares a file or a
# port with the other, and the two cores each get one. pytest exits 5 when it collected nothing; any non-zero
# status of either run fails the target.
test: install-test services-packages lint compile
	@mkdir -p var; rm -f var/test-embedded.log; \
	$(BIN)/python -m pytest -q -p no:cacheprovider > var/test-embedded.log 2>&1 & embedded=$$!; \
	echo "== real profile (the embedded profile runs beside it, into var/test-embedded.log)"; \
	$(BIN)/python -m tests.harness $(BIN)/python -m pytest -q -p no:cacheprovider; real=$$?; \
	wait $$embedded; embedded=$$?; \
	echo "== embedded profile"; cat var/test-embedded.log; \
	echo "== real profile: exit $$real; embedded profile: exit $$embedded"; \
	test $$real = 0 && test $$embedded = 0

# The long fuzz: 50 generated requests per operation, mode and role, on both profiles (make test runs 2).
fuzz: install-test services-packages compile
	FUZZ_EXAMPLES=50 $(BIN)/python -m tests.harness $(BIN)/python -m pytest -q -p no:cacheprovider tests/fuzz
	FUZZ_EXAMPLES=50 $(BIN)/python -m pytest -q -p no:cacheprovider tests/fuzz

bench: install-test services-packages compile
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
