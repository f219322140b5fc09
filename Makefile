# BDR — block device replicator.  Every target installs what it needs and is idempotent.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
APT_PKGS := linux-image-6.12-amd64 linux-headers-6.12-amd64 qemu-system-x86 busybox-static \
            dmsetup kmod cpio xz-utils fio e2fsprogs util-linux iproute2 rsync build-essential
# The 6.12 kernel whose headers build the module (and whose image the VM lab boots).
KVER     = $(shell ls -d /lib/modules/6.12.*/build 2>/dev/null | sort -V | tail -n1 | cut -d/ -f4)

.PHONY: help deps apt venv build module package test unit integration vm lint demo bench fuzz clean

help:
	@echo "make deps   install apt packages (6.12 kernel + headers, qemu, busybox) and the Python venv"
	@echo "make build  build the kernel module (against 6.12 headers) and the Python package"
	@echo "make test   lint + unit + integration + VM tests (real kernel in QEMU)"
	@echo "make demo   replicate a real workload inside the VM lab and compare source and replica"
	@echo "make bench  print throughput figures with same-run baselines and ratios"
	@echo "make lint   ruff + mypy"

deps: apt venv

apt: .stamps/apt
.stamps/apt:
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@mkdir -p .stamps && touch $@

venv: .stamps/venv
.stamps/venv: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@mkdir -p .stamps && touch $@

build: deps module

module: apt
	@test -n "$(KVER)" || { echo "no 6.12 kernel headers found: run make deps" >&2; exit 1; }
	$(MAKE) -C /lib/modules/$(KVER)/build M=$(CURDIR)/kernel W=1 modules

lint: venv
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/mypy

test: build lint
	$(VENV)/bin/pytest tests

unit: venv
	$(VENV)/bin/pytest tests/unit

integration: venv
	$(VENV)/bin/pytest tests/integration

vm: build
	$(VENV)/bin/pytest tests/vm

demo: build
	$(PY) scripts/demo.py

bench: build
	$(PY) bench/run.py

clean:
	-$(MAKE) -C /lib/modules/$(KVER)/build M=$(CURDIR)/kernel clean
	rm -rf .stamps build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
