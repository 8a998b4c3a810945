# Sandrun: `make run` serves on 127.0.0.1:8443, `make test` runs the suite.
# Both install what they need on a fresh Debian 12 or 13 machine, as root.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# Debian's own python3: the venv must live outside any private home directory
# tree and match the interpreters the jail exposes from /usr.
PYTHON := /usr/bin/python3
VENV := .venv
APT_PACKAGES := bash gcc libcap-dev libseccomp2 python3-dev python3-venv
# Only for make test: the curl examples, and the web page in a real browser
# (Debian's chromium, unless a Chromium or Chrome is already there: see tests/test_page.py).
CHROMIUM_FOUND := $(shell PATH="$$PATH:/snap/bin" command -v chromium chromium-browser google-chrome google-chrome-stable)
# What jobs import from the host's /usr, for tests/test_data_stack.py (OpenBLAS: the threaded BLAS users get).
DATA_STACK_PACKAGES := python3-numpy python3-pandas python3-matplotlib python3-scipy python3-pil python3-sympy libopenblas0-pthread
TEST_APT_PACKAGES := curl g++ jq $(if $(CHROMIUM_FOUND)$(SANDRUN_TEST_CHROMIUM),,chromium) $(DATA_STACK_PACKAGES)
HTTP_USER := sandrun

## Setup -------------------------------------------------------------------------

.PHONY: setup
setup: $(VENV)/.installed  ## Install apt packages, the HTTP user and the venv

# $(call apt_install,PACKAGES): install those of the Debian packages that are missing.
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -q; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
endef

.apt.installed:
	$(call apt_install,$(APT_PACKAGES) $(if $(shell command -v node),,nodejs))
	touch $@

.test-apt.installed: Makefile
	$(call apt_install,$(TEST_APT_PACKAGES))
	touch $@

# nginx for the tests that go through the shipped site file: unpacked, not installed
# (installing the package would start a system nginx on port 80).
NGINX := build/nginx/usr/sbin/nginx
$(NGINX):
	mkdir -p build/nginx
	cd build/nginx && { apt-get download nginx 2>/dev/null || { apt-get update -q && apt-get download nginx; }; }
	dpkg-deb -x build/nginx/nginx_*.deb build/nginx

.PHONY: user
user:
	getent group $(HTTP_USER) >/dev/null || groupadd --system $(HTTP_USER)
	getent passwd $(HTTP_USER) >/dev/null || useradd --system --gid $(HTTP_USER) --no-create-home \
		--home-dir /nonexistent --shell /usr/sbin/nologin $(HTTP_USER)

$(VENV)/.installed: .apt.installed requirements.txt requirements-dev.txt requirements-mcp.txt | user
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

## Run and test --------------------------------------------------------------------

.PHONY: run
run: setup  ## Serve on 127.0.0.1:8443 (SANDRUN_* variables override settings)
	exec $(VENV)/bin/gunicorn -c gunicorn.conf.py sandrun:app

.PHONY: check
check: setup  ## Prove this host can jail jobs, as the server does at start
	$(VENV)/bin/python sandrun.py check

.PHONY: test
test: setup .test-apt.installed $(NGINX)  ## Run the whole suite against a real server and the real jail
	$(VENV)/bin/python -m pytest -p no:cacheprovider -W "ignore:'cgi' is deprecated:DeprecationWarning" tests/

