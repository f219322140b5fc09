# BDR — block device replicator.  Every target installs what it needs and is idempotent.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
APT_PKGS := linux-image-6.12-amd64 linux-headers-6.12-amd64 qemu-system-x86 busybox-static nbd-client \
            dmsetup kmod cpio xz-utils zstd fio e2fsprogs util-linux iproute2 rsync build-essential debootstrap dkms
# The 6.12 kernel whose headers build the module (and whose image the VM lab boots).
KVER     = $(shell ls -d /lib/modules/6.12.*/build 2>/dev/null | sort -V | tail -n1 | cut -d/ -f4)
# The lab's second kernel: a Debian trixie chroot with the newest trixie-backports kernel and its compiler.
LAB_CHROOT := tests/vm/.lab/trixie

.PHONY: help deps apt venv lab-chroot build bytecode module package test unit integration vm lint demo bench fuzz clean install uninstall

# make install / make uninstall (PREFIX and DESTDIR as usual; WITH_DKMS=no skips the kernel module)
VERSION  := 0.1.0
PREFIX   ?= /usr/local
BINDIR   := $(PREFIX)/bin
LIBDIR   := $(PREFIX)/lib/bdr
DOCDIR   := $(PREFIX)/share/doc/bdr
UNITDIR  ?= $(PREFIX)/lib/systemd/system
DKMS_SRC := /usr/src/bdr-$(VERSION)
WITH_DKMS ?= auto
PROGRAMS := bdr bdr_client bdr_server
UNITS    := bdr-client@.service bdr-server@.service

help:
	@echo "make deps   install apt packages (6.12 kernel + headers, qemu, busybox) and the Python venv"
	@echo "make build  build the kernel module (against 6.12 headers) and the Python package"
	@echo "make test   lint + unit + integration + VM tests (real kernel in QEMU)"
	@echo "make lab-chroot   the VM lab's second kernel: a trixie chroot with the trixie-backports kernel ($(LAB_CHROOT))"
	@echo "make demo   replicate a real workload inside the VM lab and compare source and replica"
	@echo "make bench  print throughput figures with same-run baselines and ratios"
	@echo "make fuzz   fuzz the frame decoder and the server session for longer (FUZZ_EXAMPLES=$(FUZZ_EXAMPLES))"
	@echo "make lint   ruff + mypy"
	@echo "make install / make uninstall   daemons, admin tool, systemd units, docs, module via DKMS (PREFIX=$(PREFIX))"

deps: apt venv

apt: .stamps/apt
.stamps/apt: Makefile
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@mkdir -p .stamps && touch $@

venv: .stamps/venv
.stamps/venv: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@mkdir -p .stamps && touch $@

# Made once (about 2 minutes), then kept: remove the directory to make it again.
lab-chroot: apt
	tests/vm/mkchroot.sh $(LAB_CHROOT)

build: deps module bytecode

# The package byte-compiled in place: the VM lab's guests run it from a read-only view of this tree and, without
# these files, would compile every module again at each start of a daemon or of bdr (about 0.7 s a start there).
bytecode: venv
	$(PY) -m compileall -q src

# W=1, and a compiler warning fails the build (the module must build warning-free against the 6.12 headers)
module: apt
	@test -n "$(KVER)" || { echo "no 6.12 kernel headers found: run make deps" >&2; exit 1; }
	@mkdir -p .stamps
	$(MAKE) -C /lib/modules/$(KVER)/build M=$(CURDIR)/kernel W=1 modules 2>&1 | tee .stamps/module.log; \
	  test $${PIPESTATUS[0]} -eq 0
	@if grep -q 'warning:' .stamps/module.log; then echo "the bdr module build has warnings (see above)" >&2; exit 1; fi

lint: venv
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/mypy

# The VM tests run on two workers, one test module (and its guest) per worker at a time: a TCG guest keeps one
# to two host cores busy (1.6 on average in test_history), and parts of each VM test wait on timers.
VM_PYTEST := $(VENV)/bin/pytest -n 2 --dist loadfile

# The unit and integration tests on two workers too (each makes its own files, sockets and ports).
test: build lint lab-chroot
	$(VENV)/bin/pytest -n 2 tests/unit tests/integration
	$(VM_PYTEST) tests/vm

