#!/usr/bin/env bash
# MQTT ingest benchmark, run by `make bench` after scripts/bench.sh.
#
#   scripts/bench-mqtt.sh
#
# What it measures. Publishers, broker, subscriber and gateway all run on this
# machine. For each broker setting of `max_inflight_messages` (default: 20,
# Mosquitto's default, then 1000):
#   1. Starts a private Mosquitto on a free loopback port (own config:
#      persistence off, max_queued_messages 0 = never drop queued messages).
#   2. No-op baseline: `mosquitto_sub -q 1 -c` (MQTT 3.1.1, persistent
#      session, acks at once, discards the payload) subscribes
#      devices/+/telemetry; then N publishers (`mosquitto_pub -q 1 -l`, one
#      device each) send the same pre-generated files. Rate = records / time
#      from the first publisher's start to the subscriber's exit after
#      receiving all of them.
#   3. For each gateway `mqtt.version` (default: 5, then 3.1.1): starts the
#      release gateway (fresh data dir, its own client id, default config:
#      archive sink, no rate limit), waits for /readyz = 200, runs the same
#      publishers and polls /metrics every ~100 ms until
#      gateway_ingest_records_total{source="mqtt",outcome="accepted"} reaches
#      the total (each record is acked only after its WAL fsync). Checks that
#      every record was accepted exactly once (no loss, no duplicate, no
#      reject, no reconnect) and records peak RSS (VmHWM), WAL group sizes,
#      commit time and CPU per thread of the gateway, of the broker and of the
#      whole machine.
#   4. Appends its section to bench/results/latest.md (replacing an earlier
#      MQTT section there) and prints it.
#
# Knobs (environment):
#   BENCH_MQTT_PUBLISHERS=4          publishers (= devices), one file each
#   BENCH_MQTT_RECORDS=50000         records per publisher (~200-byte JSON lines, unique msg_id)
#   BENCH_MQTT_INFLIGHT="20 1000"    broker max_inflight_messages values (one broker each)
#   BENCH_MQTT_VERSIONS="5 3.1.1"    gateway mqtt.version values (each run on every broker)
#   BENCH_MQTT_REPEAT=1              runs of each no-op/gateway sequence per broker (interleaved);
#                                    > 1 adds a table of medians (this machine is shared: noisy)
#   BENCH_MQTT_PUB_INFLIGHT=         mosquitto_pub -M (its in-flight window; empty = its default, 20)
#   BENCH_MQTT_TIMEOUT=300           bound in seconds of each run (publish + drain)
#   BENCH_MQTT_TARGET_PCT=95         target: gateway rate >= this % of the no-op rate (issue 12)
#   BENCH_MQTT_STRICT=0              1 = exit non-zero when a run misses the target
#                                    (lost/duplicate/rejected records always fail)
#   BENCH_LOG_LEVEL=info             the gateway's log level (logs go to a file)
#   BENCH_KEEP=1                     keep the temporary directory (data dirs, logs)
#   BENCH_SKIP_BUILD=1               use the existing target/release/gateway (no cargo build)
#   BENCH_CARGO_LOCK=FILE            hold this lock file (flock) while cargo builds
#   MOSQUITTO=/usr/sbin/mosquitto    the broker binary
#   CARGO_TARGET_DIR                 as for cargo
#
# Temporary data lives under the cargo target dir (a real disk), never /tmp,
# which may be tmpfs where fsync is free.
set -euo pipefail
export LC_ALL=C

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PUBLISHERS="${BENCH_MQTT_PUBLISHERS:-4}"
PER_PUB="${BENCH_MQTT_RECORDS:-50000}"
INFLIGHTS="${BENCH_MQTT_INFLIGHT:-20 1000}"
VERSIONS="${BENCH_MQTT_VERSIONS:-5 3.1.1}"
RUN_TIMEOUT="${BENCH_MQTT_TIMEOUT:-300}"
REPEAT="${BENCH_MQTT_REPEAT:-1}"
PUB_INFLIGHT="${BENCH_MQTT_PUB_INFLIGHT:-}"
TARGET_PCT="${BENCH_MQTT_TARGET_PCT:-95}"
STRICT="${BENCH_MQTT_STRICT:-0}"
LOG_LEVEL="${BENCH_LOG_LEVEL:-info}"
SECTION_TITLE="### MQTT ingest (release gateway behind Mosquitto, QoS 1, ack after fsync)"
TOTAL=$(( PUBLISHERS * PER_PUB ))
RECEIVE_MAX=1000   # the gateway's default mqtt.receive_maximum (config/default.toml)
NOISY_PCT=20       # "other" CPU (not this benchmark) above this % of a core marks a run as noisy

BENCH_NAME=bench-mqtt
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

