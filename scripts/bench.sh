#!/usr/bin/env bash
# Benchmark harness behind `make bench`.
#
#   scripts/bench.sh
#
# 1. Builds the release `gateway` binary and the `wal_bench` example once.
# 2. WAL bench: durable appends/s of the engine (1/10/100/1000 records per
#    commit) and of its writer thread under concurrent senders (group commit).
# 3. HTTP bench: starts the release gateway on a free loopback port with a
#    fresh data dir (default config: no rate limit, the default `archive`
#    sink), drives POST /ingest/{device} with wrk + bench/ingest.lua (unique
#    msg_id per request), then checks wrk's 202 count against the gateway's
#    gateway_ingest_records_total{source="http",outcome="accepted"}, and
#    samples the gateway's CPU (per thread) and RSS. The ceiling beside it:
#    nginx on a free loopback port answering 202 to every POST, driven by the
#    same wrk command (the gateway's rate is reported as a share of it).
# 4. Writes everything to bench/results/latest.md and prints it; each key
#    figure also goes to bench/results/figures.jsonl (`figure`, bench-lib.sh)
#    for scripts/bench-report.py (bench/results/latest.json).
#
# Knobs (environment):
#   BENCH_WAL_SECS=3        time bound of each WAL run
#   BENCH_WAL_MAX=500000    record bound of each WAL run
#   BENCH_WRK_THREADS=2  BENCH_WRK_CONNS=256  BENCH_WRK_DURATION=15s
#   BENCH_DEVICES=50        distinct device ids in the HTTP load
#   BENCH_LOG_LEVEL=info    the gateway's log level (info = its default; logs go to a file)
#   BENCH_NGINX=0           skip the nginx ceiling run (default: run it; nginx-light is installed if missing)
#   BENCH_CARGO_LOCK=FILE   hold this lock file (flock) while cargo builds
#   BENCH_KEEP=1            keep the temporary directory (data dirs, logs)
#   CARGO_TARGET_DIR        as for cargo
#
# Temporary data lives under the cargo target dir (a real disk), never /tmp,
# which may be tmpfs where fsync is free.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WAL_SECS="${BENCH_WAL_SECS:-3}"
WAL_MAX="${BENCH_WAL_MAX:-500000}"
WRK_THREADS="${BENCH_WRK_THREADS:-2}"
WRK_CONNS="${BENCH_WRK_CONNS:-256}"
WRK_DURATION="${BENCH_WRK_DURATION:-15s}"
DEVICES="${BENCH_DEVICES:-50}"
LOG_LEVEL="${BENCH_LOG_LEVEL:-info}"

BENCH_NAME=bench
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

GW_PID=""
NGINX_PID=""
WORK=""
cleanup() {
    local rc=$?
    stop_pid "$GW_PID" 10
    stop_pid "$NGINX_PID" 5
    remove_work "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ tools
command -v cargo >/dev/null || die "cargo not found"
command -v curl >/dev/null || die "curl not found"
need_wrk
NGINX=""
[ "${BENCH_NGINX:-1}" = 0 ] || need_nginx
[ "${BENCH_NGINX:-1}" = 0 ] || [ -n "$NGINX" ] || log "WARNING: nginx is not installed and could not be: no HTTP ceiling"

# ------------------------------------------------------------------ build
release_gateway
cargo_build --profile "$BENCH_PROFILE" -p gateway-actors --example wal_bench --example wal_steady
WAL_BENCH_BIN="$BIN_DIR/examples/wal_bench"
WAL_STEADY_BIN="$BIN_DIR/examples/wal_steady"
[ -x "$WAL_BENCH_BIN" ] || die "$WAL_BENCH_BIN was not built"
[ -x "$WAL_STEADY_BIN" ] || die "$WAL_STEADY_BIN was not built"

# ------------------------------------------------------------------ work dir
mkdir -p "$TARGET_DIR" "$RESULTS_DIR"
WORK="$(mktemp -d "$TARGET_DIR/bench-tmp.XXXXXX")"
FS_TYPE="$(stat -f -c %T "$WORK" 2>/dev/null || echo unknown)"
FS_DESC="$(df -PT "$WORK" 2>/dev/null | awk 'NR==2 {print $2 " (" $1 " on " $7 ")"}')"
[ -n "$FS_DESC" ] || FS_DESC="$FS_TYPE"
case "$FS_TYPE $FS_DESC" in
    *tmpfs*|*ramfs*) log "WARNING: $WORK is on $FS_DESC (memory): fsync costs nothing there, numbers are not durable-disk numbers" ;;
