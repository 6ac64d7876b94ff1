#!/usr/bin/env bash
# Soak benchmark behind `make bench` (short scale) and `make soak` (long):
# the two long-run defects of the lean-cloud-path issue, measured.
#
#   scripts/bench-soak.sh
#
# 1. embedded: the zero-config default (embedded broker, the default archive
#    sink) under SOAK_RATE MQTT QoS 1 messages/s plus SOAK_RATE HTTP
#    requests/s for SOAK_SECS. RSS is sampled every SOAK_SAMPLE_SECS; the
#    figure is the growth after warm-up (the first third: the embedded
#    broker's bounded log fills in ~30 s at 1,000 small messages/s) in MB a
#    minute.
# 2. limit: HTTP only at 2 x SOAK_RATE requests/s with wal.max_bytes =
#    SOAK_LIMIT_BYTES, so the WAL sits at its size limit with a healthy sink.
#    The figure is the share of requests refused (want 0) and the RSS growth.
# 3. external: as 1, with MQTT ingest from a private Mosquitto (persistence
#    off) instead of the embedded broker.
# 4. cloud: as 1 for SOAK_CLOUD_SECS with an MQTT sink (defaults: MQTT
#    3.1.1, adaptive batching) to a private Mosquitto beside the archive:
#    receive -> sink-ack p99 of each sink (issue 12, target 3: <= 20 ms
#    file, <= 50 ms MQTT).
#
# Knobs (environment):
#   SOAK_SECS=120  SOAK_RATE=1000  SOAK_SAMPLE_SECS=5  SOAK_LIMIT_BYTES=20971520
#   SOAK_CLOUD_SECS=60  MOSQUITTO=/usr/sbin/mosquitto
#   SOAK_PARALLEL=0  1 = runs 1, 2 and 3 side by side (`make soak`: three
#                    hours become one; each run then shares the machine
#                    with the other two)
#   BENCH_KEEP=1   keep the scratch directory (data dirs, logs)
#
# Appends a section to bench/results/latest.md and writes
# bench/results/soak.json; the key figures also go to
# bench/results/figures.jsonl (`figure`, for scripts/bench-report.py).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BENCH_NAME=bench-soak
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

SECS="${SOAK_SECS:-120}"
RATE="${SOAK_RATE:-1000}"
SAMPLE="${SOAK_SAMPLE_SECS:-5}"
LIMIT="${SOAK_LIMIT_BYTES:-20971520}"
CLOUD_SECS="${SOAK_CLOUD_SECS:-60}"
PARALLEL="${SOAK_PARALLEL:-0}"
MOSQUITTO="${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}"

