#!/usr/bin/env bash
# The status page's cost behind `make bench` (issue 34, item 7): HTTP ingest
# throughput with the page open and polling in headless Chromium against the
# same run without it, and idle RSS after a minute of polling
# (scripts/status-cost.py, run with the test virtualenv's Selenium).
# Writes bench/results/status-cost.md and appends it to latest.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN_DIR="${BIN_DIR:-${CARGO_TARGET_DIR:-target}/${BENCH_PROFILE:-dist}}"
out=bench/results/status-cost.md
.venv-test/bin/python scripts/status-cost.py --bin "$BIN_DIR/gateway" \
  --runs "${BENCH_STATUS_RUNS:-3}" --duration "${BENCH_STATUS_DURATION:-10s}" --idle "${BENCH_IDLE_SECS:-60}" > "$out.tmp"
mv "$out.tmp" "$out"
{ echo; cat "$out"; } >> bench/results/latest.md
cat "$out"