esac
OUT="$WORK/results.md"

CPU_MODEL="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || true)"
MEM_TOTAL="$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo 2>/dev/null || true)"
GIT_REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain -- src actors Cargo.toml Cargo.lock 2>/dev/null)" ]; then GIT_REV="$GIT_REV (+ uncommitted changes)"; fi

{
    echo "# Gateway benchmark results"
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| date | $(date -u +%Y-%m-%dT%H:%M:%SZ) |"
    echo "| commit | $GIT_REV |"
    echo "| nproc | $(nproc) |"
    echo "| CPU | ${CPU_MODEL:-unknown} |"
    echo "| memory | ${MEM_TOTAL:-unknown} |"
    echo "| kernel | $(uname -sr) |"
    echo "| data file system | $FS_DESC |"
    echo "| load average at start | $(cut -d' ' -f1-3 /proc/loadavg) |"
    echo "| wrk | $(wrk --version 2>&1 | head -1 | awk '{print $1, $2}') |"
} >"$OUT"

# ------------------------------------------------------------------ WAL bench
log "WAL bench (each run <= ${WAL_SECS}s or ${WAL_MAX} records) in $WORK/wal"
"$WAL_BENCH_BIN" "$WORK/wal" --out "$OUT" --secs "$WAL_SECS" --max-records "$WAL_MAX" | tee "$WORK/wal_bench.txt"
rm -rf "$WORK/wal"

# Figures: records/s of each row (wal_bench's RESULT lines); the fsync
# baseline (one 4 KiB overwrite + fdatasync at a time, i.e. fsyncs/s) is the
# ceiling of the engine and actor rows. Names: wal.engine.10_rec_per_commit,
# wal.actor.16_senders_x_1_rec, ...
FSYNC_BASE=""
while IFS=$'\t' read -r path batch rate; do
    if [ "${path#fsync baseline}" != "$path" ]; then
        FSYNC_BASE="$rate"
        figure wal.fsync_baseline "$rate" fsyncs/s --note "$path: the ceiling of the WAL rows"
        continue
    fi
    name="$(printf '%s.%s' "${path%% *}" "$batch" | sed 's| rec/commit|_rec_per_commit|; s/ /_/g')"
    figure "wal.$name" "$rate" records/s --ceiling "fsync baseline (fsyncs/s)" "$FSYNC_BASE" \
        --note "$path, $batch: durable appends; ratio = its records/s over the raw fsyncs/s"
done < <(sed -n 's/^RESULT path="\([^"]*\)" batch="\([^"]*\)" records_per_s=\([0-9.]*\).*/\1\t\2\t\3/p' "$WORK/wal_bench.txt")

# ------------------------------------------------------------------ WAL steady state
# What the engine writes per record once the WAL holds a retention period of
# records and deletes one for each it appends (a virtual clock: a day of the
# seed's site fills in under a minute). 1k/s is held to 2 h: wal.max_bytes
# (4 GiB) bounds a WAL to ~10M records whatever its retention.
log "WAL steady state (wal_steady) in $WORK/steady"
{
    echo
    echo "## WAL steady state (bytes written per record by the engine, a retention period of records in the WAL)"
    echo
    echo "\`actors/examples/wal_steady.rs\`: appends G records a commit with the sink's acknowledgement, compaction and a step of the dedup index's sweep every 500 ms and a checkpoint every 10 s of a virtual clock, from \`/proc/self/io\` \`write_bytes\`; the sweep (once half a WAL's worth of records were deleted) is run whole and counted per record of that half."
    echo
    echo "| rate | in the WAL before | measured | compacted meanwhile | written per record | sweep per record | total per record |"
    echo "|---:|---|---|---:|---:|---|---:|"
} >>"$OUT"
for spec in "40 24 2" "1000 2 28"; do
    read -r rate hours group <<<"$spec"
    "$WAL_STEADY_BIN" "$WORK/steady" --rate "$rate" --retention-hours "$hours" --group "$group" \
        --records $((rate >= 1000 ? 300000 : 100000)) --out "$OUT" | tee "$WORK/wal_steady.txt" \
        || { log "wal_steady at $rate/s failed"; continue; }
    rm -rf "$WORK/steady"
    total="$(sed -n 's/^RESULT .* bytes_per_record=\([0-9]*\) sweep_per_record=\([0-9]*\).*/\1 \2/p' "$WORK/wal_steady.txt" | awk '{print $1 + $2}')"
    [ -z "$total" ] || figure "wal.steady.$rate.bytes_per_record" "$total" B/record \
        --note "the engine at $rate records/s, $group a commit, on a WAL holding $hours h of records (retention = dedup window = $hours h), compacting as it appends; sweep included"