PIDS=()
WORK=""
cleanup() {
    local rc=$? p
    for p in "${PIDS[@]}"; do stop_pid "$p" 5; done
    remove_work "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

need_wrk
[ -x "$MOSQUITTO" ] || die "mosquitto not found (make test-deps installs it)"
for t in mosquitto_pub curl python3; do
    command -v "$t" >/dev/null || die "$t is required (make test-deps; apt-get install -y wrk)"
done
release_gateway
mkdir -p "$RESULTS_DIR"
WORK="$(mktemp -d "$TARGET_DIR/soak-tmp.XXXXXX")"
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^GATEWAY_' || true)

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# start_gw NAME HTTP_PORT [ENV=VALUE ...]: starts the gateway, waits for /readyz.
start_gw() {
    local name="$1" port="$2" i; shift 2
    mkdir -p "$WORK/$name"
    env GATEWAY_LOG_LEVEL=warn GATEWAY_INGEST_RATE_LIMIT_PER_DEVICE=0 "$@" \
        "$GATEWAY_BIN" run --data-dir "$WORK/$name/data" --http-addr "127.0.0.1:$port" \
        >"$WORK/$name/gateway.log" 2>&1 &
    GW=$!
    PIDS+=("$GW")
    for i in $(seq 1 150); do
        curl -sf -o /dev/null "http://127.0.0.1:$port/readyz" && return 0
        kill -0 "$GW" 2>/dev/null || break
        sleep 0.2
    done
    die "$name: the gateway did not become ready; log: $(tail -5 "$WORK/$name/gateway.log")"
}

# mqtt_load PORT RATE SECS: paced QoS 1 publishes from one client.
mqtt_load() {
    python3 - "$2" "$3" <<'PY' | mosquitto_pub -h 127.0.0.1 -p "$1" -q 1 -i soak-pub -t devices/soak-1/telemetry -l &
import sys, time
rate, secs = int(sys.argv[1]), float(sys.argv[2])
start, n, tick = time.monotonic(), 0, 0.01
while time.monotonic() - start < secs:
    due = int((time.monotonic() - start) * rate)
    while n < due:
        sys.stdout.write('{"msg_id":"s%d","ts":1764057600123,"metrics":{"t":21.5,"rh":40},"tags":{"fw":"1.4.2","site":"soak"}}\n' % n)
        n += 1
    sys.stdout.flush()
    time.sleep(tick)
PY
    PIDS+=("$!")
}

# http_load PORT RATE SECS OUT: paced requests, 20 connections.
http_load() {
    local conns=20 delay
    delay=$(( conns * 1000 / $2 ))
    wrk -t2 -c"$conns" -d"$3s" -s bench/ingest.lua "http://127.0.0.1:$1" -- "soak$RANDOM" 50 "$delay" >"$4" 2>&1 &
    PIDS+=("$!")
}

# sample PID SECS OUT: one "elapsed_s rss_kb" line every SAMPLE seconds.
sample() {
    local start=$SECONDS
    : >"$3"
    while (( SECONDS - start < $2 )); do
        echo "$(( SECONDS - start )) $(rss_kb "$1")" >>"$3"
        sleep "$SAMPLE"
    done
    echo "$(( SECONDS - start )) $(rss_kb "$1")" >>"$3"
}

# growth FILE: "warm_mb end_mb peak_mb slope_mb_per_min" after the first third.
growth() {
    awk -v secs="$SECS" '
        { t[NR] = $1; r[NR] = $2 / 1024; if ($2 / 1024 > peak) peak = $2 / 1024 }
        END {
            w = 1; while (w < NR && t[w] < secs / 3) w++
            # least-squares slope over the samples after warm-up
            n = 0; sx = sy = sxx = sxy = 0
            for (i = w; i <= NR; i++) { n++; sx += t[i]; sy += r[i]; sxx += t[i] * t[i]; sxy += t[i] * r[i] }
            slope = (n > 1 && n * sxx - sx * sx != 0) ? (n * sxy - sx * sy) / (n * sxx - sx * sx) * 60 : 0
            printf "%.1f %.1f %.1f %.2f\n", r[w], r[NR], peak, slope
        }' "$1"
}

# hist_quantile FILE METRIC SINK Q: the upper bound (le) of the bucket of
# METRIC{sink=SINK} that holds quantile Q, in ms.
hist_quantile() {
    awk -v m="${2}_bucket" -v sink="sink=\"$3\"" -v q="$4" '
        index($0, m "{") == 1 && index($0, sink) {
            match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5)
            n++; les[n] = le; cum[n] = $NF
        }
        END {
            total = cum[n]; if (total == 0) { print "-"; exit }
            for (i = 1; i <= n; i++) if (cum[i] >= q * total) { printf "%s", (les[i] == "+Inf" ? "inf" : les[i] * 1000); exit }
        }' "$1"
}

# Each RSS run writes its figures to $WORK/NAME/result.env (shell
# assignments, E_* / X_* / L_*), so that the runs can also go side by side
# (SOAK_PARALLEL=1); the report sources them.

