#!/usr/bin/env bash
# Routes, priorities and live-first benchmarks behind `make bench`
# (scripts/bench-routes.py says what is measured); appends to
# bench/results/latest.md.
#
# Knobs: BENCH_ROUTES_WRK_SECS (10), BENCH_ROUTES_ROUNDS (2),
# BENCH_ROUTES_BACKLOG (200000), BENCH_ROUTES_LIVE_RATE (50), BENCH_KEEP=1.
set -euo pipefail
BENCH_NAME=bench-routes
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
cd "$ROOT"
need_wrk
release_gateway
mkdir -p "$TARGET_DIR" "$RESULTS_DIR"
WORK="$(mktemp -d "$TARGET_DIR/bench-routes.XXXXXX")"
trap 'remove_work "$WORK"' EXIT
touch "$RESULTS"
python3 "$ROOT/scripts/bench-routes.py" "$GATEWAY_BIN" "$WORK" "$RESULTS"
sed -n '/^## Routes, priorities and live-first/,$p' "$RESULTS"
