#!/usr/bin/env bash
# `make fuzz`: every fuzz target (fuzz/fuzz_targets) under libFuzzer for
# FUZZ_SECS seconds each (default 600), starting from the committed seed
# corpora (fuzz/corpus/TARGET) and what earlier runs found
# (fuzz/corpus-local/TARGET, not committed). A crash stops the run and leaves
# its input in fuzz/artifacts/TARGET/: fix it, then copy the input into
# fuzz/corpus/TARGET/ so `make test` replays it from then on.
#
# cargo-fuzz needs nightly-only compiler flags (sanitizers); with one stable
# toolchain, RUSTC_BOOTSTRAP=1 lets stable rustc accept them.
#
#   scripts/fuzz.sh [TARGET ...]       FUZZ_SECS=60 scripts/fuzz.sh topics
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"
SECS="${FUZZ_SECS:-600}"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(telemetry topics routes control config)
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
OUT="$ROOT/bench/results/fuzz-latest.md"
{
    echo "# Fuzzing results (scripts/fuzz.sh)"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit $(git -C "$ROOT" rev-parse --short HEAD)"
    echo "- machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(uname -sr)"
    echo "- $(rustc --version), cargo-fuzz $(cargo fuzz --version | awk '{print $2}'), libFuzzer with AddressSanitizer, ${SECS}s per target"
    echo
    echo "| target | executions | exec/s | corpus entries | coverage (edges) | result |"
    echo "|---|---|---|---|---|---|"
} >"$OUT.tmp"
status=0
for t in "${TARGETS[@]}"; do
    echo "==> fuzzing $t for ${SECS}s" >&2
    log="$(mktemp)"
    result=ok
    mkdir -p "corpus-local/$t"
    cargo fuzz run "$t" "corpus-local/$t" "corpus/$t" -- -max_total_time="$SECS" -print_final_stats=1 -rss_limit_mb=2048 >"$log" 2>&1 || { result="CRASH (fuzz/artifacts/$t)"; status=1; }
    execs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1)
    rate=$(grep -Eo 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1)
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+')
    entries=$(find "corpus/$t" "corpus-local/$t" -type f | wc -l)
    echo "| $t | ${execs:-?} | ${rate:-?} | $entries | ${cov:-?} | $result |" >>"$OUT.tmp"
    [ "$result" = ok ] || tail -30 "$log" >&2
    rm -f "$log"
done
mv "$OUT.tmp" "$OUT"
cat "$OUT"
exit "$status"
