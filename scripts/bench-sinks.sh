#!/usr/bin/env bash
# Sink drain benchmark behind `make bench`: a backlog of BENCH_DRAIN_RECORDS
# (default 1,000,000) records drained to each sink kind — a local directory,
# S3 (moto) and Kafka (tansu) — with the process RSS sampled during the drain.
# Appends a section to bench/results/latest.md.
set -euo pipefail
BENCH_NAME=bench-sinks
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RECORDS="${BENCH_DRAIN_RECORDS:-1000000}"
BATCH="${BENCH_DRAIN_BATCH:-5000}"
OUT="bench/results/latest.md"
TMP="$(mktemp -d "$ROOT/target/bench-sinks.XXXXXX")"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do stop_pid "$p" 5; done
  remove_work "$TMP"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do port_in_use "$1" && return 0; sleep 0.1; done; die "port $1 never opened"; }

cargo build --release -p gateway-actors --example drain_bench
BIN="$ROOT/target/release/examples/drain_bench"
mkdir -p bench/results
ROWS="$TMP/rows.md"

echo "==> file"
"$BIN" file --records "$RECORDS" --batch "$BATCH" --dir "$TMP/file" --out "$ROWS"
rm -rf "$TMP/file"

if [ -x .venv-test/bin/moto_server ]; then
  echo "==> s3 (moto)"
  P=$(free_port)
  .venv-test/bin/moto_server -H 127.0.0.1 -p "$P" >/dev/null 2>&1 & PIDS+=($!)
  wait_port "$P"
  curl -sf -X PUT "http://127.0.0.1:$P/bench" >/dev/null
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
    "$BIN" s3 --records "$RECORDS" --batch "$BATCH" --dir "$TMP/s3" --endpoint "http://127.0.0.1:$P" --bucket bench --out "$ROWS"
  rm -rf "$TMP/s3"
else
  echo "s3: skipped (run scripts/test-deps.sh for moto)" | tee -a "$ROWS"
fi

TANSU="$(command -v tansu || echo "$HOME/.cargo/bin/tansu")"
if [ -x "$TANSU" ]; then
  echo "==> kafka (tansu)"
  P=$(free_port)
  "$TANSU" broker --listener-url "tcp://127.0.0.1:$P" --advertised-listener-url "tcp://127.0.0.1:$P" \
    --storage-engine "memory://tansu/" >"$TMP/tansu.log" 2>&1 & PIDS+=($!)
  wait_port "$P"
  "$TANSU" topic create --broker "tcp://127.0.0.1:$P" --partitions 3 bench >/dev/null
  "$BIN" kafka --records "$RECORDS" --batch "$BATCH" --dir "$TMP/kafka" --brokers "127.0.0.1:$P" --topic bench --out "$ROWS"
  rm -rf "$TMP/kafka"
else
  echo "kafka: skipped (tansu not installed; scripts/test-deps.sh installs it)" | tee -a "$ROWS"
fi

{
  echo
  echo "### Sink drain ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores)"
  echo
  echo "A backlog of $RECORDS records (~300-byte canonical bodies) drained by one Dispatcher + SinkActor,"
  echo "wired as in the gateway; the target server runs on the same 2 cores."
  echo
  echo "| sink | records | batch | seconds | records/s | RSS MiB p10 / p50 / p90 / max |"
  echo "|---|---:|---:|---:|---:|---|"
  cat "$ROWS"
} | tee -a "$OUT"
