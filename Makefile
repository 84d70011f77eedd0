# natkit — everything a fresh Debian 12 machine (as root) needs, idempotently.
#   make demo   build a NAT lab and expose a LAN web server through its router with natkit
#   make test   lint (ruff, mypy --strict) and the whole test suite, lab tests included
#   make bench  benchmarks against the reference tools (on demand, not in CI)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEBS := iproute2 nftables conntrack miniupnpd-nftables miniupnpc natpmpc coturn stun-client python3-venv curl chromium chromium-driver fonts-liberation
BENCH_DEBS := openssh-server openssh-client socat wrk apache2-utils nginx-light iperf3
STAMP_DEBS := $(VENV)/.debs-installed
STAMP_PY := $(VENV)/.py-installed

.PHONY: demo test lint unit bench deps clean-labs

$(STAMP_DEBS): Makefile
	@missing=""; for p in $(DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP_PY): pyproject.toml $(STAMP_DEBS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	@touch $@

deps: $(STAMP_PY)

demo: deps
	$(VENV)/bin/natkit lab demo

lint: deps
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src
	$(VENV)/bin/mypy --strict src

# Every test that needs no root: all of tests/ but the lab's (namespaces, nftables, miniupnpd).
# tests/stun runs a real coturn on loopback (installed by deps), tests/relay and tests/p2p
# real relays and peers on loopback.
unit: deps
	$(VENV)/bin/pytest -q tests --ignore=tests/lab

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench: deps
	@missing=""; for p in $(BENCH_DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi
	$(PY) bench/run.py

# Remove the labs natkit's own runs left behind (namespaces outlive their processes): those
# named natkit or natkit-* (the CLI's and the demo's defaults) and $(LAB_PREFIX) or
# $(LAB_PREFIX)-* (the tests', after $$NATKIT_TEST_LAB). Other people's labs on a shared
# machine are left alone.
LAB_PREFIX ?= $(or $(NATKIT_TEST_LAB),nkt)
LAB_SUFFIXES := lan|dev|rtr|wan|isp|lan2|rtr2
clean-labs:
	@for lab in $$(ip netns list | awk '{print $$1}' | sed -nE 's/-($(LAB_SUFFIXES))$$//p' | sort -u \
	    | grep -E -- '^(natkit|$(LAB_PREFIX))(-|$$)'); do \
	  $(VENV)/bin/natkit lab down --name $$lab; done