.PHONY: lint
lint: setup  ## ruff (ruff.toml), compile every file, and validate the gunicorn config
	$(VENV)/bin/ruff check
	$(VENV)/bin/python -m py_compile sandrun.py sandrun_client.py sandrun_mcp.py gunicorn.conf.py bench/bench.py tests/*.py
	$(VENV)/bin/gunicorn --check-config -c gunicorn.conf.py sandrun:app

## Benchmark ---------------------------------------------------------------------

.bench-apt.installed:
	$(call apt_install,bubblewrap)
	touch $@

.PHONY: bench
bench: setup .bench-apt.installed $(NGINX)  ## Measure jail overhead, throughput, latency, memory and a cluster (bench/results/)
	$(VENV)/bin/python bench/bench.py

## Appliance image -------------------------------------------------------------
# mkosi 25 and the image's Python 3.13 run from a Debian 13 tools tree
# (build/tools, made once); qemu boots the disk under UEFI (OVMF).
# See image/ and README "Run the appliance".

IMAGE_APT_PACKAGES := debootstrap ovmf qemu-system-x86
IMAGE_DIR := build/image
IMAGE := $(IMAGE_DIR)/sandrun.raw
IMAGE_PORT ?= 8480
VERSION := $(shell sed -n 's/^VERSION = "\(.*\)"$$/\1/p' sandrun.py)
SOURCE_DATE_EPOCH := $(shell git log -1 --format=%ct 2>/dev/null || echo 0)

.image-apt.installed:
	$(call apt_install,$(IMAGE_APT_PACKAGES))
	touch $@

.PHONY: image
image: setup .image-apt.installed  ## Build the appliance disk image (build/image/sandrun.raw)
	rm -rf build/image-root
	mkdir -p build/image-root/opt/sandrun build/image-root/etc/nginx/sites-available build/image-root/usr/local/bin
	cp sandrun.py sandrun.html gunicorn.conf.py README.md build/image-root/opt/sandrun/
	cp image/nginx/sandrun.conf image/nginx/sandrun-cluster.conf build/image-root/etc/nginx/sites-available/
	cp image/nginx/sandrun-cluster-nodes build/image-root/usr/local/bin/
	# The pinned versions make test ran with, built by the image's own Python (Debian 13's,
	# in the tools tree): only what requirements.txt names, then proven to import.
	image/tools build/tools python3 -m pip install -q --root-user-action=ignore --no-deps --no-compile \
		--target build/image-root/opt/sandrun/lib -r requirements.txt
	image/tools build/tools env PYTHONPATH=build/image-root/opt/sandrun/lib:build/image-root/opt/sandrun \
		python3 -c 'import sandrun, cgi, gunicorn, prctl, pyseccomp, webob'
	image/tools build/tools mkosi --directory image --force \
		--extra-tree $(CURDIR)/build/image-root --output-dir $(CURDIR)/$(IMAGE_DIR) \
		--image-version $(VERSION) --source-date-epoch $(SOURCE_DATE_EPOCH) \
		--cache-dir $(CURDIR)/build/mkosi-cache build

.PHONY: image-boot
image-boot: .image-apt.installed  ## Boot the image under qemu; nginx on 127.0.0.1:8480 (IMAGE_PORT=), Ctrl-A X quits
	@test -e $(IMAGE) || { echo "no $(IMAGE): run make image first"; exit 1; }
	image/qemu $(IMAGE) $(IMAGE_PORT)

.PHONY: image-test
image-test: image  ## Build, boot, and run the smoke suites against the appliance, alone and as a node and a front
	$(VENV)/bin/python -m pytest -p no:cacheprovider -W "ignore:'cgi' is deprecated:DeprecationWarning" -v \
		tests/appliance_smoke.py tests/appliance_cluster.py

## Stock hosts -------------------------------------------------------------------
# Plain Debian 13 and 12 VMs (systemd, cgroup v2, no Sandrun unit) with this checkout
# in them: make run typed into root's login shell on the console. See tests/host/.
HOST_RELEASES ?= trixie bookworm

.PHONY: trixie-test
trixie-test: .image-apt.installed  ## make test in a Debian 13 chroot: its Python 3.13, node and Chromium, this kernel
	tests/host/build-vm build/host/trixie trixie
	tests/host/suite-in build/host/trixie/tree build/suite-trixie

.PHONY: host-test
host-test: setup .image-apt.installed  ## Boot stock Debian 13 and 12 VMs, make run in a login shell, test it
	for release in $(HOST_RELEASES); do \
		tests/host/build-vm build/host/$$release $$release; \
		SANDRUN_HOST_VM=build/host/$$release $(VENV)/bin/python -m pytest -p no:cacheprovider \
			-W "ignore:'cgi' is deprecated:DeprecationWarning" -v tests/host_smoke.py; \
	done

## Housekeeping ------------------------------------------------------------------

.PHONY: clean
clean:  ## Remove the venv, stamps and build/ (the image and its tools tree)
	rm -rf $(VENV) .apt.installed .test-apt.installed .image-apt.installed .bench-apt.installed build

.PHONY: help
help:  ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