# measure NAME PID HTTP_PORT: samples RSS for SECS, then scrapes /metrics and
# starts NAME's result.env with the RSS figures.
measure() {
    local warm end peak slope
    sample "$2" "$SECS" "$WORK/$1/rss.txt"
    sleep 2
    curl -s "http://127.0.0.1:$3/metrics" >"$WORK/$1/metrics.txt"
    read -r warm end peak slope < <(growth "$WORK/$1/rss.txt")
    local p; p="$(prefix "$1")"
    echo "${p}_WARM=$warm ${p}_END=$end ${p}_PEAK=$peak ${p}_SLOPE=$slope" >"$WORK/$1/result.env"
}
# prefix RUN: the variables of a run's figures start with it.
prefix() { case "$1" in embedded) echo E ;; external) echo X ;; limit) echo L ;; esac; }

# run_mixed NAME: RATE/s MQTT + RATE/s HTTP for SECS. NAME embedded: the
# zero-config default (embedded broker); NAME external: MQTT ingest from a
# private Mosquitto (persistence off), the rest default.
run_mixed() {
    local name="$1" hp mp pid broker=""
    hp="$(free_port)"; mp="$(free_port)"
    mkdir -p "$WORK/$name"
    if [ "$name" = external ]; then
        printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$mp" >"$WORK/$name/mosquitto.conf"
        "$MOSQUITTO" -c "$WORK/$name/mosquitto.conf" >"$WORK/$name/mosquitto.log" 2>&1 &
        broker=$!
        PIDS+=("$broker")
        for _ in $(seq 1 50); do port_in_use "$mp" && break; sleep 0.1; done
        port_in_use "$mp" || die "$name: mosquitto did not start: $(tail -3 "$WORK/$name/mosquitto.log")"
        log "$name: ${RATE}/s MQTT (Mosquitto on $mp) + ${RATE}/s HTTP for ${SECS}s (HTTP $hp)"
        start_gw "$name" "$hp" GATEWAY_MQTT_URL="mqtt://127.0.0.1:$mp"
    else
        log "$name: ${RATE}/s MQTT + ${RATE}/s HTTP for ${SECS}s (HTTP $hp, MQTT $mp)"
        start_gw "$name" "$hp" GATEWAY_MQTT_EMBEDDED_ADDR="127.0.0.1:$mp"
    fi
    pid=$GW
    mqtt_load "$mp" "$RATE" "$SECS"
    http_load "$hp" "$RATE" "$SECS" "$WORK/$name/wrk.txt"
    measure "$name" "$pid" "$hp"
    local p; p="$(prefix "$name")"
    cat >>"$WORK/$name/result.env" <<ENV
${p}_MQTT=$(metric_sum "$WORK/$name/metrics.txt" gateway_ingest_records_total source=mqtt outcome=accepted)
${p}_HTTP=$(metric_sum "$WORK/$name/metrics.txt" gateway_ingest_records_total source=http outcome=accepted)
${p}_P50=$(hist_quantile "$WORK/$name/metrics.txt" gateway_e2e_latency_seconds archive 0.5)
${p}_P99=$(hist_quantile "$WORK/$name/metrics.txt" gateway_e2e_latency_seconds archive 0.99)
ENV
    stop_pid "$pid" 10
    [ -z "$broker" ] || stop_pid "$broker" 5
}

# run_limit: HTTP only at 2 x RATE/s for SECS at wal.max_bytes = LIMIT.
run_limit() {
    local hp pid
    hp="$(free_port)"
    log "limit: ${LRATE}/s HTTP for ${SECS}s with wal.max_bytes=$LIMIT (HTTP $hp)"
    start_gw limit "$hp" GATEWAY_MQTT_URL=off GATEWAY_WAL_MAX_BYTES="$LIMIT"
    pid=$GW
    http_load "$hp" "$LRATE" "$SECS" "$WORK/limit/wrk.txt"
    measure limit "$pid" "$hp"
    cat >>"$WORK/limit/result.env" <<ENV
L_REQ=$(bench_field requests "$WORK/limit/wrk.txt") L_OK=$(bench_field status_202 "$WORK/limit/wrk.txt") L_OTHER=$(bench_field status_other "$WORK/limit/wrk.txt")
L_BYTES=$(metric_sum "$WORK/limit/metrics.txt" gateway_wal_bytes)
L_COMPACTED=$(metric_sum "$WORK/limit/metrics.txt" gateway_wal_compacted_records_total)
ENV
    stop_pid "$pid" 10
}
bench_field() { grep -o "$1=[0-9.]*" "$2" | head -1 | cut -d= -f2; }
LRATE=$(( RATE * 2 ))