unit: venv
	$(VENV)/bin/pytest tests/unit

integration: venv
	$(VENV)/bin/pytest tests/integration

vm: build lab-chroot
	$(VM_PYTEST) tests/vm

demo: build
	$(PY) scripts/demo.py

bench: build
	$(PY) bench/run.py

# The same hypothesis tests the suite runs for a few seconds, with many more (non-derandomized) examples each.
FUZZ_EXAMPLES ?= 20000
fuzz: venv
	BDR_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest tests/unit/test_fuzz.py -m fuzz -q -p no:cacheprovider

clean:
	-$(MAKE) -C /lib/modules/$(KVER)/build M=$(CURDIR)/kernel clean
	rm -rf .stamps build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

install:
	@set -e; \
	python3 -m venv --clear "$(DESTDIR)$(LIBDIR)"; \
	"$(DESTDIR)$(LIBDIR)/bin/pip" install -q --disable-pip-version-check -c "$(CURDIR)/constraints.txt" "$(CURDIR)"; \
	install -d "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(DOCDIR)"; \
	for p in $(PROGRAMS); do ln -sfn "$(LIBDIR)/bin/$$p" "$(DESTDIR)$(BINDIR)/$$p"; done; \
	for u in $(UNITS); do \
	  sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' "packaging/systemd/$$u" > "$(DESTDIR)$(UNITDIR)/$$u"; \
	  chmod 644 "$(DESTDIR)$(UNITDIR)/$$u"; \
	done; \
	install -m 644 docs/*.md README.md "$(DESTDIR)$(DOCDIR)/"; \
	if [ "$(WITH_DKMS)" = yes ] || { [ "$(WITH_DKMS)" = auto ] && [ -z "$(DESTDIR)" ] && command -v dkms >/dev/null; }; then \
	  rm -rf "$(DKMS_SRC)"; mkdir -p "$(DKMS_SRC)"; \
	  cp kernel/dm-bdr.c kernel/bdr_uapi.h kernel/Kbuild kernel/dkms.conf "$(DKMS_SRC)/"; \
	  dkms add bdr/$(VERSION) && dkms build bdr/$(VERSION) && dkms install bdr/$(VERSION); \
	else echo "kernel module not installed (WITH_DKMS=$(WITH_DKMS)); build it with: make -C kernel"; fi; \
	echo "installed BDR $(VERSION) under $(DESTDIR)$(PREFIX)"

# Follows the manual's uninstallation steps, refusing to pull the module from under a live target.
uninstall:
	@set -e; \
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then \
	  systemctl stop 'bdr-client@*.service' 'bdr-server@*.service' 2>/dev/null || true; \
	fi; \
	if [ "$(WITH_DKMS)" != no ] && [ -z "$(DESTDIR)" ] && command -v dkms >/dev/null && dkms status bdr/$(VERSION) 2>/dev/null | grep -q .; then \
	  if [ -d /sys/module/bdr ] && dmsetup status --target bdr 2>/dev/null | grep -q bdr; then \
	    echo "bdr targets still exist (dmsetup status --target bdr): remove them with 'bdr remove NAME' first" >&2; exit 1; \
	  fi; \
	  if [ -d /sys/module/bdr ]; then rmmod bdr; fi; \
	  dkms remove bdr/$(VERSION) --all; rm -rf "$(DKMS_SRC)"; \
	fi; \
	for p in $(PROGRAMS); do rm -f "$(DESTDIR)$(BINDIR)/$$p"; done; \
	for u in $(UNITS); do rm -f "$(DESTDIR)$(UNITDIR)/$$u"; done; \
	rm -rf "$(DESTDIR)$(LIBDIR)" "$(DESTDIR)$(DOCDIR)"; \
	for d in "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(PREFIX)/lib/systemd" "$(DESTDIR)$(PREFIX)/share/doc" \
	         "$(DESTDIR)$(PREFIX)/share" "$(DESTDIR)$(PREFIX)/lib"; do rmdir "$$d" 2>/dev/null || true; done; \
	echo "uninstalled BDR $(VERSION) from $(DESTDIR)$(PREFIX)"