done

# ------------------------------------------------------------------ HTTP ceiling: nginx
# The "does nothing" HTTP server: nginx answering 202 '{}' to every POST on a
# free loopback port, driven by the same wrk command as the gateway below.
# bench_kv_file FILE KEY: a value of the BENCH line that bench/ingest.lua prints.
bench_kv_file() { { grep '^BENCH ' "$1" || true; } | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k {print $2}'; }
NGINX_RPS=""; NGINX_CHECK="not run"
if [ -n "$NGINX" ]; then
    mkdir -p "$WORK/nginx"
    NGINX_PORT="$(free_port)"
    cat >"$WORK/nginx/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / { return 202 '{}'; }
    }
}
EOF
    "$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx/" >"$WORK/nginx/stdout.log" 2>&1 &
    NGINX_PID=$!
    for _ in $(seq 1 50); do port_in_use "$NGINX_PORT" && break; kill -0 "$NGINX_PID" 2>/dev/null || break; sleep 0.1; done
    if port_in_use "$NGINX_PORT" && kill -0 "$NGINX_PID" 2>/dev/null; then
        log "nginx ceiling: wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION against nginx (pid $NGINX_PID) on 127.0.0.1:$NGINX_PORT"
        wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" --timeout 10s --latency \
            -s "$ROOT/bench/ingest.lua" "http://127.0.0.1:$NGINX_PORT" -- "nginx$(date +%s)" "$DEVICES" | tee "$WORK/wrk-nginx.txt"
        NGINX_RPS="$(bench_kv_file "$WORK/wrk-nginx.txt" rps)"
        NGINX_CHECK="OK"
        [ "$(bench_kv_file "$WORK/wrk-nginx.txt" status_other)" = 0 ] || NGINX_CHECK="answered other than 202 (see its wrk output)"
    else
        NGINX_CHECK="did not start: $(tail -3 "$WORK/nginx/error.log" "$WORK/nginx/stdout.log" 2>/dev/null | tr '\n' ' ')"
        log "WARNING: nginx $NGINX_CHECK"
    fi
    stop_pid "$NGINX_PID" 5; NGINX_PID=""
fi

# ------------------------------------------------------------------ HTTP bench
# Only the settings we pass: nothing from the caller's GATEWAY_* environment.
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^GATEWAY_' || true)

GW_DATA="$WORK/gateway-data"
GW_LOG="$WORK/gateway.log"

# A free loopback port: probe a random one (nothing answers), start the
# gateway on it, and try another if the bind lost a race.
start_gateway() {
    GATEWAY_LOG_LEVEL="$LOG_LEVEL" GATEWAY_INGEST_RATE_LIMIT_PER_DEVICE=0 \
        "$GATEWAY_BIN" run --data-dir "$GW_DATA" --http-addr "127.0.0.1:$1" >"$GW_LOG" 2>&1 &
    GW_PID=$!
}
BASE=""
for attempt in 1 2 3 4 5; do
    PORT=$(( 20000 + (RANDOM * 32768 + RANDOM) % 30000 ))
    port_in_use "$PORT" && continue
    log "starting the gateway on 127.0.0.1:$PORT (data dir $GW_DATA, log level $LOG_LEVEL)"
    start_gateway "$PORT"
    for i in $(seq 1 150); do
        if curl -sf -o /dev/null "http://127.0.0.1:$PORT/readyz"; then BASE="http://127.0.0.1:$PORT"; break; fi
        kill -0 "$GW_PID" 2>/dev/null || break
        sleep 0.2
    done
    [ -n "$BASE" ] && break
    if kill -0 "$GW_PID" 2>/dev/null; then
        curl -s "http://127.0.0.1:$PORT/readyz" >&2 || true
        die "/readyz not ready after 30s"
    fi
    wait "$GW_PID" 2>/dev/null || true
    GW_PID=""
    grep -q 'binding http.addr' "$GW_LOG" || { tail -20 "$GW_LOG" >&2; die "the gateway exited during start-up (attempt $attempt)"; }
    log "port $PORT was taken; trying another"