if [ "$PARALLEL" = 1 ]; then
    log "the three RSS runs side by side (SOAK_PARALLEL=1): each sees the others' load"
    RUNS=()
    # A run's own processes stop with it, also when it fails.
    stop_own='for p in "${PIDS[@]}"; do stop_pid "$p" 5; done'
    (trap "$stop_own" EXIT; run_mixed embedded) & RUNS+=("$!")
    (trap "$stop_own" EXIT; run_mixed external) & RUNS+=("$!")
    (trap "$stop_own" EXIT; run_limit) & RUNS+=("$!")
    for p in "${RUNS[@]}"; do wait "$p" || die "a soak run failed"; done
else
    run_mixed embedded
    run_mixed external
    run_limit
fi
for run in embedded external limit; do . "$WORK/$run/result.env"; done
L_REFUSED_PCT=$(awk -v o="${L_OTHER:-0}" -v r="${L_REQ:-0}" 'BEGIN { printf "%.2f", (r > 0 ? 100 * o / r : 0) }')

# ------------------------------------------------------------------ with a cloud MQTT sink
# The embedded run's load and defaults, plus an MQTT sink to a private
# Mosquitto (persistence off): how long each sink takes to acknowledge.
HP="$(free_port)"; MP="$(free_port)"; CP="$(free_port)"
mkdir -p "$WORK/cloud"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$CP" >"$WORK/cloud/mosquitto.conf"
"$MOSQUITTO" -c "$WORK/cloud/mosquitto.conf" >"$WORK/cloud/mosquitto.log" 2>&1 &
CLOUD_BROKER=$!
PIDS+=("$CLOUD_BROKER")
for _ in $(seq 1 50); do port_in_use "$CP" && break; sleep 0.1; done
port_in_use "$CP" || die "cloud: mosquitto did not start: $(tail -3 "$WORK/cloud/mosquitto.log")"
cat >"$WORK/cloud/gateway.toml" <<TOML
[sinks.archive]
kind = "s3"
url = "file://$WORK/cloud/data/archive"

[sinks.cloud]
kind = "mqtt"
url = "mqtt://127.0.0.1:$CP"
topic_prefix = "cloud"
TOML
log "cloud: ${RATE}/s MQTT + ${RATE}/s HTTP for ${CLOUD_SECS}s, sinks archive + cloud (Mosquitto on $CP)"
start_gw cloud "$HP" GATEWAY_MQTT_EMBEDDED_ADDR="127.0.0.1:$MP" GATEWAY_CONFIG="$WORK/cloud/gateway.toml"
CLOUD_PID=$GW
mqtt_load "$MP" "$RATE" "$CLOUD_SECS"
http_load "$HP" "$RATE" "$CLOUD_SECS" "$WORK/cloud/wrk.txt"
sleep "$CLOUD_SECS"
sleep 2
curl -s "http://127.0.0.1:$HP/metrics" >"$WORK/cloud/metrics.txt"
C_ARCHIVE_OK=$(metric_sum "$WORK/cloud/metrics.txt" gateway_sink_records_total sink=archive outcome=ok)
C_CLOUD_OK=$(metric_sum "$WORK/cloud/metrics.txt" gateway_sink_records_total sink=cloud outcome=ok)
C_A_P50=$(hist_quantile "$WORK/cloud/metrics.txt" gateway_e2e_latency_seconds archive 0.5)
C_A_P99=$(hist_quantile "$WORK/cloud/metrics.txt" gateway_e2e_latency_seconds archive 0.99)
C_C_P50=$(hist_quantile "$WORK/cloud/metrics.txt" gateway_e2e_latency_seconds cloud 0.5)
C_C_P99=$(hist_quantile "$WORK/cloud/metrics.txt" gateway_e2e_latency_seconds cloud 0.99)
stop_pid "$CLOUD_PID" 10
stop_pid "$CLOUD_BROKER" 5

