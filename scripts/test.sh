#!/usr/bin/env bash
# `make test` after the lint step: every test of the workspace, then one
# summary line over all test binaries ("N passed, N failed").
set -euo pipefail
cd "$(dirname "$0")/.."
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --color never 2>&1 | tee "$log" || status=$?
passed=$(grep -Eo '^test result: .*' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .*' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
# The fault harness at quick scale on the binaries just built (crash loop,
# sink outages, broker restart, full disk; about 3 minutes): any loss fails.
chaos=skipped
if [ "$status" -eq 0 ]; then
  if scripts/chaos.sh --scale quick --out target/chaos-quick.md; then chaos=passed; else chaos=failed; status=1; fi
fi
# The fleet simulation at quick scale (5 gateways, every scenario of
# `make fleet-sim`; about 2-3 minutes).
fleet=skipped
if [ "$status" -eq 0 ]; then
  if scripts/fleet-sim.py --n 5 --idle-secs 20 --out target/fleet-quick.md; then fleet=passed; else fleet=failed; status=1; fi
fi
echo
echo "summary: ${passed} passed, ${failed} failed; chaos (quick): ${chaos}; fleet-sim (quick): ${fleet}"
if [ "$status" -ne 0 ] || [ "$failed" -ne 0 ] || [ "$passed" -eq 0 ]; then
  exit 1
fi