done
[ -n "$BASE" ] || die "could not start the gateway on a free port"
log "gateway pid $GW_PID ready on $BASE"

# CPU accounting: whole machine (/proc/stat) and the gateway per thread.
RSS_IDLE="$(awk '/^VmRSS/ {print $2 " " $3}' /proc/"$GW_PID"/status)"
read -r M_BUSY0 M_ALL0 < <(machine_ticks)
thread_ticks "$GW_PID" >"$WORK/threads0.txt"

RUN_ID="r$(date +%s)"
log "wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION ($DEVICES devices, unique msg_id per request)"
wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" --timeout 10s --latency \
    -s "$ROOT/bench/ingest.lua" "$BASE" -- "$RUN_ID" "$DEVICES" | tee "$WORK/wrk.txt"

read -r M_BUSY1 M_ALL1 < <(machine_ticks)
thread_ticks "$GW_PID" >"$WORK/threads1.txt"
sleep 1
curl -sf "$BASE/metrics" >"$WORK/metrics.txt" || die "cannot read $BASE/metrics"
VM_HWM="$(awk '/^VmHWM/ {print $2 " " $3}' /proc/"$GW_PID"/status)"
VM_RSS="$(awk '/^VmRSS/ {print $2 " " $3}' /proc/"$GW_PID"/status)"
GW_THREADS="$(awk '/^Threads/ {print $2}' /proc/"$GW_PID"/status)"

# ------------------------------------------------------------------ evaluate
bench_kv() { { grep '^BENCH ' "$WORK/wrk.txt" || true; } | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k {print $2}'; }
# metric NAME [LABEL=VALUE ...]: metric_sum over the scraped /metrics.
metric() { metric_sum "$WORK/metrics.txt" "$@"; }
metric_f() { awk -v name="$1" '$1 == name {print $NF}' "$WORK/metrics.txt"; }

REQS="$(bench_kv requests)"
[ -n "$REQS" ] || die "wrk printed no BENCH line (see $WORK/wrk.txt)"
RPS="$(bench_kv rps)"
S202="$(bench_kv status_202)"; S200="$(bench_kv status_200)"; SOTHER="$(bench_kv status_other)"
P50="$(bench_kv lat_p50_us)"; P90="$(bench_kv lat_p90_us)"; P99="$(bench_kv lat_p99_us)"
P999="$(bench_kv lat_p999_us)"; PMAX="$(bench_kv lat_max_us)"; PMEAN="$(bench_kv lat_mean_us)"
ERR_SOCK=$(( $(bench_kv err_connect) + $(bench_kv err_read) + $(bench_kv err_write) + $(bench_kv err_timeout) ))
NON2XX="$(awk '/Non-2xx or 3xx responses/ {print $NF}' "$WORK/wrk.txt")"; NON2XX="${NON2XX:-0}"

ACCEPTED="$(metric gateway_ingest_records_total source=http outcome=accepted)"
DUPS="$(metric gateway_ingest_records_total source=http outcome=duplicate)"
REJECTED="$(metric gateway_ingest_records_total source=http outcome=rejected)"
COMMITS="$(metric gateway_wal_commits_total)"
GS_SUM="$(metric_f gateway_wal_group_size_sum)"; GS_CNT="$(metric_f gateway_wal_group_size_count)"
AP_SUM="$(metric_f gateway_wal_append_seconds_sum)"; AP_CNT="$(metric_f gateway_wal_append_seconds_count)"
SINK_OK="$(metric gateway_sink_records_total sink=archive outcome=ok)"
MEAN_GROUP="$(awk -v s="${GS_SUM:-0}" -v c="${GS_CNT:-0}" 'BEGIN { if (c > 0) printf "%.1f", s / c; else print "n/a" }')"
MEAN_COMMIT_MS="$(awk -v s="${AP_SUM:-0}" -v c="${AP_CNT:-0}" 'BEGIN { if (c > 0) printf "%.2f", 1000 * s / c; else print "n/a" }')"
DIFF=$(( ACCEPTED - S202 ))

# CPU over the wrk run.
GW_TICKS="$(join <(sort "$WORK/threads0.txt") <(sort "$WORK/threads1.txt") | awk '{s += $5 - $3} END {print s + 0}')"
# Threads born during the run count whole.
NEW_TICKS="$(join -v 2 <(sort "$WORK/threads0.txt") <(sort "$WORK/threads1.txt") | awk '{s += $3} END {print s + 0}')"
GW_TICKS=$(( GW_TICKS + NEW_TICKS ))
M_BUSY=$(( M_BUSY1 - M_BUSY0 )); M_ALL=$(( M_ALL1 - M_ALL0 ))
CPU_SUMMARY="$(awk -v g="$GW_TICKS" -v b="$M_BUSY" -v a="$M_ALL" -v n="$(nproc)" 'BEGIN {
    printf "machine busy %.0f%% of %d cores; gateway %.0f%% of one core (%.0f%% of the machine); wrk + rest %.0f%% of the machine",
        100 * b / a, n, 100 * n * g / a, 100 * g / a, 100 * (b - g) / a }')"