GIT_REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
cat >"$RESULTS_DIR/soak.json" <<JSON
{"commit":"$GIT_REV","secs":$SECS,"rate":$RATE,
 "embedded":{"rss_warm_mb":$E_WARM,"rss_end_mb":$E_END,"rss_peak_mb":$E_PEAK,"slope_mb_per_min":$E_SLOPE,"mqtt_accepted":$E_MQTT,"http_accepted":$E_HTTP,"e2e_p50_ms_le":"$E_P50","e2e_p99_ms_le":"$E_P99"},
 "external":{"rss_warm_mb":$X_WARM,"rss_end_mb":$X_END,"rss_peak_mb":$X_PEAK,"slope_mb_per_min":$X_SLOPE,"mqtt_accepted":$X_MQTT,"http_accepted":$X_HTTP},
 "parallel":$PARALLEL,
 "limit":{"max_bytes":$LIMIT,"requests":${L_REQ:-0},"accepted":${L_OK:-0},"refused":${L_OTHER:-0},"refused_pct":$L_REFUSED_PCT,"wal_bytes_end":$L_BYTES,"compacted":$L_COMPACTED,"rss_warm_mb":$L_WARM,"rss_end_mb":$L_END,"rss_peak_mb":$L_PEAK,"slope_mb_per_min":$L_SLOPE},
 "cloud":{"secs":$CLOUD_SECS,"archive_ok":${C_ARCHIVE_OK:-0},"cloud_ok":${C_CLOUD_OK:-0},"archive_p50_ms_le":"$C_A_P50","archive_p99_ms_le":"$C_A_P99","cloud_p50_ms_le":"$C_C_P50","cloud_p99_ms_le":"$C_C_P99"}}
JSON
# Figures. growth() works in MiB (KiB / 1024); the figures are in MB (10^6
# bytes), the unit of the issue's targets.
mib_to_mb() { awk -v m="$1" 'BEGIN { printf "%.1f", m * 1048576 / 1e6 }'; }
ms_or_empty() { case "$1" in ''|-|inf) ;; *) echo "$1" ;; esac; }
# rss_figures RUN PEAK SLOPE WARM END NOTE: the peak and growth figures of a run.
rss_figures() {
    figure "soak.$1.rss_peak" "$(mib_to_mb "$2")" MB \
        --target "peak RSS <= 60 MB (issue 12, target 2)" --check "value <= 60" --note "$6"
    figure "soak.$1.rss_growth" "$(mib_to_mb "$3")" MB/min \
        --target "RSS stays flat after warm-up (issue 12, target 2)" \
        --note "least-squares slope after the first third; RSS after warm-up $(mib_to_mb "$4") MB, at end $(mib_to_mb "$5") MB"
}
rss_figures embedded "$E_PEAK" "$E_SLOPE" "$E_WARM" "$E_END" \
    "default config (embedded broker), ${RATE}/s MQTT + ${RATE}/s HTTP for ${SECS}s, MIMALLOC_ARENA_EAGER_COMMIT=${MIMALLOC_ARENA_EAGER_COMMIT:-unset}"
rss_figures external "$X_PEAK" "$X_SLOPE" "$X_WARM" "$X_END" \
    "MQTT ingest from a private Mosquitto, ${RATE}/s MQTT + ${RATE}/s HTTP for ${SECS}s"
figure soak.embedded.e2e_p99 "$(ms_or_empty "$E_P99")" ms \
    --target "receive -> archive-ack p99 within its 1 s batch wait (<= 2048 ms bucket) at 1k records/s (issue 31: a local archive batches for seconds; issue 12 had <= 20 ms)" --check "value <= 2048" \
    --note "archive (file) sink, upper bound of the gateway_e2e_latency_seconds bucket; the load is ${RATE}/s MQTT + ${RATE}/s HTTP"
