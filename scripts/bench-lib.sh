# Shell helpers shared by the benchmark scripts (sourced, not run).
# Set BENCH_NAME (prefixes error messages) before sourcing.

# The project root, where cargo builds (absolute) and where results go.
ROOT="${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
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
