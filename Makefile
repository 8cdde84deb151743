# virthotplug — developer and install targets.
#   make demo    set up this machine and show the main job on a real tiny VM
#   make test    set up this machine and run lint, type checks and every test tier
#   make bench   benchmarks side by side (prints tables, writes bench/results/)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
BINDIR := $(PREFIX)/bin
MANDIR := $(PREFIX)/share/man
PYTEST_ARGS ?=

.PHONY: all host venv lint typecheck unit functional e2e test demo bench clean

all: venv

# Debian packages, /dev/kvm permissions, virtlogd/libvirtd (idempotent; quick when done).
host:
	bash tests/lab/host-setup.sh

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: host $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check virthotplug tests bench hooks/qemu
	$(VENV)/bin/ruff format --check virthotplug tests bench

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

functional: venv
	$(VENV)/bin/pytest tests/functional $(PYTEST_ARGS)

e2e: venv
	$(VENV)/bin/pytest tests/e2e $(PYTEST_ARGS)

test: lint typecheck
	$(VENV)/bin/pytest tests $(PYTEST_ARGS)

demo: venv
	$(PY) tests/lab/demo.py

bench: venv
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
