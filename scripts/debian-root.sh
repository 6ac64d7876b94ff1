#!/usr/bin/env bash
# A minimal Debian bookworm root for the package test (tests/api/package.rs),
# made once with debootstrap and cached outside the repository (a clean
# clone reuses it): $GATEWAY_TEST_CACHE (default ~/.cache/iot-gateway).
# It holds systemd (for `systemd-analyze verify --root`) and the image's
# runtime packages (ca-certificates libssl3 libcurl4),
# so the same root stands in for the container.
#
#   scripts/debian-root.sh                 make it if missing
#   scripts/debian-root.sh --print-path    the same, then print its path
set -euo pipefail
CACHE="${GATEWAY_TEST_CACHE:-$HOME/.cache/iot-gateway}"
ROOT="$CACHE/bookworm-systemd"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if [ ! -x "$ROOT/usr/bin/dpkg" ]; then
    command -v debootstrap >/dev/null || { echo "debian-root: debootstrap is missing (scripts/deps.sh test installs it)" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "debian-root: debootstrap needs root" >&2; exit 1; }
    mkdir -p "$CACHE"
    TMP="$CACHE/bookworm-systemd.tmp"
    rm -rf "$TMP"
    echo "debian-root: debootstrap bookworm into $ROOT (a few minutes, once)" >&2
    debootstrap --variant=minbase --include=ca-certificates,libssl3,libcurl4,systemd \
        bookworm "$TMP" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n' >"$TMP/etc/hosts"
    rm -rf "$TMP/var/cache/apt/archives"/*.deb
    mv "$TMP" "$ROOT"
fi
if [ "${1:-}" = "--print-path" ]; then echo "$ROOT"; fi
