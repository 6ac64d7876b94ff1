#!/usr/bin/env bash
# Start-up and idle-memory benchmark behind `make bench`.
#
#   scripts/bench-startup.sh
#
# 1. Idle RSS: the release gateway with its default configuration (embedded
#    broker, here on a free loopback port; the default archive sink), idle
#    for BENCH_IDLE_SECS after /readyz = 200, then VmRSS. Once with
#    MIMALLOC_ARENA_EAGER_COMMIT=0 (what `make run` and the image set) and
#    once with the allocator's default.
# 2. Start-up with a backlog: a gateway (MQTT off, its archive sink paused so
#    that every record stays pending) takes BENCH_STARTUP_RECORDS records over
#    HTTP (JSON arrays on 4 keep-alive connections) and is stopped. Then it is
#    started BENCH_STARTUP_RUNS times on that data dir; each time: wall time
#    from exec to the first /readyz = 200 (polled every 5 ms), and the
#    backlog it reports (gateway_wal_records{sink="archive"}) must be every
#    record. Warm page cache (the data was just written).
# 3. The size of the release binary.
#
# Appends a section to bench/results/latest.md; the figures also go to
# bench/results/figures.jsonl (`figure`, for scripts/bench-report.py).
#
# Knobs (environment):
#   BENCH_STARTUP_RECORDS=1000000  BENCH_STARTUP_RUNS=3  BENCH_IDLE_SECS=10
#   BENCH_KEEP=1           keep the scratch directory (data dirs, logs)
#   BENCH_SKIP_BUILD=1     use the existing target/release/gateway (no cargo build)
#   BENCH_CARGO_LOCK=FILE  hold this lock file (flock) while cargo builds
#
# Temporary data lives under the cargo target dir (a real disk), never /tmp.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BENCH_NAME=bench-startup
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

RECORDS="${BENCH_STARTUP_RECORDS:-1000000}"
RUNS="${BENCH_STARTUP_RUNS:-3}"
IDLE_SECS="${BENCH_IDLE_SECS:-10}"
case "$RECORDS" in ''|*[!0-9]*|0) die "BENCH_STARTUP_RECORDS must be a number >= 1" ;; esac
case "$RUNS" in ''|*[!0-9]*|0) die "BENCH_STARTUP_RUNS must be a number >= 1" ;; esac
case "$IDLE_SECS" in ''|*[!0-9]*) die "BENCH_IDLE_SECS must be a number of seconds" ;; esac

GW_PID=""
WORK=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$GW_PID" 15
    remove_work "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for t in curl python3; do command -v "$t" >/dev/null || die "$t not found"; done
release_gateway
mkdir -p "$TARGET_DIR" "$RESULTS_DIR"
WORK="$(mktemp -d "$TARGET_DIR/bench-startup.XXXXXX")"
FS_DESC="$(df -PT "$WORK" 2>/dev/null | awk 'NR==2 {print $2 " (" $1 " on " $7 ")"}')"
# Only the settings we pass: nothing from the caller's GATEWAY_* environment.
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^GATEWAY_' || true)

kib_to_mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k * 1024 / 1e6 }'; }

# wait_ready PORT LOG: until /readyz = 200 (30 s at most) while GW_PID lives.
wait_ready() {
    local i code
    for i in $(seq 1 300); do
        code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1/readyz" || true)"
        [ "$code" = 200 ] && return 0
        kill -0 "$GW_PID" 2>/dev/null || { tail -5 "$2" >&2; die "the gateway exited during start-up (log: $2)"; }
        sleep 0.1
    done
    die "/readyz not 200 after 30s (log: $2)"
}

# ------------------------------------------------------------------ 1. idle RSS
# idle_rss NAME [ENV=VALUE ...]: starts a default-config gateway, waits,
# sets IDLE_KB to its VmRSS in KiB.
idle_rss() {
    local name="$1" hp mp; shift
    hp="$(free_port)"; mp="$(free_port)"
    mkdir -p "$WORK/$name"
    env "$@" GATEWAY_MQTT_EMBEDDED_ADDR="127.0.0.1:$mp" \
        "$GATEWAY_BIN" run --data-dir "$WORK/$name/data" --http-addr "127.0.0.1:$hp" >"$WORK/$name/gateway.log" 2>&1 &
    GW_PID=$!
    wait_ready "$hp" "$WORK/$name/gateway.log"
    sleep "$IDLE_SECS"
    IDLE_KB="$(awk '/^VmRSS:/ {print $2}' "/proc/$GW_PID/status")"
    stop_pid "$GW_PID" 15; GW_PID=""
}
log "idle RSS: default config, ${IDLE_SECS}s after /readyz (MIMALLOC_ARENA_EAGER_COMMIT=0, then unset)"
idle_rss idle-lean MIMALLOC_ARENA_EAGER_COMMIT=0; IDLE_LEAN_KB="$IDLE_KB"
idle_rss idle-eager -u MIMALLOC_ARENA_EAGER_COMMIT; IDLE_EAGER_KB="$IDLE_KB"
log "idle RSS: $(kib_to_mb "$IDLE_LEAN_KB") MB with MIMALLOC_ARENA_EAGER_COMMIT=0, $(kib_to_mb "$IDLE_EAGER_KB") MB without"