figure soak.embedded.e2e_p50 "$(ms_or_empty "$E_P50")" ms --note "as soak.embedded.e2e_p99"
figure soak.cloud.mqtt_e2e_p99 "$(ms_or_empty "$C_C_P99")" ms \
    --target "receive -> sink-ack p99 <= 50 ms for the MQTT sink at 1k records/s (issue 12, target 3)" --check "value <= 50" \
    --note "MQTT sink (3.1.1, defaults) to a local Mosquitto beside the archive, ${RATE}/s MQTT + ${RATE}/s HTTP for ${CLOUD_SECS}s; upper bound of the gateway_e2e_latency_seconds bucket; p50 <= $C_C_P50 ms"
figure soak.cloud.file_e2e_p99 "$(ms_or_empty "$C_A_P99")" ms \
    --target "receive -> archive-ack p99 within its 1 s batch wait (<= 2048 ms bucket) at 1k records/s (issue 31; issue 12 had <= 20 ms)" --check "value <= 2048" \
    --note "the archive of the same run, beside the MQTT sink; p50 <= $C_A_P50 ms"
figure soak.limit.refused_pct "$L_REFUSED_PCT" % \
    --target "a gateway at its WAL size limit with healthy sinks answers no 503 (issue 12)" --check "value <= 0" \
    --note "${LRATE}/s HTTP for ${SECS}s at wal.max_bytes = $LIMIT: ${L_OTHER:-0} of ${L_REQ:-0} requests refused"
rss_figures limit "$L_PEAK" "$L_SLOPE" "$L_WARM" "$L_END" "HTTP only, at the WAL size limit"

{
    echo
    echo "## Soak (${SECS}s, commit $GIT_REV)"
    echo
    [ "$PARALLEL" != 1 ] || { echo "The three RSS runs went side by side (SOAK_PARALLEL=1)."; echo; }
    echo "| run | load | RSS after warm-up | RSS at end | peak | growth after warm-up | refused |"
    echo "|---|---|---|---|---|---|---|"
    echo "| embedded broker (default config) | ${RATE}/s MQTT + ${RATE}/s HTTP ($E_MQTT + $E_HTTP accepted) | $E_WARM MB | $E_END MB | $E_PEAK MB | $E_SLOPE MB/min | - |"
    echo "| external broker (Mosquitto) | ${RATE}/s MQTT + ${RATE}/s HTTP ($X_MQTT + $X_HTTP accepted) | $X_WARM MB | $X_END MB | $X_PEAK MB | $X_SLOPE MB/min | - |"
    echo
    echo "Receive → archive-ack latency in the embedded run (histogram bucket bounds): p50 ≤ $E_P50 ms, p99 ≤ $E_P99 ms."
    echo
    echo "| run | load | RSS after warm-up | RSS at end | peak | growth after warm-up | refused |"
    echo "|---|---|---|---|---|---|---|"
    echo "| HTTP at wal.max_bytes = $LIMIT | ${LRATE}/s HTTP (${L_REQ:-0} requests, $L_COMPACTED compacted early) | $L_WARM MB | $L_END MB | $L_PEAK MB | $L_SLOPE MB/min | ${L_OTHER:-0} (${L_REFUSED_PCT} %) |"
    echo
    echo "With an MQTT sink (3.1.1, defaults) to a local Mosquitto beside the archive, same load for ${CLOUD_SECS}s"
    echo "(archive acked $C_ARCHIVE_OK, cloud $C_CLOUD_OK records): receive → ack p50 / p99 (bucket bounds):"
    echo "archive ≤ $C_A_P50 / ≤ $C_A_P99 ms, cloud (MQTT) ≤ $C_C_P50 / ≤ $C_C_P99 ms."
} | tee -a "$RESULTS"