case "$PUBLISHERS" in ''|*[!0-9]*) die "BENCH_MQTT_PUBLISHERS must be a number" ;; esac
case "$PER_PUB" in ''|*[!0-9]*) die "BENCH_MQTT_RECORDS must be a number" ;; esac
case "$REPEAT" in ''|*[!0-9]*|0) die "BENCH_MQTT_REPEAT must be a number >= 1" ;; esac
case "$PUB_INFLIGHT" in *[!0-9]*) die "BENCH_MQTT_PUB_INFLIGHT must be a number" ;; esac
case "$RUN_TIMEOUT" in ''|*[!0-9]*) die "BENCH_MQTT_TIMEOUT must be a number of seconds" ;; esac
[ "$TOTAL" -gt 0 ] || die "nothing to publish"

# ------------------------------------------------------------------ cleanup
GW_PID=""
BROKER_PID=""
SUB_PID=""
PUB_PIDS=()
WORK=""
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PUB_PIDS[@]}"; do stop_pid "$p" 2; done
    stop_pid "$SUB_PID" 2
    stop_pid "$GW_PID" 15
    stop_pid "$BROKER_PID" 5
    remove_work "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ tools
MOSQUITTO="${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}"
[ -x "$MOSQUITTO" ] || die "mosquitto not found (make test-deps installs it)"
for t in mosquitto_pub mosquitto_sub curl timeout awk cargo; do
    command -v "$t" >/dev/null || die "$t not found (make test-deps installs the mosquitto clients)"
done
MOSQ_VERSION="$({ "$MOSQUITTO" -h 2>&1 || true; } | awk '/^mosquitto version/ {print $3; exit}')"

# ------------------------------------------------------------------ build
release_gateway

# ------------------------------------------------------------------ work dir
mkdir -p "$TARGET_DIR" "$RESULTS_DIR"
WORK="$(mktemp -d "$TARGET_DIR/bench-mqtt-tmp.XXXXXX")"
FS_TYPE="$(stat -f -c %T "$WORK" 2>/dev/null || echo unknown)"
FS_DESC="$(df -PT "$WORK" 2>/dev/null | awk 'NR==2 {print $2 " (" $1 " on " $7 ")"}')"
[ -n "$FS_DESC" ] || FS_DESC="$FS_TYPE"
case "$FS_TYPE $FS_DESC" in
    *tmpfs*|*ramfs*) log "WARNING: $WORK is on $FS_DESC (memory): fsync costs nothing there" ;;
esac
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
GIT_REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain -- src actors Cargo.toml Cargo.lock 2>/dev/null)" ]; then GIT_REV="$GIT_REV (+ uncommitted changes)"; fi

# Only the settings we pass: nothing from the caller's GATEWAY_* environment.
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^GATEWAY_' || true)

# ------------------------------------------------------------------ load files
# One file per publisher/device, one JSON record per line (~200 bytes), every
# msg_id unique. Generated once; every run publishes the same files.
log "generating $PUBLISHERS x $PER_PUB records"
for ((d = 1; d <= PUBLISHERS; d++)); do
    awk -v d="$d" -v n="$PER_PUB" 'BEGIN {
        srand(d)
        for (i = 1; i <= n; i++)
            printf "{\"schema_version\":1,\"msg_id\":\"bench-dev-%d-%08d\",\"ts\":%.0f,\"metrics\":{\"t\":%.2f,\"h\":%.2f,\"p\":%.2f,\"co2\":%d,\"batt\":%.3f,\"rssi\":%d,\"door\":%s},\"tags\":{\"fw\":\"1.4.2\",\"site\":\"bench\"}}\n",
                d, i, 1764057600000 + i * 100, 15 + 10 * rand(), 30 + 40 * rand(), 990 + 30 * rand(),
                400 + int(200 * rand()), 3 + rand(), -90 + int(40 * rand()), (rand() < 0.5 ? "false" : "true")
    }' >"$WORK/dev-$d.jsonl"
done
MSG_BYTES="$(awk '{ s += length($0) } END { printf "%.0f", s / NR }' "$WORK/dev-1.jsonl")"

# ------------------------------------------------------------------ helpers
random_port() { echo $(( 20000 + (RANDOM * 32768 + RANDOM) % 30000 )); }
now_ns() { date +%s%N; }

# proc_ticks PID: utime+stime of the whole process.
proc_ticks() {
    local s
    s="$(cat /proc/"$1"/stat 2>/dev/null)" || { echo 0; return; }
    s="${s##*) }"
    # shellcheck disable=SC2086
    set -- $s
    echo $(( ${12} + ${13} ))
}
# children_ticks: CPU (1/100 s) of every child this shell has waited for
# (publishers, subscriber, curl polls). `times` must run in this shell, not in $(...).
# Sets C_TICKS.
children_ticks() {
    times >"$WORK/times.txt"
    C_TICKS="$(awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%.0f\n", 100 * (u[1] * 60 + u[2] + s[1] * 60 + s[2]) }' "$WORK/times.txt")"
}
# share TICKS: TICKS as % of one core over the run (M_ALL = jiffies of all cores).
share() { awk -v t="$1" -v a="$M_ALL" -v n="$(nproc)" 'BEGIN { if (a > 0) printf "%.0f", 100 * n * t / a; else print "n/a" }'; }
metric_f() { awk -v name="$2" '$1 == name {print $NF}' "$1"; }
# largest_group FILE: upper bound of the smallest gateway_wal_group_size bucket holding every group.
largest_group() {
    awk '/^gateway_wal_group_size_count/ {c = $NF}
         /^gateway_wal_group_size_bucket/ { match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5); b[++n] = le; v[n] = $NF }
         END { for (i = 1; i <= n; i++) if (v[i] >= c) { print (b[i] == "+Inf" ? ">" b[i-1] : "<=" b[i]); exit } print "n/a" }' "$1"
}
pct() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f", 100 * a / b; else print "n/a" }'; }