# ------------------------------------------------------------------ 2. start-up with a backlog
BL="$WORK/backlog"
mkdir -p "$BL"
cat >"$BL/gateway.toml" <<EOF
data_dir = "$BL/data"
[log]
level = "warn"
[mqtt]
url = "off"
[sinks.archive]
kind = "s3"
url = "file://$BL/archive"
paused = true
EOF

# The fill and the timed starts, in Python: precise clocks, fast polls.
# Prints one line: "fill_secs accepted" then, per run, "startup_secs backlog".
python3 - "$GATEWAY_BIN" "$BL" "$RECORDS" "$RUNS" >"$WORK/startup.txt" <<'PY'
import http.client, os, re, signal, socket, subprocess, sys, threading, time

gw, bl, records, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = os.path.join(bl, "gateway.toml")

def log(m):
    print(f"==> {m}", file=sys.stderr, flush=True)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def get(port, path, timeout=2):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()

def start(port, logf):
    return subprocess.Popen([gw, "--config", cfg, "run", "--http-addr", f"127.0.0.1:{port}"],
                            stdout=open(logf, "a"), stderr=subprocess.STDOUT)

def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill(); p.wait()

def ready(p, port, deadline_s, poll=0.005):
    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end:
        if p.poll() is not None:
            sys.exit(f"the gateway exited (code {p.returncode}); see {bl}/gateway.log")
        try:
            if get(port, "/readyz", timeout=1)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(poll)
    return False

def metric(text, name, **labels):
    s = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head = line.rsplit(" ", 1)[0]
        if head.split("{")[0] != name or any(f'{k}="{v}"' not in head for k, v in labels.items()):
            continue
        s += float(line.rsplit(" ", 1)[1])
    return int(s)

