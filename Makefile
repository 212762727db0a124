# Two commands a newcomer needs: `make run` and `make test`. Both work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: run test venv system-deps migrate bench lint clean

venv: $(VENV)/.installed

# Reinstall whenever the dependency list changes.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The loopback "GPU host" in the tests is a real sshd; install it where it is missing.
system-deps:
	@if [ ! -x /usr/sbin/sshd ]; then \
	  echo "installing openssh-server (tests run a loopback sshd)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q openssh-server >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q openssh-server >/dev/null; }; \
	fi
	@test -x /usr/sbin/sshd || { echo "openssh-server could not be installed" >&2; exit 1; }

migrate: venv
	$(BIN)/gpusnap db upgrade

run: venv migrate
	$(BIN)/gpusnap serve --host $(HOST) --port $(PORT)

test: venv system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv
	$(BIN)/python bench/bench_dataplane.py

clean:
	rm -rf $(VENV) instance .pytest_cache
