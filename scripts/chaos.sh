#!/usr/bin/env bash
# Fault harness behind `make chaos`: kill -9 loops, sink outages (killed and
# frozen), ingest broker restarts, a full disk, power cuts (the data dir on
# tools/powercut-fs, a FUSE filesystem that forgets unsynced writes) and a
# soak, each checked for zero loss of acknowledged records at every sink
# (scripts/chaos.py says what each scenario does and checks).
#
#   scripts/chaos.sh [--scale quick|full] [chaos.py options: --only NAME,... --seed N --keep --out FILE]
#
# full  (default; CHAOS_SCALE=full): builds the release binaries (gateway,
#       loadgen, powercut-fs), then runs every scenario at full length (the
#       soak alone is 2 x 1 hour).
# quick (CI; about 4-5 minutes): the debug binaries CI has already built
#       (built here only when missing); no soak.
#
# Runs as root (disk_full mounts a tmpfs, powercut a FUSE filesystem). Needs
# Mosquitto, tansu and the .venv-test virtualenv: scripts/deps.sh test
# installs what is missing.
# Results: bench/results/chaos-latest.md; exit status 1 if any scenario failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac

SCALE="${CHAOS_SCALE:-full}"
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --scale) SCALE="${2:?--scale needs quick or full}"; shift 2 ;;
        --scale=*) SCALE="${1#*=}"; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

log() { printf '==> %s\n' "$*" >&2; }

if ! [ -x "$ROOT/.venv-test/bin/moto_server" ] || ! command -v mosquitto_sub >/dev/null \
    || ! { [ -x "$HOME/.cargo/bin/tansu" ] || command -v tansu >/dev/null; }; then
    log "test dependencies missing: running scripts/deps.sh test"
    scripts/deps.sh test
fi

case "$SCALE" in
    full)
        log "building the release binaries (gateway, loadgen, powercut-fs)"
        cargo build --release -p gateway -p powercut-fs --bins
        BIN_DIR="$TARGET_DIR/release"
        ;;
    quick)
        BIN_DIR="$TARGET_DIR/debug"
        if ! [ -x "$BIN_DIR/gateway" ] || ! [ -x "$BIN_DIR/loadgen" ]; then
            log "no debug binaries in $BIN_DIR: building them"
            cargo build -p gateway --bins
        fi
        if ! [ -x "$BIN_DIR/powercut-fs" ]; then
            log "no powercut-fs in $BIN_DIR: building it"
            cargo build -p powercut-fs --bins
        fi
        ;;
    *)
        echo "chaos.sh: --scale must be quick or full, not '$SCALE'" >&2
        exit 2
        ;;
esac

# --bin-dir first, so that one given on the command line wins.
exec python3 "$ROOT/scripts/chaos.py" --scale "$SCALE" --bin-dir "$BIN_DIR" ${ARGS[@]+"${ARGS[@]}"}
