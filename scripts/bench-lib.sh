# Shell helpers shared by the benchmark scripts (sourced, not run).
# Set BENCH_NAME (prefixes error messages) before sourcing.

# The project root, where cargo builds (absolute) and where results go.
ROOT="${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
# The profile measured: dist (what ships: the .deb and the image);
# BENCH_PROFILE=release measures the quick build of `make run`.
BENCH_PROFILE="${BENCH_PROFILE:-dist}"
export BENCH_PROFILE
BIN_DIR="$TARGET_DIR/$BENCH_PROFILE"
RESULTS_DIR="$ROOT/bench/results"
RESULTS="$RESULTS_DIR/latest.md"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf '%s: error: %s\n' "${BENCH_NAME:-bench}" "$*" >&2; exit 1; }

# stop_pid PID SECONDS: TERM, wait up to SECONDS, then KILL.
stop_pid() {
    local pid="$1" secs="$2" i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid did not stop within ${secs}s of SIGTERM: killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# remove_work DIR: deletes the scratch directory unless BENCH_KEEP=1.
remove_work() {
    [ -n "$1" ] && [ -d "$1" ] || return 0
    if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept $1"; else rm -rf "$1"; fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_port: a loopback port nothing listens on (the kernel picks it).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# machine_ticks: "busy total" jiffies of the whole machine.
machine_ticks() { awk '/^cpu / {busy=$2+$3+$4+$7+$8+$9; print busy, busy+$5+$6}' /proc/stat; }

# thread_ticks PID: "tid name ticks" per thread.
thread_ticks() {
    local t stat comm
    for t in /proc/"$1"/task/*; do
        stat="$(cat "$t/stat" 2>/dev/null)" || continue
        comm="$(tr ' |' '_/' <"$t/comm" 2>/dev/null)" || continue
        stat="${stat##*) }"
        # shellcheck disable=SC2086
        set -- $stat
        echo "${t##*/} $comm $(( ${12} + ${13} ))"
    done
}

# metric_sum FILE NAME [LABEL=VALUE ...]: sum of the samples of NAME carrying every given label.
metric_sum() {
    local file="$1" name="$2"; shift 2
    awk -v name="$name" -v want="$*" '
        $0 ~ /^#/ { next }
        {
            split($1, a, "{"); if (a[1] != name) next
            n = split(want, w, " "); ok = 1
            for (i = 1; i <= n; i++) {
                split(w[i], kv, "="); pat = kv[1] "=\"" kv[2] "\""
                if (index($1, pat) == 0) ok = 0
            }
            if (ok) s += $NF
        }
        END { printf "%.0f\n", s }' "$file"
}

# need_wrk: installs wrk with apt-get when it is missing.
need_wrk() {
    command -v wrk >/dev/null && return 0
    log "wrk is missing: installing it with apt-get"
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y wrk >/dev/null; }
    elif command -v sudo >/dev/null; then
        sudo apt-get install -y wrk >/dev/null 2>&1 || { sudo apt-get update -qq && sudo apt-get install -y wrk >/dev/null; }
    fi
    command -v wrk >/dev/null || die "wrk is required (apt-get install -y wrk)"
}

# cargo_build ARGS...: `cargo build ARGS...`; when BENCH_CARGO_LOCK names a
# lock file, the build holds it (flock), so builds started by other tools
# on this machine that take the same lock never run at the same time.
# BENCH_SKIP_BUILD=1 (set by `make bench`, which builds everything once
# first, so that every script measures the same binaries): no build.
cargo_build() {
    if [ "${BENCH_SKIP_BUILD:-0}" = 1 ]; then
        log "BENCH_SKIP_BUILD=1: not building (cargo build $*)"
    elif [ -n "${BENCH_CARGO_LOCK:-}" ] && command -v flock >/dev/null; then
        flock "$BENCH_CARGO_LOCK" cargo build "$@"
    else
        cargo build "$@"
    fi
}

# release_gateway: builds the gateway of BENCH_PROFILE (cargo_build honours
# BENCH_SKIP_BUILD and BENCH_CARGO_LOCK) and sets GATEWAY_BIN to it.
release_gateway() {
    log "building the $BENCH_PROFILE gateway (cargo waits if another build holds the lock)"
    cargo_build --profile "$BENCH_PROFILE" -p gateway --bin gateway
    GATEWAY_BIN="$BIN_DIR/gateway"
    [ -x "$GATEWAY_BIN" ] || die "$GATEWAY_BIN was not built"
}

# The figures of one `make bench`, one JSON object a line; the Makefile
# resets the file first and scripts/bench-report.py turns it into
# bench/results/latest.json (and a summary table in latest.md) last.
FIGURES="${BENCH_FIGURES:-$RESULTS_DIR/figures.jsonl}"
export BENCH_FIGURES="$FIGURES"

# figure NAME VALUE UNIT [--ceiling NAME VALUE] [--target TEXT] [--check EXPR] [--note TEXT]
# Records one figure. The ceiling is what VALUE is divided by (ratio = VALUE /
# ceiling), measured in the same run. TARGET is the issue's wording; EXPR
# ("ratio >= 0.95", "value < 0.5", ...) is how the report decides `met`.
# An empty or non-numeric VALUE is recorded as null (the run did not produce it).
# Each figure also records `gateway --version` of the release binary as it is
# then (commit and build time), so a binary rebuilt during a run shows.
figure() {
    [ $# -ge 3 ] || die "figure: NAME VALUE UNIT expected"
    mkdir -p "$(dirname "$FIGURES")"
    local build=""
    [ ! -x "$BIN_DIR/gateway" ] || build="$("$BIN_DIR/gateway" --version 2>/dev/null || true)"
    python3 - "$FIGURES" "${BENCH_NAME:-bench}" "$build" "$@" <<'PY' || log "could not record figure $1"
import json, sys, time
path, source, build, name, value, unit, *rest = sys.argv[1:]
def num(s):
    s = s.strip()
    if s.lstrip("-").isdigit():
        return int(s)
    try:
        v = float(s)
    except ValueError:
        return None
    return v if v == v and abs(v) != float("inf") else None
fig = {"name": name, "value": num(value), "unit": unit, "source": source,
       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build": build or None}
i = 0
while i < len(rest):
    opt = rest[i]
    if opt == "--ceiling" and i + 2 < len(rest):
        fig["ceiling"] = {"name": rest[i + 1], "value": num(rest[i + 2])}
        i += 3
    elif opt in ("--target", "--check", "--note") and i + 1 < len(rest):
        fig[opt[2:]] = rest[i + 1]
        i += 2
    else:
        sys.exit(f"figure {name}: unexpected argument {opt!r}")
with open(path, "a") as f:
    f.write(json.dumps(fig) + "\n")
PY
}

# need_nginx: installs nginx-light with apt-get when nginx is missing (the
# "does nothing" HTTP ceiling of the HTTP ingest bench); NGINX is its path,
# empty when it could not be installed.
need_nginx() {
    NGINX="$(command -v nginx || true)"
    [ -n "$NGINX" ] || { [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx; } || true
    [ -z "$NGINX" ] || return 0
    log "nginx is missing: installing nginx-light with apt-get"
    local sudo=""
    [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null && sudo=sudo; } || return 0
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null 2>&1 \
        || { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null 2>&1; } \
        || true
    NGINX="$(command -v nginx || true)"
    [ -n "$NGINX" ] || { [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx; } || true
}
