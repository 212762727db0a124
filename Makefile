# Two commands a newcomer needs: `make run` and `make test`. Both work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5000
# Bounds for the apt-get steps of system-deps (seconds): a stuck mirror fails the setup, it does not hang it.
APT_TIMEOUT ?= 900

.PHONY: run setup test test-deps venv system-deps migrate bench lint format clean

# `make setup` (alias `venv`): the app alone, what `make run` needs. The test extras (pytest, schemathesis,
# SeaweedFS: hundreds of MB) are installed by `make test` only.
setup venv: $(VENV)/.installed-app

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall whenever the dependency list changes.
$(VENV)/.installed-app: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-app

test-deps: $(VENV)/.installed-test

# What the tests need from the system, installed where missing (idempotent; bounded by APT_TIMEOUT):
# - openssh-server: the loopback "GPU host" in the tests is a real sshd;
# - chromium (Debian's package) and a font: /api/docs is rendered in a real headless browser, offline.
# Anything that cannot be installed fails `make test` here, loudly, instead of skipping tests later.
SYSTEM_PACKAGES := /usr/sbin/sshd:openssh-server /usr/bin/chromium:chromium /usr/bin/zstd:zstd \
  /usr/share/fonts/truetype/liberation:fonts-liberation
system-deps:
	@SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); missing=""; \
	for entry in $(SYSTEM_PACKAGES); do \
	  [ -x "$${entry%%:*}" ] || missing="$$missing $${entry#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt-get, at most $(APT_TIMEOUT)s)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  timeout $(APT_TIMEOUT) $$SUDO apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || \
	  { timeout $(APT_TIMEOUT) $$SUDO apt-get update -q >/dev/null && \
	    timeout $(APT_TIMEOUT) $$SUDO apt-get install -y -q --no-install-recommends $$missing >/dev/null; }; \
	fi; \
	for entry in $(SYSTEM_PACKAGES); do \
	  [ -x "$${entry%%:*}" ] || { echo "$${entry#*:} could not be installed ($${entry%%:*} is missing)" >&2; exit 1; }; \
	done

migrate: setup
	$(BIN)/gpusnap db upgrade

run: setup migrate
	$(BIN)/gpusnap serve --host $(HOST) --port $(PORT)

test: test-deps system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Lint (ruff: pyflakes, pycodestyle, isort, bugbear, pyupgrade), the format check, and types (mypy on src/,
# with the settings in pyproject.toml). `.ci/run` runs it before the tests; `make format` fixes what it can.
lint: test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy src

format: test-deps
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: test-deps
	$(BIN)/python bench/bench_dataplane.py

clean:
	rm -rf $(VENV) instance .pytest_cache
