# consulate: set-up and everyday commands. Run as root on Debian bookworm.
#   make run    install what is missing, then run the agent in the foreground
#   make test   install what is missing (plus test tools), lint, run the whole suite
#   make demo   a self-contained demo in network namespaces
#   make fuzz   fuzz every parser that takes outside input (not part of make test)
#   make bench  every benchmark (bench/results/); make bench-tcp: the TCP proxy one only,
#               make bench-dns: the DNS responder against dnsmasq and unbound,
#               make bench-registrator: 100 containers started together -> registered
#               make bench-watchers: 10,000 long polls / event streams on one agent
#               make bench-udp: a UDP service through its VIP against the direct path
#               make bench-configurator: 1,000 templates x 100 services re-rendered
#               make bench-convergence: registry change -> route tables of 3 hosts
#               make bench-scheduler: placements/s, packing and spread at 1,000 nodes
#   make soak   the mesh under steady load and churn for 10 minutes: memory, fds, errors,
#               latency over time (bench/results/soak.md; not part of make test or make bench)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := .make
ARGS ?=
BENCH_ARGS ?=

# Debian packages the agent, the lab, the tests and the benchmarks use.
APT_PACKAGES := iptables iproute2 dnsutils busybox-static wget util-linux procps \
	libnetfilter-queue-dev conntrack libffi-dev build-essential python3-dev python3-venv \
	iperf3 wrk haproxy socat nginx-light etcd-server etcd-client docker.io zookeeper \
	chromium chromium-driver openssl

# Debian packages of the DNS benchmark alone, installed by its own stamp so that
# `make test` never waits for them. dnsmasq-base has no init script; unbound's
# package would start a resolver on port 53 of this machine, so the install runs
# under a policy-rc.d that forbids starting any service (kept if one was there).
BENCH_DNS_PACKAGES := dnsperf dnsmasq-base unbound

.PHONY: run test demo lint deps clean fuzz bench bench-tcp bench-splice bench-sockmap bench-dns bench-duplex bench-registrator bench-watchers bench-udp bench-configurator bench-scheduler bench-convergence soak

run: deps
	exec $(BIN)/consulate agent $(ARGS)

test: deps lint
	$(BIN)/pytest $(PYTEST_ARGS)

demo: deps
	$(BIN)/consulate demo

# Fuzzing of every parser that takes outside input (tests/fuzz, seeds in tests/fuzz/corpus);
# bounded by FUZZ_EXAMPLES per hypothesis target and FUZZ_SECONDS for the coverage-guided
# (atheris/libFuzzer) DNS target, e.g. make fuzz FUZZ_EXAMPLES=20000 FUZZ_SECONDS=600.
FUZZ_EXAMPLES ?= 2000
FUZZ_SECONDS ?= 60
fuzz: deps $(STAMP)/fuzz
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/pytest -m fuzz tests/fuzz -p no:cacheprovider

# Benchmarks are not tests: `make test` never runs them. Options go in BENCH_ARGS,
# e.g. make bench-tcp BENCH_ARGS="--variants direct,haproxy --reps 1".
bench: bench-tcp bench-splice bench-sockmap bench-dns bench-registrator bench-duplex bench-watchers bench-udp bench-configurator bench-scheduler bench-convergence

bench-tcp: deps $(STAMP)/bench
	$(BIN)/python -m bench.tcp $(BENCH_ARGS)

# Where splice(2) starts to beat recv/send in the engine (its mode thresholds).
bench-splice: deps $(STAMP)/bench
	$(BIN)/python -m bench.splice_crossover

# BPF sockmap (bench/sockmap_probe.c) against the engine's splice relay, on loopback.
bench-sockmap: deps $(STAMP)/bench
	$(BIN)/python -m bench.sockmap

# consulate's DNS responder against dnsmasq and unbound, same records, same run;
# e.g. make bench-dns BENCH_ARGS="--quick" (a smoke test) or BENCH_ARGS="--reps 5".
bench-dns: deps $(STAMP)/bench $(STAMP)/apt-bench-dns $(STAMP)/bench-dns-tools
	$(BIN)/python -m bench.dns $(BENCH_ARGS)

# 10,000 long polls / event streams on one agent: memory per watcher, who wakes on
# a write and how fast, against Consul-style blocking queries in the same run;
# e.g. make bench-watchers BENCH_ARGS="--quick" (a smoke test).
bench-watchers: deps $(STAMP)/bench $(STAMP)/bench-dns-tools
	$(BIN)/python -m bench.watchers $(BENCH_ARGS)

# The registrator against a real dockerd: N containers started at once -> all in the
# catalog; e.g. make bench-registrator BENCH_ARGS="--containers 20 --reps 1".
bench-registrator: deps $(STAMP)/bench
	$(BIN)/python -m bench.registrator $(BENCH_ARGS)

