# virthotplug — developer and install targets.
#   make demo    set up this machine and show the main job on a real tiny VM
#   make demo-matrix   the same seed case on a real Debian 12 guest
#   make test    set up this machine and run lint, type checks and every test tier
#   make lint typecheck   lint and type checks in a plain virtualenv (no machine set-up)
#   make bench   benchmarks side by side (prints tables, writes bench/results/)
#   make soak    watch for SOAK_MINUTES (60) under churn and faults (bench/soak.py)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
BINDIR := $(PREFIX)/bin
MANDIR := $(PREFIX)/share/man
DATADIR := $(PREFIX)/share
PKGDATADIR := $(DATADIR)/virthotplug
UNITDIR ?= $(PREFIX)/lib/systemd/system
COMPLETIONDIR ?= $(DATADIR)/bash-completion/completions
HOOKDIR ?= $(SYSCONFDIR)/libvirt/hooks/qemu.d
CONFDIR ?= $(SYSCONFDIR)/virthotplug
INSTALL ?= install
# The interpreter the installed program runs with (its shebang); the system's by default.
INSTALL_PYTHON ?= /usr/bin/python3
RST2MAN ?= rst2man
MAN_PAGES := man/virthotplug.1 man/virthotplug.conf.5 man/virthotplug-hook.8
PYTEST_ARGS ?=
BENCH_ARGS ?=
SOAK_MINUTES ?= 60
SOAK_ARGS ?=

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

# The virtualenv alone: enough for lint and type checks, which touch nothing on the host.
venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check virthotplug tests bench hooks/qemu man/fixup.py
	$(VENV)/bin/ruff format --check virthotplug tests bench hooks/qemu man/fixup.py
	$(VENV)/bin/lint-imports --no-cache

typecheck: venv
	$(VENV)/bin/mypy

unit: host venv
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

functional: host venv
	$(VENV)/bin/pytest tests/functional $(PYTEST_ARGS)

e2e: host venv
	$(VENV)/bin/pytest tests/e2e $(PYTEST_ARGS)

# One pytest run, cheapest tier first: the unit tier's timing checks (the hook's 50 ms) never
# share the machine with the e2e tier's running guests.
test: host lint typecheck
	$(VENV)/bin/pytest tests/unit tests/functional tests/e2e $(PYTEST_ARGS)

# The Debian package on this host: build from a copy of the tree, lintian (errors fail),
# apt-get install, the installed-package tests with the system python3 (tests/package),
# remove and purge, nothing left. Root; CI runs it after "make test".
.PHONY: deb package-test
package-test: host
	bash tests/package/run.sh

# Only the package (and lintian's report) in build/package: apt install ./build/package/*.deb
deb:
	bash tests/package/build.sh build/package

demo: host venv
	$(PY) tests/lab/demo.py

# Stacks 2 and 3 (libvirt 11.3 + QEMU 10.0 in a Debian trixie root, libvirt 12.8 + QEMU 11.1
# in a forky root), the Debian 12/13/14 guest images and the service guest (Debian 12 +
# libvirtd, for the systemd unit's test), built in parallel or found in the lab cache (the e2e
# tests build them on first use otherwise; CI runs this first so that the build is a stage of
# its own).
.PHONY: lab-images demo-matrix
lab-images: host
	$(PYTHON) tests/lab/lab_images.py

demo-matrix: host venv
	$(PY) tests/lab/demo_matrix.py

bench: host venv
	$(PY) bench/run.py $(BENCH_ARGS)

# The soak draws its series with matplotlib, the bench extra (never the program's).
$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

.PHONY: soak
soak: host venv $(VENV)/.bench
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

# --- manual pages, install, uninstall ------------------------------------------------------
#   make install PREFIX=/usr SYSCONFDIR=/etc DESTDIR=/tmp/pkg     (PREFIX default /usr/local)
# needs rst2man (python3-docutils) to render the manual pages; no network, no pip.

.PHONY: man man-lint install uninstall clean-man

man: $(MAN_PAGES)

# man/fixup.py tidies rst2man's roff until "mandoc -T lint" has nothing to say.
$(MAN_PAGES): %: %.rst man/fixup.py
	$(RST2MAN) --halt=warning --no-generator --no-datestamp $< $@.tmp
	$(PYTHON) man/fixup.py < $@.tmp > $@
	rm -f $@.tmp

man-lint: man
	mandoc -T lint -W warning $(MAN_PAGES)

