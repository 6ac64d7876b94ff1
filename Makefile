# iot-gateway — the two set-up commands are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run build test test-deps fmt lint bench clean-data help

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

run: ## build (release) and run the gateway with zero configuration on 127.0.0.1:8080
	$(CARGO) run --release --bin gateway -- run

build: ## build the release binary (target/release/gateway)
	$(CARGO) build --release --bin gateway

test-deps: ## install what the tests need (skips what is already installed)
	scripts/test-deps.sh

test: test-deps lint ## install test dependencies, check format and lints, run every test
	scripts/test.sh

fmt: ## format the code
	$(CARGO) fmt --all

lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: ## WAL, HTTP, MQTT and sink-drain benchmarks; results in bench/results/latest.md
	scripts/bench.sh
	scripts/bench-mqtt.sh
	scripts/bench-sinks.sh

clean-data: ## delete the local data dir of `make run`
	rm -rf ./data