# start_publishers PORT: one mosquitto_pub per device file, each bounded by the run timeout.
start_publishers() {
    local port="$1" d
    PUB_PIDS=()
    for ((d = 1; d <= PUBLISHERS; d++)); do
        timeout "$RUN_TIMEOUT" mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -l -i "bench-pub-$d" ${PUB_INFLIGHT:+-M "$PUB_INFLIGHT"} \
            -t "devices/dev-$d/telemetry" <"$WORK/dev-$d.jsonl" 2>>"$WORK/publishers.log" &
        PUB_PIDS+=("$!")
    done
}
# wait_publishers: waits for every publisher (each bounded by `timeout`);
# sets PUB_BAD to the number that failed. (Not in $(...): a subshell cannot wait.)
wait_publishers() {
    local p rc
    PUB_BAD=0
    for p in "${PUB_PIDS[@]}"; do
        rc=0; wait "$p" || rc=$?
        [ "$rc" = 0 ] || PUB_BAD=$(( PUB_BAD + 1 ))
    done
    PUB_PIDS=()
}
pubs_alive() { local p; for p in "${PUB_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
# clean_session PORT CLIENT_ID: a clean-session connect discards that client's
# persistent session, so the broker stops queueing messages for it.
clean_session() {
    timeout 10 mosquitto_pub -h 127.0.0.1 -p "$1" -i "$2" -t bench/session-wipe -n -q 0 >/dev/null 2>&1 \
        || log "could not discard the broker session of $2"
}

# start_broker INFLIGHT: a private Mosquitto on a free loopback port; sets BROKER_PID, BROKER_PORT, BROKER_LOG.
start_broker() {
    local inflight="$1" attempt i conf
    BROKER_PORT=""
    for attempt in 1 2 3 4 5; do
        local port; port="$(random_port)"
        port_in_use "$port" && continue
        conf="$WORK/mosquitto-$inflight.conf"
        BROKER_LOG="$WORK/mosquitto-$inflight.log"
        cat >"$conf" <<EOF
listener $port 127.0.0.1
user root
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
log_type subscribe
allow_anonymous true
persistence false
max_queued_messages 0
max_inflight_messages $inflight
EOF
        "$MOSQUITTO" -c "$conf" >"$BROKER_LOG" 2>&1 &
        BROKER_PID=$!
        for i in $(seq 1 50); do
            kill -0 "$BROKER_PID" 2>/dev/null || break
            if grep -q 'mosquitto version .* running' "$BROKER_LOG" && port_in_use "$port"; then BROKER_PORT="$port"; break; fi
            sleep 0.1
        done
        [ -n "$BROKER_PORT" ] && return 0
        stop_pid "$BROKER_PID" 5; BROKER_PID=""
        grep -qi 'address already in use' "$BROKER_LOG" || { tail -20 "$BROKER_LOG" >&2; die "mosquitto did not start (attempt $attempt)"; }
        log "port $port was taken; trying another"
    done
    die "could not start mosquitto on a free port"
}

# start_gateway VERSION CLIENT_ID DATA LOG: sets GW_PID and BASE once /readyz = 200.
start_gateway() {
    local version="$1" client_id="$2" data="$3" gwlog="$4" attempt i port code
    BASE=""
    for attempt in 1 2 3 4 5; do
        port="$(random_port)"
        port_in_use "$port" && continue
        GATEWAY_LOG_LEVEL="$LOG_LEVEL" GATEWAY_INGEST_RATE_LIMIT_PER_DEVICE=0 \
            GATEWAY_MQTT_VERSION="$version" GATEWAY_MQTT_CLIENT_ID="$client_id" \
            "$GATEWAY_BIN" run --data-dir "$data" --http-addr "127.0.0.1:$port" \
            --mqtt-url "mqtt://127.0.0.1:$BROKER_PORT" >"$gwlog" 2>&1 &
        GW_PID=$!
        for i in $(seq 1 150); do
            code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/readyz" || true)"
            if [ "$code" = 200 ]; then BASE="http://127.0.0.1:$port"; return 0; fi
            kill -0 "$GW_PID" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$GW_PID" 2>/dev/null; then
            curl -s --max-time 2 "http://127.0.0.1:$port/readyz" >&2 || true
            die "/readyz not 200 after 30s (gateway log: $gwlog)"
        fi
        wait "$GW_PID" 2>/dev/null || true
        GW_PID=""
        grep -q 'binding http.addr' "$gwlog" || { tail -20 "$gwlog" >&2; die "the gateway exited during start-up (attempt $attempt)"; }
        log "port $port was taken; trying another"
    done
    die "could not start the gateway on a free port"
}

ROWS="$WORK/rows.md"          # the main table
SUMMARY="$WORK/summary.tsv"   # inflight kind rate hwm group, one line per run
THREADS_ALL="$WORK/threads.tsv" # run-label thread-name cpu%
: >"$ROWS"; : >"$THREADS_ALL"; : >"$SUMMARY"
FAILURES=""
MISSED=""

# ------------------------------------------------------------------ runs
for INFLIGHT in $INFLIGHTS; do
    start_broker "$INFLIGHT"
    log "mosquitto $MOSQ_VERSION (pid $BROKER_PID) on 127.0.0.1:$BROKER_PORT, max_inflight_messages $INFLIGHT"

    for ((REP = 1; REP <= REPEAT; REP++)); do
        REP_TAG=""; [ "$REPEAT" = 1 ] || REP_TAG=" #$REP"
        # ---- (a) no-op QoS 1 subscriber
        SUB_ID="noop-sub-$INFLIGHT-$REP-$$"
        timeout "$RUN_TIMEOUT" mosquitto_sub -h 127.0.0.1 -p "$BROKER_PORT" -q 1 -c -i "$SUB_ID" \
            -t 'devices/+/telemetry' -C "$TOTAL" >/dev/null 2>"$WORK/noop-sub-$INFLIGHT-$REP.err" &
        SUB_PID=$!
        subscribed=""
        for i in $(seq 1 100); do
            if grep -qF "$SUB_ID 1 devices/+/telemetry" "$BROKER_LOG"; then subscribed=1; break; fi
            kill -0 "$SUB_PID" 2>/dev/null || break
            sleep 0.1
        done
        [ -n "$subscribed" ] || die "the no-op subscriber did not subscribe within 10s"
        log "no-op subscriber$REP_TAG: $PUBLISHERS publishers x $PER_PUB records"
        children_ticks; C0="$C_TICKS"
        read -r M_BUSY0 M_ALL0 < <(machine_ticks); B0="$(proc_ticks "$BROKER_PID")"
        T0="$(now_ns)"
        start_publishers "$BROKER_PORT"
        T_PUB=""
        while kill -0 "$SUB_PID" 2>/dev/null; do # bounded: the subscriber runs under `timeout`
            [ -n "$T_PUB" ] || pubs_alive || T_PUB="$(now_ns)"
            sleep 0.02
        done
        T1="$(now_ns)"
        sub_rc=0; wait "$SUB_PID" || sub_rc=$?
        SUB_PID=""
        read -r M_BUSY1 M_ALL1 < <(machine_ticks); B1="$(proc_ticks "$BROKER_PID")"
        wait_publishers
        [ -n "$T_PUB" ] || T_PUB="$(now_ns)"
        children_ticks; C1="$C_TICKS"
        clean_session "$BROKER_PORT" "$SUB_ID"
        PUB_SECS="$(awk -v a="$T0" -v b="$T_PUB" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')"
        NOOP_SECS="$(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')"
        NOOP_RATE="$(awk -v n="$TOTAL" -v a="$T0" -v b="$T1" 'BEGIN { printf "%.0f", n / ((b - a) / 1e9) }')"
        M_ALL=$(( M_ALL1 - M_ALL0 )); M_BUSY=$(( M_BUSY1 - M_BUSY0 ))
        NOOP_MACHINE="$(pct "$M_BUSY" "$M_ALL")"
        NOOP_BROKER="$(share $(( B1 - B0 )))"
        NOOP_CLIENTS="$(share $(( C1 - C0 )))"
        NOOP_OTHER="$(share $(( M_BUSY - (B1 - B0) - (C1 - C0) > 0 ? M_BUSY - (B1 - B0) - (C1 - C0) : 0 )))"
        check="OK"
        [ "$NOOP_OTHER" = n/a ] || [ "$NOOP_OTHER" -lt "$NOISY_PCT" ] || check="OK, noisy"
        if [ "$sub_rc" != 0 ]; then
            check="FAIL (mosquitto_sub exit $sub_rc)"
            [ "$sub_rc" != 124 ] || check="FAIL (no-op subscriber timed out after ${RUN_TIMEOUT}s)"
            FAILURES="$FAILURES; no-op @$INFLIGHT$REP_TAG: $check"
        elif [ "$PUB_BAD" != 0 ]; then
            check="FAIL ($PUB_BAD publishers failed)"; FAILURES="$FAILURES; no-op @$INFLIGHT$REP_TAG: $check"
        fi
        log "no-op subscriber$REP_TAG: $TOTAL records in ${NOOP_SECS}s = $NOOP_RATE records/s, publishers done after ${PUB_SECS}s ($check)"
        echo "| $INFLIGHT | no-op \`mosquitto_sub -q 1 -c\`$REP_TAG | 3.1.1 | $INFLIGHT | $TOTAL | $NOOP_SECS | $PUB_SECS | **$NOOP_RATE** | 100% | - | - | - | - | - | $NOOP_BROKER% | $NOOP_CLIENTS% | $NOOP_OTHER% | $NOOP_MACHINE% | $check |" >>"$ROWS"
        [ "$sub_rc" = 0 ] || NOOP_RATE=0
        printf '%s\tno-op\t%s\t-\t-\n' "$INFLIGHT" "$NOOP_RATE" >>"$SUMMARY"

        # ---- (b) the gateway, per MQTT version
        for VERSION in $VERSIONS; do
            LABEL="v$VERSION @$INFLIGHT$REP_TAG"
            # The in-flight window the broker should respect: Mosquitto replaces
            # max_inflight_messages by an MQTT 5 client's Receive Maximum.
            case "$VERSION" in 5*) WINDOW="$RECEIVE_MAX (Receive Maximum)" ;; *) WINDOW="$INFLIGHT" ;; esac
            RUN="gw-${VERSION//./}-$INFLIGHT-$REP"
            CLIENT_ID="bench-$RUN-$$"
            GW_DATA="$WORK/$RUN-data"
            GW_LOG="$WORK/$RUN.log"
            start_gateway "$VERSION" "$CLIENT_ID" "$GW_DATA" "$GW_LOG"
            log "gateway (MQTT $VERSION, pid $GW_PID) ready on $BASE; publishing"
            RSS_IDLE="$(awk '/^VmRSS/ {print $2}' /proc/"$GW_PID"/status)"
            read -r M_BUSY0 M_ALL0 < <(machine_ticks); B0="$(proc_ticks "$BROKER_PID")"
            thread_ticks "$GW_PID" >"$WORK/$RUN-threads0.txt"
            children_ticks; C0="$C_TICKS"
            T0="$(now_ns)"
            start_publishers "$BROKER_PORT"
            DEADLINE=$(( $(date +%s) + RUN_TIMEOUT ))
            accepted=0; done_ok=""; T_PUB=""
            while :; do
                [ -n "$T_PUB" ] || pubs_alive || T_PUB="$(now_ns)"
                accepted="$(curl -s --max-time 2 "$BASE/metrics" \
                    | awk '/^gateway_ingest_records_total\{/ && /source="mqtt"/ && /outcome="accepted"/ {print $NF}' || true)"
                accepted="${accepted%.*}"; accepted="${accepted:-0}"
                if [ "$accepted" -ge "$TOTAL" ]; then done_ok=1; break; fi
                kill -0 "$GW_PID" 2>/dev/null || break
                [ "$(date +%s)" -lt "$DEADLINE" ] || break
                sleep 0.1
            done
            T1="$(now_ns)"
            read -r M_BUSY1 M_ALL1 < <(machine_ticks); B1="$(proc_ticks "$BROKER_PID")"
            thread_ticks "$GW_PID" >"$WORK/$RUN-threads1.txt"
            kill -0 "$GW_PID" 2>/dev/null || { tail -20 "$GW_LOG" >&2; die "the gateway died during $LABEL (log: $GW_LOG)"; }
            wait_publishers
            [ -n "$T_PUB" ] || T_PUB="$(now_ns)"
            children_ticks; C1="$C_TICKS"
            sleep 0.5 # anything beyond the total (duplicates, redeliveries) shows up now
            curl -sf --max-time 5 "$BASE/metrics" >"$WORK/$RUN-metrics.txt" || die "cannot read $BASE/metrics"
            VM_HWM="$(awk '/^VmHWM/ {print $2}' /proc/"$GW_PID"/status)"
            stop_pid "$GW_PID" 15; GW_PID=""
            clean_session "$BROKER_PORT" "$CLIENT_ID"

            MF="$WORK/$RUN-metrics.txt"
            ACC="$(metric_sum "$MF" gateway_ingest_records_total source=mqtt outcome=accepted)"
            DUP="$(metric_sum "$MF" gateway_ingest_records_total source=mqtt outcome=duplicate)"
            REJ="$(( $(metric_sum "$MF" gateway_ingest_records_total source=mqtt outcome=rejected) + $(metric_sum "$MF" gateway_ingest_rejected_total source=mqtt) ))"
            RECON="$(metric_sum "$MF" gateway_mqtt_reconnects_total)"
            GS_SUM="$(metric_f "$MF" gateway_wal_group_size_sum)"; GS_CNT="$(metric_f "$MF" gateway_wal_group_size_count)"
            AP_SUM="$(metric_f "$MF" gateway_wal_append_seconds_sum)"; AP_CNT="$(metric_f "$MF" gateway_wal_append_seconds_count)"
            MEAN_GROUP="$(awk -v s="${GS_SUM:-0}" -v c="${GS_CNT:-0}" 'BEGIN { if (c > 0) printf "%.1f", s / c; else print "n/a" }')"
            MEAN_COMMIT_MS="$(awk -v s="${AP_SUM:-0}" -v c="${AP_CNT:-0}" 'BEGIN { if (c > 0) printf "%.2f", 1000 * s / c; else print "n/a" }')"
            BIGGEST="$(largest_group "$MF")"

            SECS="$(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')"
            PUB_SECS="$(awk -v a="$T0" -v b="$T_PUB" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')"
            RATE="$(awk -v n="$ACC" -v a="$T0" -v b="$T1" 'BEGIN { printf "%.0f", n / ((b - a) / 1e9) }')"
            PCT="$(pct "$RATE" "$NOOP_RATE")"
            M_ALL=$(( M_ALL1 - M_ALL0 )); M_BUSY=$(( M_BUSY1 - M_BUSY0 ))
            MACHINE="$(pct "$M_BUSY" "$M_ALL")"
            BROKER_CPU="$(share $(( B1 - B0 )))"
            CLIENTS_CPU="$(share $(( C1 - C0 )))"
            # Per-thread CPU over the run (threads born during it count whole).
            GW_TICKS="$(join -a 2 -e 0 -o 1.3,2.3 <(sort "$WORK/$RUN-threads0.txt") <(sort "$WORK/$RUN-threads1.txt") | awk '{s += $2 - $1} END {print s + 0}')"
            GW_CPU="$(share "$GW_TICKS")"
            OTHER=$(( M_BUSY - GW_TICKS - (B1 - B0) - (C1 - C0) )); [ "$OTHER" -ge 0 ] || OTHER=0
            OTHER_CPU="$(share "$OTHER")"
            join -a 2 -e 0 -o 2.2,1.3,2.3 <(sort "$WORK/$RUN-threads0.txt") <(sort "$WORK/$RUN-threads1.txt") \
                | awk -v run="$LABEL" -v a="$M_ALL" -v n="$(nproc)" '{d[$1] += $3 - $2; c[$1]++}
                    END { for (k in d) if (d[k] > 0) printf "%s\t%s\t%.0f%%%s\t%.0f\n", run, k, 100 * n * d[k] / a,
                          (c[k] > 1 ? " (" c[k] " threads)" : ""), 100 * n * d[k] / a }' >>"$THREADS_ALL"

            check="OK"; problems=""
            [ -n "$done_ok" ] || problems="$problems; only $accepted of $TOTAL accepted within ${RUN_TIMEOUT}s"
            [ "$ACC" = "$TOTAL" ] || problems="$problems; accepted $ACC != $TOTAL"
            [ "$DUP" = 0 ] || problems="$problems; duplicates $DUP"
            [ "$REJ" = 0 ] || problems="$problems; rejected $REJ"
            [ "$RECON" = 0 ] || problems="$problems; MQTT reconnects $RECON"
            [ "$PUB_BAD" = 0 ] || problems="$problems; $PUB_BAD publishers failed"
            if [ -n "$problems" ]; then
                check="FAIL (${problems#; })"; FAILURES="$FAILURES; $LABEL: ${problems#; }"
            elif [ "$PCT" != n/a ] && [ "$PCT" -lt "$TARGET_PCT" ]; then
                check="OK, below target"; MISSED="$MISSED, $LABEL ($PCT%)"
            fi
            if [ -z "$problems" ] && [ "$OTHER_CPU" != n/a ] && [ "$OTHER_CPU" -ge "$NOISY_PCT" ]; then check="$check, noisy"; fi
            log "gateway $LABEL: $ACC records in ${SECS}s = $RATE records/s ($PCT% of no-op), publishers done after ${PUB_SECS}s, VmHWM $(( VM_HWM / 1024 )) MiB, mean group $MEAN_GROUP, machine ${MACHINE}% busy ($check)"
            echo "| $INFLIGHT | gateway$REP_TAG | $VERSION | $WINDOW | $ACC | $SECS | $PUB_SECS | **$RATE** | **$PCT%** | $(( VM_HWM / 1024 )) MiB (idle $(( RSS_IDLE / 1024 ))) | $MEAN_GROUP | $BIGGEST | $MEAN_COMMIT_MS | $GW_CPU% | $BROKER_CPU% | $CLIENTS_CPU% | $OTHER_CPU% | $MACHINE% | $check |" >>"$ROWS"
            printf '%s\tv%s\t%s\t%s\t%s\n' "$INFLIGHT" "$VERSION" "$RATE" "$(( VM_HWM / 1024 ))" "$MEAN_GROUP" >>"$SUMMARY"
            FIG="mqtt.ingest.v$VERSION.inflight$INFLIGHT"; [ "$REPEAT" = 1 ] || FIG="$FIG.run$REP"
            figure "$FIG" "$([ -z "$problems" ] && echo "$RATE")" records/s \
                --ceiling "no-op mosquitto_sub -q 1 on the same broker" "$([ "$NOOP_RATE" != 0 ] && echo "$NOOP_RATE")" \
                --target "MQTT ingest >= 95 % of the no-op subscriber's rate (issue 12, target 4)" --check "ratio >= 0.95" \
                --note "$PUBLISHERS x $PER_PUB QoS 1 records, broker max_inflight_messages $INFLIGHT; check: $check"
            figure "$FIG.rss_peak" "$(awk -v k="$VM_HWM" 'BEGIN { printf "%.1f", k * 1024 / 1e6 }')" MB \
                --target "peak RSS <= 60 MB in the MQTT ingest benchmark (issue 12, target 2)" --check "value <= 60" \
                --note "VmHWM of the gateway (idle $(awk -v k="$RSS_IDLE" 'BEGIN { printf "%.1f", k * 1024 / 1e6 }') MB)"
        done
    done

    BROKER_HWM="$(awk '/^VmHWM/ {print $2}' /proc/"$BROKER_PID"/status)"
    echo "$INFLIGHT $(( BROKER_HWM / 1024 ))" >>"$WORK/broker-hwm.txt"
    stop_pid "$BROKER_PID" 5; BROKER_PID=""
