#!/usr/bin/env bash
# Installs what `make test` needs, skipping what is already there, so a fresh
# machine and a warm one both work. Later test suites (Mosquitto, a Kafka-API
# broker, an S3 server, Prometheus) add their installs here.
set -euo pipefail

need() { command -v "$1" >/dev/null 2>&1; }

if ! need cargo; then
  echo "test-deps: cargo is required (install Rust with rustup)" >&2
  exit 1
fi

# rustfmt and clippy are part of the lint step.
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$comp"
  fi
done

# Building rusqlite (bundled SQLite) and openssl needs a C compiler and the
# OpenSSL headers.
missing=()
need cc || missing+=(gcc)
need pkg-config || missing+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test-deps: installing ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
echo "test-deps: ok"