# duplex RPC against aiohttp JSON and raw msgpack over asyncio streams, unix and tcp;
# e.g. make bench-duplex BENCH_ARGS="--reps 1 --duration 1".
bench-duplex: deps $(STAMP)/bench
	$(BIN)/python -m bench.duplex $(BENCH_ARGS)

# UDP echo through a service's VIP (NFQUEUE first datagram + conntrack DNAT) against the
# direct path and per-datagram NFQUEUE; e.g. make bench-udp BENCH_ARGS="--reps 1".
bench-udp: deps $(STAMP)/bench
	$(BIN)/python -m bench.udp $(BENCH_ARGS)

# The configurator's render path: CPU seconds to re-render 1,000 templates over 100
# services, against plain jinja2 on the same data; e.g. BENCH_ARGS="--reps 1".
bench-configurator: deps $(STAMP)/bench
	$(BIN)/python -m bench.configurator $(BENCH_ARGS)

# Route convergence on 3 lab hosts: a registration through h2's agent -> every agent's
# route table, etcd cluster and --join layouts, against a raw etcd watch in the same
# run; e.g. make bench-convergence BENCH_ARGS="--samples 20 --layouts etcd".
bench-convergence: deps $(STAMP)/bench
	$(BIN)/python -m bench.convergence $(BENCH_ARGS)

# The scheduler with 1,000 simulated nodes in process: placements/s on one core against
# a plain Python loop, binpack against the offline FFD bound, spread skew against random;
# e.g. make bench-scheduler BENCH_ARGS="--quick" (a smoke test).
bench-scheduler: deps $(STAMP)/bench
	$(BIN)/python -m bench.scheduler $(BENCH_ARGS)

# Soak: 3 lab hosts on etcd, an agent each, for SOAK_SECONDS under steady load (connections
# by name through the proxy, DNS queries, a backend and registrations churning); reports
# every agent's RSS/fd growth, errors and p50/p99 over time; e.g. make soak SOAK_SECONDS=60.
SOAK_SECONDS ?= 600
soak: deps $(STAMP)/bench
	$(BIN)/python -m bench.soak --seconds $(SOAK_SECONDS) $(BENCH_ARGS)

# mypy cannot follow setuptools' package-dir mapping, so it checks the package
# through a tree of symlinks shaped like the installed one.
lint: deps
	$(BIN)/ruff check .
	@mkdir -p $(STAMP)/typecheck/consulate
	@for p in proxy dns native control; do ln -sfn ../../../$$p $(STAMP)/typecheck/consulate/$$p; done
	cd $(STAMP)/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p consulate

deps: $(STAMP)/apt $(STAMP)/venv

# apt runs only when a package is missing, so a set-up machine starts at once.
# Packages such as etcd-server, docker.io or unbound would start their system
# service on install (a resolver on port 53, a dockerd rewriting this namespace's
# iptables): the install runs under a policy-rc.d that forbids starting any
# (an existing policy-rc.d is kept). The tests start what they need themselves.
apt_install = missing=$$(for p in $(1); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing (no service started)"; \
		guard=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '\#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d; \
			guard=/usr/sbin/policy-rc.d; \
		fi; \
		trap '[ -z "$$guard" ] || rm -f "$$guard"' EXIT; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP)/apt: Makefile
	@$(call apt_install,$(APT_PACKAGES))
	@mkdir -p $(STAMP) && touch $@

$(STAMP)/apt-bench-dns: Makefile
	@$(call apt_install,$(BENCH_DNS_PACKAGES))
	@if ss -Hlun 'sport = :53' | grep -q .; then \
		echo "warning: something listens on UDP port 53 (ss -lunp 'sport = :53'); the DNS" \
		     "benchmark does not need it and uses its own ports"; fi
	@mkdir -p $(STAMP) && touch $@

$(STAMP)/bench-dns-tools: $(STAMP)/venv
	$(BIN)/pip install --quiet py-spy
	@mkdir -p $(STAMP) && touch $@

$(STAMP)/venv: pyproject.toml setup.py native/build.py native/relay.c $(STAMP)/apt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@mkdir -p $(STAMP) && touch $@

$(STAMP)/bench: $(STAMP)/venv
	$(BIN)/pip install --quiet -e '.[bench]'
	@mkdir -p $(STAMP) && touch $@

$(STAMP)/fuzz: $(STAMP)/venv
	$(BIN)/pip install --quiet -e '.[fuzz]'
	@mkdir -p $(STAMP) && touch $@

clean:
	rm -rf $(VENV) $(STAMP) build *.egg-info native/*.so