done

# ------------------------------------------------------------------ report
THREAD_RUNS="$(cut -f1 "$THREADS_ALL" | awk '!seen[$0]++')"
THREAD_TABLE="$(
    printf '| thread |'; while IFS= read -r r; do printf ' %s |' "$r"; done <<<"$THREAD_RUNS"; echo
    printf '|---|'; while IFS= read -r _; do printf -- '---:|'; done <<<"$THREAD_RUNS"; echo
    awk -F'\t' '{ t[$2] += $4 } END { for (k in t) print t[k] "\t" k }' "$THREADS_ALL" | sort -rn | cut -f2 | while IFS= read -r th; do
        printf '| %s |' "$th"
        while IFS= read -r r; do
            v="$(awk -F'\t' -v r="$r" -v t="$th" '$1 == r && $2 == t {print $3}' "$THREADS_ALL")"
            printf ' %s |' "$v"
        done <<<"$THREAD_RUNS"
        echo
    done
)"
# Medians over the repeats (BENCH_MQTT_REPEAT > 1); the target is then judged on them.
MEDIANS=""
if [ "$REPEAT" -gt 1 ]; then
    MEDIANS="$(awk -F'\t' -v target="$TARGET_PCT" -v missed="$WORK/missed.txt" '
        function med(arr, key, cnt,   i, j, t, a) {
            for (i = 1; i <= cnt; i++) a[i] = arr[key, i] + 0
            for (i = 1; i <= cnt; i++) for (j = i + 1; j <= cnt; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
            return (cnt % 2) ? a[(cnt + 1) / 2] : (a[cnt / 2] + a[cnt / 2 + 1]) / 2
        }
        { k = $1 "\t" $2; if (!(k in n)) order[++m] = k; n[k]++; r[k, n[k]] = $3; h[k, n[k]] = $4; g[k, n[k]] = $5 }
        END {
            printf "" >missed
            for (i = 1; i <= m; i++) {
                k = order[i]; split(k, f, "\t"); mr = med(r, k, n[k]); runs = ""
                for (j = 1; j <= n[k]; j++) runs = runs (j > 1 ? ", " : "") r[k, j]
                if (f[2] == "no-op") { base[f[1]] = mr; printf "| %s | no-op | **%.0f** | 100%% | %s | - | - |\n", f[1], mr, runs; continue }
                p = base[f[1]] > 0 ? 100 * mr / base[f[1]] : -1
                if (p >= 0 && p < target) printf "%s @%s (%.0f%%)\n", f[2], f[1], p >>missed
                printf "| %s | gateway %s | **%.0f** | %s | %s | %.0f MiB | %.1f |\n", f[1], f[2], mr,
                    (p >= 0 ? sprintf("**%.0f%%**", p) : "n/a"), runs, med(h, k, n[k]), med(g, k, n[k])
            }
        }' "$SUMMARY")"
    MISSED="$(awk '{ printf "%s%s", (NR > 1 ? ", " : ""), $0 }' "$WORK/missed.txt")"
fi
BROKER_HWMS="$(awk '{printf "%s%s MiB at max_inflight_messages %s", (NR > 1 ? ", " : ""), $2, $1}' "$WORK/broker-hwm.txt")"

SECTION="$WORK/section.md"
{
    echo "$SECTION_TITLE"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), commit $GIT_REV, $(nproc) cores, load average at start $LOAD_START, data on $FS_DESC."
    echo "Mosquitto $MOSQ_VERSION on 127.0.0.1 (\`persistence false\`, \`max_queued_messages 0\`), $PUBLISHERS publishers"
    echo "(\`mosquitto_pub -q 1 -l${PUB_INFLIGHT:+ -M $PUB_INFLIGHT}\`, one device each) x $PER_PUB records = $TOTAL unique JSON records of ~$MSG_BYTES bytes;"
    echo "publishers, broker, subscriber and gateway share the same $(nproc) cores. No-op: \`mosquitto_sub -q 1 -c -C $TOTAL\`"
    echo "(MQTT 3.1.1, acks at once), time from the first publish to its exit. Gateway: release build, default config"
    echo "(archive sink on, no rate limit, Receive Maximum 1000 on MQTT 5, log level $LOG_LEVEL to a file), PUBACK after the"
    echo "WAL fsync; time from the first publish until \`gateway_ingest_records_total{source=\"mqtt\",outcome=\"accepted\"}\` = $TOTAL"
    echo "(polled every ~100 ms). CPU columns: 100% = one core (machine busy: % of all $(nproc) cores); clients = publishers,"
    echo "no-op subscriber and the /metrics polls; other = everything else on the machine (not this benchmark)."
    echo
    echo "| broker max_inflight | subscriber | MQTT | window (nominal) | records | seconds | publishers done (s) | records/s | % of no-op | gateway peak RSS (VmHWM) | mean WAL group | largest group | mean append ms | gateway CPU | broker CPU | clients CPU | other CPU | machine busy | check |"
    echo "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    cat "$ROWS"
    echo
    if [ -n "$MEDIANS" ]; then
        echo "Medians of $REPEAT interleaved runs per broker (no-op, then each gateway version, repeated):"
        echo
        echo "| broker max_inflight | run | median records/s | % of median no-op | runs (records/s) | median gateway VmHWM | median WAL group |"
        echo "|---:|---|---:|---:|---|---:|---:|"
        echo "$MEDIANS"
        echo
    fi
    echo "Target: gateway >= $TARGET_PCT% of the no-op rate on the same broker$( [ -z "$MEDIANS" ] || echo " (judged on the medians)").${MISSED:+ Below target: ${MISSED#, }.}"
    echo "Broker peak RSS: $BROKER_HWMS."
    echo
    echo "How to read it: *publishers done* close to *seconds* means the consumer kept up and the publishers (with the broker)"
    echo "set the pace; a consumer finishing well after them drained a backlog. *noisy*: other processes on the machine took"
    echo ">= $NOISY_PCT% of a core during the run (this machine is shared), which lowers that run's rate. *mean append* ="
    echo "\`gateway_wal_append_seconds\` (oldest request of a group queued -> group fsync'd); *largest group* = upper bound of"
    echo "the \`gateway_wal_group_size\` bucket holding every group. Each MQTT message is one WAL request, so a group of G"
    echo "records means at least G messages were in the gateway unacknowledged at once: a mean group above the nominal"
    echo "window means the broker did not hold the gateway to it (Mosquitto uses an MQTT 5 client's Receive Maximum instead"
    echo "of \`max_inflight_messages\`; groups are capped at 4096 requests)."
    echo
    echo "Gateway CPU by thread name during each run (100% = one core). gateway: the main thread running the actors"
    echo "(MqttIngest loop, IngestRouter parsing, Dispatcher, SinkActor); wal-writer: SQLite + fsync;"
    echo "tokio-rt-worker: blocking pool (sink gzip + file writes); actix-rt/system: HTTP workers (/metrics polls)."
    echo
    echo "$THREAD_TABLE"
} >"$SECTION"