THREAD_TABLE="$(join -a 2 -e 0 -o 2.2,1.3,2.3 <(sort "$WORK/threads0.txt") <(sort "$WORK/threads1.txt") \
    | awk -v a="$M_ALL" -v n="$(nproc)" '{d[$1] += $3 - $2; c[$1]++}
        END { for (k in d) if (d[k] > 0) printf "| %s | %d | %.1f%% |\n", k, c[k], 100 * n * d[k] / a }' \
    | sort -t'|' -k4 -rn)"
LOG_LINES="$(wc -l <"$GW_LOG")"; LOG_BYTES="$(wc -c <"$GW_LOG")"

VERDICT="OK"
PROBLEMS=""
if [ "$SOTHER" != 0 ] || [ "$S200" != 0 ] || [ "$NON2XX" != 0 ]; then
    VERDICT="FAIL"; PROBLEMS="$PROBLEMS; non-202 responses: 200=$S200 other=$SOTHER (wrk Non-2xx/3xx: $NON2XX)"
fi
if [ "$DIFF" -lt 0 ] || [ "$DIFF" -gt "$WRK_CONNS" ]; then
    VERDICT="FAIL"; PROBLEMS="$PROBLEMS; accepted ($ACCEPTED) - wrk 202 ($S202) = $DIFF is outside [0, $WRK_CONNS]"
fi
if [ "$DUPS" != 0 ] || [ "$REJECTED" != 0 ]; then
    VERDICT="FAIL"; PROBLEMS="$PROBLEMS; gateway counted duplicates=$DUPS rejected=$REJECTED"
fi
[ "$ERR_SOCK" = 0 ] || PROBLEMS="$PROBLEMS; wrk socket errors: $ERR_SOCK"