logf = os.path.join(bl, "gateway.log")
port = free_port()
p = start(port, logf)
try:
    if not ready(p, port, 30, poll=0.1):
        sys.exit("/readyz not 200 after 30s")
    # ~100-byte records; as many per JSON array as fit in the default 64 KiB payload.
    def rec(i):
        return '{"msg_id":"bk-%08d","ts":%d,"metrics":{"t":%.1f,"rh":%d},"tags":{"fw":"1.4.2"}}' % (
            i, 1764057600000 + i, 15 + (i % 200) / 10, 30 + i % 50)
    per = min(1000, 60000 // (len(rec(records)) + 1))
    batches = [(b, min(b + per, records)) for b in range(0, records, per)]
    log(f"filling the WAL: {records} records in {len(batches)} arrays of <= {per} (archive sink paused)")
    lock = threading.Lock()
    errors = []
    def worker(k):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for j in range(k, len(batches), 4):
            a, b = batches[j]
            body = "[" + ",".join(rec(i) for i in range(a, b)) + "]"
            c.request("POST", f"/ingest/bk-{j % 20}", body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse(); r.read()
            if r.status != 202:
                with lock:
                    errors.append(r.status)
                return
    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts: t.start()
    for t in ts: t.join()
    fill = time.monotonic() - t0
    if errors:
        sys.exit(f"the fill got HTTP {errors[0]}")
    accepted = metric(get(port, "/metrics")[1], "gateway_ingest_records_total", source="http", outcome="accepted")
    print(f"{fill:.2f} {accepted}", flush=True)
    log(f"filled in {fill:.1f}s ({accepted} accepted); stopping")
finally:
    stop(p)

for r in range(runs):
    port = free_port()
    t0 = time.monotonic()
    p = start(port, logf)
    try:
        if not ready(p, port, 60):
            sys.exit(f"run {r + 1}: /readyz not 200 within 60s")
        secs = time.monotonic() - t0
        backlog = metric(get(port, "/metrics")[1], "gateway_wal_records", sink="archive")
        print(f"{secs:.4f} {backlog}", flush=True)
        log(f"start-up {r + 1}/{runs}: ready in {secs * 1000:.0f} ms with a backlog of {backlog} records")
    finally:
        stop(p)
PY

read -r FILL_SECS ACCEPTED < <(head -1 "$WORK/startup.txt")
STARTS="$(tail -n +2 "$WORK/startup.txt")"
[ -n "$STARTS" ] || die "no start-up was measured"
CHECK="OK"
[ "$ACCEPTED" = "$RECORDS" ] || CHECK="FAIL (accepted $ACCEPTED of $RECORDS)"
BAD_BACKLOG="$(awk -v n="$RECORDS" '$2 != n' <<<"$STARTS")"
[ -z "$BAD_BACKLOG" ] || CHECK="FAIL (a start reported a backlog other than $RECORDS: $(tr '\n' ' ' <<<"$BAD_BACKLOG"))"
START_MEDIAN="$(awk '{print $1}' <<<"$STARTS" | sort -n | awk '{v[NR] = $1} END { printf "%.3f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')"
START_MAX="$(awk '{print $1}' <<<"$STARTS" | sort -n | tail -1)"
START_LIST="$(awk '{printf "%s%.3f", (NR > 1 ? ", " : ""), $1}' <<<"$STARTS")"
WAL_MB="$(du -sb "$BL/data" 2>/dev/null | awk '{printf "%.0f", $1 / 1e6}')"
log "start-up with a backlog of $RECORDS: median ${START_MEDIAN}s (runs: $START_LIST) ($CHECK)"

# ------------------------------------------------------------------ 3. binary
BIN_BYTES="$(stat -c %s "$GATEWAY_BIN")"
BIN_KIND="$( (file -b "$GATEWAY_BIN" 2>/dev/null || true) | grep -o 'not stripped\|stripped' | head -1)"

# ------------------------------------------------------------------ figures, report
figure startup.backlog.readyz "$([ "$CHECK" = OK ] && echo "$START_MEDIAN")" s \
    --target "start-up with a 1M-record backlog stays under 0.5 s (was 0.15 s; issue 12)" --check "value < 0.5" \
    --note "exec -> first /readyz 200 with $RECORDS pending records (WAL $WAL_MB MB), median of $RUNS starts ($START_LIST s), warm page cache; check: $CHECK"
figure startup.backlog.readyz_max "$([ "$CHECK" = OK ] && echo "$START_MAX")" s \
    --target "start-up with a 1M-record backlog stays under 0.5 s (issue 12)" --check "value < 0.5" --note "slowest of the $RUNS starts"
figure idle.rss "$(kib_to_mb "$IDLE_LEAN_KB")" MB \
    --target "idle RSS <= 20 MB with the default config (issue 12, target 2)" --check "value <= 20" \
    --note "default config, ${IDLE_SECS}s idle, MIMALLOC_ARENA_EAGER_COMMIT=0 as make run and the image set"
figure idle.rss_allocator_default "$(kib_to_mb "$IDLE_EAGER_KB")" MB \
    --target "idle RSS <= 20 MB with the default config (issue 12, target 2)" --check "value <= 20" \
    --note "default config, ${IDLE_SECS}s idle, MIMALLOC_ARENA_EAGER_COMMIT unset (mimalloc's eager arena commit)"
figure binary.size "$(awk -v b="$BIN_BYTES" 'BEGIN { printf "%.1f", b / 1e6 }')" MB \
    --note "target/release/gateway (${BIN_KIND:-unknown}; issue 12, target 6: a stripped release binary)"

{
    echo
    echo "### Start-up and idle memory (scripts/bench-startup.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo
    echo "Release gateway, data on ${FS_DESC:-unknown}."
    echo
    echo "| measure | value |"
    echo "|---|---:|"
    echo "| start-up with a backlog of $RECORDS pending records (exec → first \`/readyz\` 200), median of $RUNS | **$START_MEDIAN s** (runs: $START_LIST s; target < 0.5 s) |"
    echo "| WAL size on disk / time to fill it over HTTP (archive sink paused) | $WAL_MB MB / $FILL_SECS s |"
    echo "| check (every record accepted; each start reports the whole backlog) | $CHECK |"
    echo "| idle RSS, default config, ${IDLE_SECS}s after ready, \`MIMALLOC_ARENA_EAGER_COMMIT=0\` (\`make run\`, the image) | $(kib_to_mb "$IDLE_LEAN_KB") MB (target ≤ 20 MB) |"
    echo "| idle RSS, the same with the allocator's default | $(kib_to_mb "$IDLE_EAGER_KB") MB |"
    echo "| release binary | $(awk -v b="$BIN_BYTES" 'BEGIN { printf "%.1f", b / 1e6 }') MB (${BIN_KIND:-unknown}) |"
} | tee -a "$RESULTS"
[ "$CHECK" = OK ] || die "check failed: $CHECK"