# Append to latest.md, replacing an earlier MQTT section (from its heading to the next ### heading).
if [ -f "$RESULTS" ]; then
    awk -v title="$SECTION_TITLE" '
        index($0, "### MQTT ingest") == 1 { skip = 1; next }
        skip && /^### / { skip = 0 }
        !skip { print }' "$RESULTS" >"$RESULTS.tmp"
    # Drop trailing blank lines, then one blank line before the new section.
    awk '{ lines[NR] = $0 } END { n = NR; while (n > 0 && lines[n] == "") n--; for (i = 1; i <= n; i++) print lines[i] }' \
        "$RESULTS.tmp" >"$RESULTS.tmp2"
    { cat "$RESULTS.tmp2"; echo; cat "$SECTION"; } >"$RESULTS.tmp"
    rm -f "$RESULTS.tmp2"
else
    { echo "# Gateway benchmark results"; echo; cat "$SECTION"; } >"$RESULTS.tmp"
fi
mv "$RESULTS.tmp" "$RESULTS"

echo
cat "$SECTION"
echo
log "results appended to ${RESULTS#"$ROOT"/}"
[ -z "$FAILURES" ] || die "check failed:${FAILURES#;}"
if [ -n "$MISSED" ] && [ "$STRICT" = 1 ]; then die "below the ${TARGET_PCT}% target: ${MISSED#, }"; fi
exit 0
