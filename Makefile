# iot-gateway — the two set-up commands are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run build deps test test-deps fmt lint bench dist deb soak chaos fleet-sim fuzz clean-data certs up down help

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

run: deps ## install the build dependencies, build (release) and run the gateway with zero configuration on 127.0.0.1:8080
	MIMALLOC_ARENA_EAGER_COMMIT=$${MIMALLOC_ARENA_EAGER_COMMIT:-0} $(CARGO) run --release --bin gateway -- run

build: deps ## build the release binary (target/release/gateway): a quick optimised build
	$(CARGO) build --release --bin gateway

dist: deps ## build the shipped binary (target/dist/gateway): fat LTO, one codegen unit, stripped
	$(CARGO) build --profile dist --bin gateway

deb: dist ## the Debian package of the dist binary: target/debian/gateway_*.deb
	$(CARGO) deb --no-build --profile dist

deps: ## install the build dependencies (skips what is already installed)
	scripts/deps.sh build

test-deps: ## install what the build and the tests need (skips what is already installed)
	scripts/deps.sh test

test: test-deps lint ## install test dependencies, check format and lints, run every test
	scripts/test.sh

fmt: ## format the code
	$(CARGO) fmt --all

lint: ## rustfmt check, clippy with warnings as errors, cargo deny (licenses, bans, sources)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) deny check licenses bans sources

# The profile measured: dist (what ships); `make bench BENCH_PROFILE=release` measures the quick build.
BENCH_PROFILE ?= dist
export BENCH_PROFILE
BENCH_SCRIPTS := bench bench-startup bench-mqtt bench-cost bench-sinks bench-routes bench-outage bench-soak bench-status bench-uplink
bench: test-deps ## WAL, HTTP, start-up, MQTT, cost per record (CPU, disk writes, fsyncs at 40 and 1k records/s), sink-drain, routes/live-first, an upstream outage, a 2-minute soak, the status page's cost and the uplink (bytes on the wire, drain rates, reduction, a 10-minute budget, a quota); results in bench/results/latest.md and latest.json
	$(CARGO) build --profile $(BENCH_PROFILE) -p gateway --bin gateway --bin loadgen
	$(CARGO) build --profile $(BENCH_PROFILE) -p gateway-actors --example wal_bench --example wal_steady --example drain_bench
# Its own command: an example brings the dev-dependencies (their features must not reach the gateway built above).
	$(CARGO) build --profile $(BENCH_PROFILE) -p gateway --example cost_floor
	scripts/bench-report.py --reset
	@failed=""; for s in $(BENCH_SCRIPTS); do \
		f=scripts/$$s.sh; [ -x $$f ] || f=scripts/$$s.py; \
		echo "==> $$f"; BENCH_SKIP_BUILD=1 $$f || failed="$$failed $$s"; \
	done; \
	scripts/bench-report.py --failed "$$failed"; \
	if [ -n "$$failed" ]; then echo "bench: failed:$$failed" >&2; exit 1; fi

chaos: test-deps ## the fault harness at full scale (crash loop, sink outages, broker restart, full disk, soak; hours): bench/results/chaos-latest.md
	scripts/chaos.sh --scale full

fleet-sim: test-deps ## 50 gateways on one fleet broker: rollouts in waves, a bad bundle, forged commands, kill -9 on probation, a broker restart; bench/results/fleet-latest.md
	$(CARGO) build -p gateway --bin gateway --bin loadgen
	scripts/fleet-sim.py --n 50

fuzz: ## each fuzz target for FUZZ_SECS (600) with libFuzzer; results in bench/results/fuzz-latest.md
	scripts/fuzz.sh

soak: ## the soak at full scale: 1 hour, the embedded-broker, external-broker and WAL-size-limit runs side by side
	SOAK_SECS=3600 SOAK_PARALLEL=1 scripts/bench-soak.sh

certs: ## development CA and certificates (+ a dev-1 device token) in certs/out, for `make up`
	certs/gen-dev-certs.sh certs/out gateway gateway-admin prometheus dev-1
	certs/dev-device-token.sh certs/out dev-1

up: certs ## build and start the stack in Docker: gateway, Mosquitto (mTLS, ACLs), Prometheus, Grafana, Tempo
	GIT_COMMIT=$$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown) \
		docker compose -f compose/compose.yml up -d --build

down: ## stop the stack (volumes are kept; `docker compose -f compose/compose.yml down -v` deletes them)
	docker compose -f compose/compose.yml down

clean-data: ## delete the local data dir of `make run`
	rm -rf ./data