{
    echo
    echo "### HTTP ingest (release gateway, wrk)"
    echo
    echo "\`wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION\` with keep-alive, \`POST /ingest/{device}\` over $DEVICES devices,"
    echo "one unique record per request (body ~100 bytes), gateway on 127.0.0.1 with its default configuration"
    echo "(no rate limit, default \`archive\` sink delivering to \`file://DATA/archive\`, log level $LOG_LEVEL to a file),"
    echo "gateway and wrk sharing the same $(nproc) cores."
    echo
    echo "| measure | value |"
    echo "|---|---:|"
    echo "| requests/s (wrk) | $RPS |"
    echo "| ceiling: nginx answering 202, same wrk command, requests/s | ${NGINX_RPS:-n/a} ($NGINX_CHECK) |"
    echo "| gateway / nginx | $(awk -v a="$RPS" -v b="${NGINX_RPS:-0}" 'BEGIN { if (b > 0) printf "%.1f %%", 100 * a / b; else print "n/a" }') (target >= 40 %) |"
    echo "| latency p50 / p90 / p99 / p99.9 / max | $(awk -v a="$P50" -v b="$P90" -v c="$P99" -v d="$P999" -v e="$PMAX" 'BEGIN {printf "%.2f / %.2f / %.2f / %.2f / %.2f ms", a/1000, b/1000, c/1000, d/1000, e/1000}') |"
    echo "| latency mean | $(awk -v a="$PMEAN" 'BEGIN {printf "%.2f ms", a/1000}') |"
    echo "| wrk requests completed | $REQS |"
    echo "| wrk 202 / 200 (duplicate) / other / socket errors | $S202 / $S200 / $SOTHER / $ERR_SOCK |"
    echo "| gateway accepted (\`gateway_ingest_records_total{source=\"http\",outcome=\"accepted\"}\`) | $ACCEPTED |"
    echo "| accepted − wrk 202 (requests in flight when wrk stopped; must be 0..$WRK_CONNS) | $DIFF |"
    echo "| gateway duplicates / rejected | $DUPS / $REJECTED |"
    echo "| WAL group commits (fsyncs) | $COMMITS |"
    echo "| mean WAL group size (records/commit) | $MEAN_GROUP |"
    echo "| mean time to commit a group (\`gateway_wal_append_seconds\`) | $MEAN_COMMIT_MS ms |"
    echo "| records delivered to the archive sink | ${SINK_OK:-0} |"
    echo "| gateway RSS idle before the run / at end (VmRSS) / peak (VmHWM) | $RSS_IDLE / $VM_RSS / $VM_HWM |"
    echo "| gateway threads | $GW_THREADS |"
    echo "| CPU during the run | $CPU_SUMMARY |"
    echo "| gateway log written | $LOG_LINES lines, $LOG_BYTES bytes |"
    echo "| check | $VERDICT${PROBLEMS:+ ($PROBLEMS)} |"
    echo
    echo "Gateway CPU by thread name during the wrk run (100% = one core). actix-rt/system: the HTTP workers;"
    echo "gateway: the main thread running the actors (IngestRouter parsing, Dispatcher, SinkActor);"
    echo "wal-writer: the WAL group-commit thread (SQLite + fsync); tokio-rt-worker: the blocking pool (sink gzip + file writes)."
    echo
    echo "| thread | count | CPU |"
    echo "|---|---:|---:|"
    echo "$THREAD_TABLE"
    echo
    echo "<details><summary>wrk output</summary>"
    echo
    echo '```'
    grep -v '^BENCH' "$WORK/wrk.txt"
    echo '```'
    echo
    echo "</details>"
} >>"$OUT"

# Figures (bench/results/figures.jsonl).
kib_to_mb() { awk -v k="${1%% *}" 'BEGIN { if (k != "") printf "%.1f", k * 1024 / 1e6 }'; }
figure http.ingest.rps "$RPS" req/s ${NGINX_RPS:+--ceiling "nginx returning 202 (wrk -t$WRK_THREADS -c$WRK_CONNS)" "$NGINX_RPS"} \
    --target "HTTP durable ingest >= 40 % of the nginx ceiling (issue 12, target 4)" --check "ratio >= 0.40" \
    --note "wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION, bench/ingest.lua, default config; check: $VERDICT"
figure http.ingest.latency_p99 "$(awk -v a="$P99" 'BEGIN { printf "%.2f", a / 1000 }')" ms --note "wrk's p99 at full load"
figure http.rss_before_load "$(kib_to_mb "$RSS_IDLE")" MB \
    --note "VmRSS right after /readyz, default config, MIMALLOC_ARENA_EAGER_COMMIT=${MIMALLOC_ARENA_EAGER_COMMIT:-unset} (the idle figures are bench-startup.sh's)"
figure http.rss_peak "$(kib_to_mb "$VM_HWM")" MB --note "VmHWM after the wrk run"

# ------------------------------------------------------------------ stop, publish
log "stopping the gateway"
kill -TERM "$GW_PID" 2>/dev/null || true
for _ in $(seq 1 75); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.2; done
if kill -0 "$GW_PID" 2>/dev/null; then
    log "the gateway did not stop within 15s of SIGTERM: killing it"
    kill -KILL "$GW_PID" 2>/dev/null || true
fi
wait "$GW_PID" 2>/dev/null || true
GW_PID=""

cp "$OUT" "$RESULTS.tmp" && mv "$RESULTS.tmp" "$RESULTS"
echo
cat "$RESULTS"
echo
log "results written to ${RESULTS#"$ROOT"/}"
[ "$VERDICT" = OK ] || die "check failed:${PROBLEMS#;}"
