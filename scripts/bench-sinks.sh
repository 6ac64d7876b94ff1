#!/usr/bin/env bash
# Sink drain benchmark behind `make bench`: a backlog of BENCH_DRAIN_RECORDS
# (default 1,000,000) records drained to each sink kind — a local directory,
# S3 (moto), Kafka (tansu), an upstream MQTT broker (Mosquitto) and an HTTP
# API (a Python server that reads each body and answers 200) — with the
# process RSS sampled during the drain. The MQTT row has a ceiling measured
# beside it: one `mosquitto_pub -q 1` publishing as many records of the same
# size to the same broker.
# Appends a section to bench/results/latest.md; each drain rate (and the
# drain's peak RSS) also goes to bench/results/figures.jsonl (`figure`).
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

# drain_figure KIND [figure options...]: figures of the row drain_bench just
# appended to $ROWS (records/s, and the largest RSS sample).
drain_figure() {
  local kind="$1" row; shift
  row="$(tail -1 "$ROWS")"
  figure "drain.$kind" "$(awk -F'|' '{gsub(/ /, "", $6); print $6}' <<<"$row")" records/s \
    --note "a backlog of $RECORDS records, batch_max_records $BATCH, drained by one Dispatcher + SinkActor" "$@"
  figure "drain.$kind.rss_max" "$(awk -F'|' '{n = split($7, a, "/"); gsub(/ /, "", a[n]); print a[n]}' <<<"$row")" MiB \
    --note "largest VmRSS sample (every 100 ms) of the drain process"
}

wait_port() { for _ in $(seq 1 200); do port_in_use "$1" && return 0; sleep 0.1; done; die "port $1 never opened"; }

cargo_build --profile "$BENCH_PROFILE" -p gateway-actors --example drain_bench
BIN="$BIN_DIR/examples/drain_bench"
mkdir -p bench/results
ROWS="$TMP/rows.md"

echo "==> file"
"$BIN" file --records "$RECORDS" --batch "$BATCH" --dir "$TMP/file" --out "$ROWS"
drain_figure file --target "drain rates must not fall (issue 12, target 3)"
rm -rf "$TMP/file"

if [ -x .venv-test/bin/moto_server ]; then
  echo "==> s3 (moto)"
  P=$(free_port)
  .venv-test/bin/moto_server -H 127.0.0.1 -p "$P" >/dev/null 2>&1 & PIDS+=($!)
  wait_port "$P"
  curl -sf -X PUT "http://127.0.0.1:$P/bench" >/dev/null
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
    "$BIN" s3 --records "$RECORDS" --batch "$BATCH" --dir "$TMP/s3" --endpoint "http://127.0.0.1:$P" --bucket bench --out "$ROWS"
  drain_figure s3 --target "drain rates must not fall (issue 12, target 3)"
  rm -rf "$TMP/s3"
else
  echo "s3: skipped (run scripts/deps.sh test for moto)" | tee -a "$ROWS"
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
  drain_figure kafka --target "drain rates must not fall (issue 12, target 3)"
  rm -rf "$TMP/kafka"
else
  echo "kafka: skipped (tansu not installed; scripts/deps.sh test installs it)" | tee -a "$ROWS"
fi

MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
if [ -x "$MOSQUITTO" ] && command -v mosquitto_pub >/dev/null; then
  echo "==> mqtt (mosquitto)"
  P=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nsys_interval 1\n' "$P" >"$TMP/mosquitto.conf"
  "$MOSQUITTO" -c "$TMP/mosquitto.conf" >"$TMP/mosquitto.log" 2>&1 & PIDS+=($!)
  wait_port "$P"
  received() { timeout 5 mosquitto_sub -h 127.0.0.1 -p "$P" -t '$SYS/broker/publish/messages/received' -C 1 || echo 0; }
  # The ceiling: one mosquitto_pub at QoS 1 publishing records of the
  # drain's size with --repeat, counted as received by the broker ($SYS).
  # (`mosquitto_pub -l` is no ceiling: at end of input it disconnects with
  # most messages still queued — 82,513 of 1,000,000 reached the broker.)
  LINE="{\"v\":1,\"seq\":0,\"idempotency_key\":\"sensor-0:m\",\"device_id\":\"sensor-0\",\"pad\":\"$(printf 'x%.0s' $(seq 1 220))\"}"
  CEIL_N=$(( RECORDS < 200000 ? RECORDS : 200000 ))
  sleep 1.5; R0=$(received)
  T0=$(date +%s.%N)
  mosquitto_pub -h 127.0.0.1 -p "$P" -q 1 -t bench/ceiling -m "$LINE" --repeat "$CEIL_N" --repeat-delay 0
  T1=$(date +%s.%N)
  # $SYS counters are published every sys_interval (1 s), later on a busy
  # machine: read until the count covers the run (10 s at most).
  for _ in $(seq 1 10); do
    sleep 1; R1=$(received)
    [ "$(( R1 - R0 ))" -lt "$CEIL_N" ] || break
  done
  [ "$(( R1 - R0 ))" -ge "$CEIL_N" ] || die "the ceiling run lost messages: the broker received $(( R1 - R0 )) of $CEIL_N"
  CEIL=$(awk -v n="$CEIL_N" -v a="$T0" -v b="$T1" 'BEGIN { printf "%.0f", n / (b - a) }')
  "$BIN" mqtt --records "$RECORDS" --batch "$BATCH" --dir "$TMP/mqtt" --broker "mqtt://127.0.0.1:$P" --out "$ROWS"
  drain_figure mqtt --ceiling "one mosquitto_pub -q 1 --repeat to the same broker ($CEIL_N records)" "$CEIL" \
    --target "MQTT sink >= 40 % of a mosquitto_pub -q 1 publisher's rate (issue 12, target 1)" --check "ratio >= 0.40"
  RATE=$(tail -1 "$ROWS" | awk -F'|' '{gsub(/ /, "", $6); print $6}')
  echo "| mqtt ceiling: mosquitto_pub -q 1 --repeat | $CEIL_N | - | - | $CEIL | sink at $(awk -v r="$RATE" -v c="$CEIL" 'BEGIN { printf "%.1f", 100 * r / c }') % of it |" >>"$ROWS"
  rm -rf "$TMP/mqtt"
else
  echo "mqtt: skipped (mosquitto not installed; scripts/deps.sh test installs it)" | tee -a "$ROWS"
fi

echo "==> http (python http.server)"
P=$(free_port)
python3 - "$P" >"$TMP/http.log" 2>&1 <<'PY' & PIDS+=($!)
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
wait_port "$P"
"$BIN" http --records "$RECORDS" --batch "$BATCH" --dir "$TMP/http" --url "http://127.0.0.1:$P/ingest" --out "$ROWS"
drain_figure http --target "drain rates must not fall (issue 12, target 3)"
rm -rf "$TMP/http"

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
