# cryptopi: one command for each thing a user or CI does. See README.md.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv runs everything from the committed lock; it is installed once per user if missing.
UV := $(or $(shell command -v uv 2>/dev/null),$(HOME)/.local/bin/uv)
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := python3.11
# Trust the system certificate store (also what a TLS-inspecting proxy on the network needs).
export UV_SYSTEM_CERTS := 1
APP := $(UV) run --locked  # the appliance's lean runtime set: no TensorFlow, pandas or scikit-learn
DEV := $(UV) run --locked --extra dev --extra training
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
DATASETS := appliance/datasets
DEMO_PORT := 8765
# What `make demo` runs the appliance with: a store of its own, fed by the replay server on DEMO_PORT.
DEMO_ENV = CRYPTOPI_DATA_DIR=$${CRYPTOPI_DATA_DIR:-data/demo} \
	CRYPTOPI_COINBASE_WS_URL=ws://127.0.0.1:$(DEMO_PORT) CRYPTOPI_COINBASE_REST_URL=http://127.0.0.1:$(DEMO_PORT)

# $(call apt-need,PACKAGES): install, in one apt-get, the Debian packages that are not installed yet.
apt-need = missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		command -v apt-get >/dev/null || { echo "needs $$missing (installed with apt-get on Debian)"; exit 1; }; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; \
	fi

.PHONY: help setup run demo test test-deps lint fmt bench soak mutation models leave-one-out clean install smoke-arm64 release-local

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(UV):
	@command -v python3 >/dev/null || { echo "python3 is needed: apt-get install python3"; exit 1; }
	@python3 -m pip --version >/dev/null 2>&1 || $(SUDO) apt-get install -y python3-pip
	python3 -m pip install --user --break-system-packages uv 2>/dev/null || python3 -m pip install --user uv

setup: $(UV)  ## create .venv from the lock: runtime, dev tools and the training stack
	$(UV) sync --locked --extra dev --extra training --extra webhook

run: $(UV)  ## run the appliance against the live Coinbase feed: API on :8000 (CRYPTOPI_* settings)
	$(APP) python -m appliance up

# Settings and ports are checked before anything starts (a bad setting exits 2, a port in use 1, and a
# running demo is left alone); Ctrl-C stops the appliance and then the replay, quietly: the demo's status
# is the appliance's (130, a Ctrl-C that reached it first, counts as the normal end), never the replay's.
demo: $(UV)  ## offline: replay bundled real Coinbase candles into the appliance (API on :8000)
	@$(DEMO_ENV) $(APP) python -m appliance check-config --free-port $(DEMO_PORT)
	@echo "replaying bundled BTC-USD/ETH-USD candles on 127.0.0.1:$(DEMO_PORT); Ctrl-C stops both"
	@$(APP) python -m appliance replay --port $(DEMO_PORT) --speed 600 \
		--candles BTC-USD=$(DATASETS)/coinbase_BTC-USD_1h.csv --candles ETH-USD=$(DATASETS)/coinbase_ETH-USD_1h.csv \
		--from 2026-03-01 --start-at 2026-04-20 & replay=$$!; \
	trap 'st=$$?; kill $$replay 2>/dev/null; wait $$replay 2>/dev/null; [ $$st -eq 130 ] && st=0; exit $$st' EXIT; \
	trap 'exit 0' INT TERM; \
	until (exec 3<>/dev/tcp/127.0.0.1/$(DEMO_PORT)) 2>/dev/null; do \
		kill -0 $$replay 2>/dev/null || exit 1; sleep 0.2; \
	done; \
	$(DEMO_ENV) $(APP) python -m appliance up

lint: setup  ## ruff (lint + format check) and mypy --strict
	$(DEV) ruff check .
	$(DEV) ruff format --check .
	$(DEV) mypy

fmt: setup  ## apply ruff's fixes and formatting
	$(DEV) ruff check --fix .
	$(DEV) ruff format .

# Services the tests run for real (started by the tests themselves, on loopback); python3-venv makes the
# real Home Assistant's own virtualenv (tests/homeassistant.py builds it on first use); qemu-user-static
# runs the arm64 image's build and containers (tests/test_arm64.py).
TEST_PACKAGES := mosquitto chromium docker.io docker-registry debootstrap qemu-user-static shellcheck systemd \
	python3-venv

test-deps:  ## install the system packages the tests need (Debian)
	@$(call apt-need,$(TEST_PACKAGES))

test: lint test-deps  ## the whole test suite (what CI runs)
	$(DEV) pytest

bench: setup  ## measure throughput, memory, storage writes and CPU at a live rate (~70 min); JSON in bench-results/, summary on stdout
	@$(call apt-need,wrk mosquitto)
	$(DEV) python -m tests.bench $(BENCH_ARGS)

soak: setup  ## 30 days of real market at 2,160x with feed faults, MQTT and stream clients (~25 min; not in make test)
	@$(call apt-need,mosquitto)
	$(DEV) python -m tests.soak $(SOAK_ARGS)

mutation: setup  ## mutation score of the pure-logic modules' fast tests; survivors listed, JSON in mutation-results/
	$(DEV) python -m tests.mutation $(MUTATION_ARGS)

smoke-arm64: setup  ## build the image for arm64 under QEMU; it must predict as the amd64 one does (root)
	@$(call apt-need,qemu-user-static debootstrap docker.io)
	$(DEV) python -m tests.smoke_arm64

release-local: setup  ## CD's release program end to end here: replay as Coinbase, a local registry (root)
	@$(call apt-need,debootstrap docker.io docker-registry)
	$(DEV) python -m tests.release_local

install:  ## on the Pi, from /opt/cryptopi: host venv, /etc/cryptopi, systemd units (INSTALL_ARGS=--with-cloudflared)
	$(SUDO) systemd/install.sh $(INSTALL_ARGS)

# Each product's own set, then the pooled set ('*': any other product) trained on both.
POOLED = $(foreach p,BTC-USD ETH-USD,--pooled $(p)=$(DATASETS)/coinbase_$(p)_$(1).csv)
models: setup  ## retrain the shipped models (BTC-USD, ETH-USD and the pooled set; hourly and 15-minute)
	for granularity in 3600:1h 900:15m; do for product in BTC-USD ETH-USD; do \
		$(DEV) python -m training train --data $(DATASETS)/coinbase_$${product}_$${granularity#*:}.csv \
			--product $$product --granularity $${granularity%:*} --out appliance/models || exit; \
	done; done
	$(DEV) python -m training train $(call POOLED,1h) --granularity 3600 --out appliance/models
	$(DEV) python -m training train $(call POOLED,15m) --granularity 900 --out appliance/models

leave-one-out: setup  ## each product scored by a pooled set trained without it (JSON in bench-results/)
	@mkdir -p bench-results
	$(DEV) python -m training leave-one-out $(subst --pooled,--data,$(call POOLED,1h)) --granularity 3600 \
		--json bench-results/leave-one-out-3600.json
	$(DEV) python -m training leave-one-out $(subst --pooled,--data,$(call POOLED,15m)) --granularity 900 \
		--json bench-results/leave-one-out-900.json

clean:  ## remove the virtualenv, caches and local data
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache bench-results mutation-results data