install: man
	$(INSTALL) -d -m 0755 "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(PKGDATADIR)"
	find virthotplug -name '*.py' -not -path '*/__pycache__/*' | sort | while read -r f; do \
		$(INSTALL) -D -m 0644 "$$f" "$(DESTDIR)$(PKGDATADIR)/$$f" || exit 1; done
	$(INSTALL_PYTHON) -m compileall -q -d "$(PKGDATADIR)/virthotplug" \
		"$(DESTDIR)$(PKGDATADIR)/virthotplug"
	sed -e 's|@PYTHON@|$(INSTALL_PYTHON)|' -e 's|@PKGDATADIR@|$(PKGDATADIR)|' \
		bin/virthotplug.in > "$(DESTDIR)$(BINDIR)/virthotplug.tmp"
	chmod 0755 "$(DESTDIR)$(BINDIR)/virthotplug.tmp"
	mv "$(DESTDIR)$(BINDIR)/virthotplug.tmp" "$(DESTDIR)$(BINDIR)/virthotplug"
	$(INSTALL) -D -m 0755 hooks/qemu "$(DESTDIR)$(PKGDATADIR)/hooks/qemu"
	$(INSTALL) -d -m 0755 "$(DESTDIR)$(HOOKDIR)"
	sed -e 's|^PYTHON=.*|PYTHON=$(INSTALL_PYTHON)|' \
		-e 's|^PROGRAM=.*|PROGRAM=$(PKGDATADIR)/hooks/qemu|' \
		hooks/virthotplug > "$(DESTDIR)$(HOOKDIR)/virthotplug.tmp"
	chmod 0755 "$(DESTDIR)$(HOOKDIR)/virthotplug.tmp"
	mv "$(DESTDIR)$(HOOKDIR)/virthotplug.tmp" "$(DESTDIR)$(HOOKDIR)/virthotplug"
	$(INSTALL) -D -m 0644 man/virthotplug.1 "$(DESTDIR)$(MANDIR)/man1/virthotplug.1"
	$(INSTALL) -D -m 0644 man/virthotplug.conf.5 "$(DESTDIR)$(MANDIR)/man5/virthotplug.conf.5"
	$(INSTALL) -D -m 0644 man/virthotplug-hook.8 "$(DESTDIR)$(MANDIR)/man8/virthotplug-hook.8"
	$(INSTALL) -d -m 0755 "$(DESTDIR)$(UNITDIR)"
	sed -e 's|@BINDIR@|$(BINDIR)|g' systemd/virthotplug.service.in \
		> "$(DESTDIR)$(UNITDIR)/virthotplug.service"
	chmod 0644 "$(DESTDIR)$(UNITDIR)/virthotplug.service"
	$(INSTALL) -D -m 0644 completion/virthotplug.bash "$(DESTDIR)$(COMPLETIONDIR)/virthotplug"
	$(INSTALL) -d -m 0755 "$(DESTDIR)$(CONFDIR)"
	@if [ -e "$(DESTDIR)$(CONFDIR)/virthotplug.conf" ]; then \
		echo "keeping the existing $(DESTDIR)$(CONFDIR)/virthotplug.conf"; \
	else \
		echo "$(INSTALL) -m 0600 conf/virthotplug.conf $(DESTDIR)$(CONFDIR)/virthotplug.conf"; \
		$(INSTALL) -m 0600 conf/virthotplug.conf "$(DESTDIR)$(CONFDIR)/virthotplug.conf"; \
	fi
	@echo "libvirtd reads its hooks at start: reload it (systemctl reload libvirtd or virtqemud)"

uninstall:
	rm -f "$(DESTDIR)$(BINDIR)/virthotplug" "$(DESTDIR)$(HOOKDIR)/virthotplug"
	rm -rf "$(DESTDIR)$(PKGDATADIR)"
	rm -f "$(DESTDIR)$(MANDIR)/man1/virthotplug.1" "$(DESTDIR)$(MANDIR)/man5/virthotplug.conf.5" \
		"$(DESTDIR)$(MANDIR)/man8/virthotplug-hook.8"
	rm -f "$(DESTDIR)$(UNITDIR)/virthotplug.service" "$(DESTDIR)$(COMPLETIONDIR)/virthotplug"
	rmdir "$(DESTDIR)$(HOOKDIR)" 2>/dev/null || true
	@if cmp -s conf/virthotplug.conf "$(DESTDIR)$(CONFDIR)/virthotplug.conf"; then \
		echo "rm -f $(DESTDIR)$(CONFDIR)/virthotplug.conf"; \
		rm -f "$(DESTDIR)$(CONFDIR)/virthotplug.conf"; \
		rmdir "$(DESTDIR)$(CONFDIR)" 2>/dev/null || true; \
	elif [ -e "$(DESTDIR)$(CONFDIR)/virthotplug.conf" ]; then \
		echo "keeping $(DESTDIR)$(CONFDIR)/virthotplug.conf (changed from the example)"; \
	fi

clean: clean-man

clean-man:
	rm -f $(MAN_PAGES) $(addsuffix .tmp,$(MAN_PAGES))
