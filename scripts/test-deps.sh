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
# OpenSSL headers; the MQTT tests run a real Mosquitto, publish with
# mosquitto_pub and make throwaway certificates with the openssl CLI.
missing=()
need cc || missing+=(gcc)
need cmake || missing+=(cmake)                                   # librdkafka (rdkafka cmake-build)
[ -f /usr/include/x86_64-linux-gnu/curl/curl.h ] || [ -f /usr/include/curl/curl.h ] || missing+=(libcurl4-openssl-dev)
need pkg-config || missing+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
need openssl || missing+=(openssl)
need curl || missing+=(curl)                                     # the HTTPS test's client
need mosquitto || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
need mosquitto_pub || missing+=(mosquitto-clients)
need prometheus || missing+=(prometheus)                         # the observability tests: prometheus + promtool
need debootstrap || missing+=(debootstrap)                       # the package test's Debian root
need systemd-analyze || missing+=(systemd)                       # ... and `systemd-analyze verify` of the unit
need nginx || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)  # make bench: the HTTP ceiling (nginx answering 202)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test-deps: installing ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  # Debian's postinst tries to start the mosquitto and prometheus services;
  # the tests start their own brokers and Prometheus, so a refused service
  # start is fine.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" || {
    for p in "${missing[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || { echo "test-deps: $p failed to install" >&2; exit 1; }; done
  }
fi
# Debian installs mosquitto in /usr/sbin, which is not on every PATH.
if ! need mosquitto && [ -x /usr/sbin/mosquitto ]; then
  echo "test-deps: note: mosquitto is /usr/sbin/mosquitto; the tests look there too"
fi
# Python tools for the sink tests (moto as the S3 server, boto3 to read it
# back) and the observability tests (oteltap, a real OTLP/HTTP receiver)
# live in a virtualenv of their own.
VENV="$(cd "$(dirname "$0")/.." && pwd)/.venv-test"
if ! "$VENV/bin/python" -c "import boto3, moto, confluent_kafka, oteltap, opentelemetry.proto, jsonschema, yaml" >/dev/null 2>&1 || [ ! -x "$VENV/bin/moto_server" ]; then
  echo "test-deps: creating $VENV (moto, boto3, confluent-kafka, oteltap, jsonschema)"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check 'moto[s3]' flask flask-cors boto3 confluent-kafka oteltap opentelemetry-proto jsonschema pyyaml
fi

# The Kafka-API broker for the kafka sink tests: tansu, built once (10-18 min
# on 2 cores) and reused from ~/.cargo/bin. A default-feature build has no
# storage engine, hence the features.
if ! command -v tansu >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/tansu" ]; then
  echo "test-deps: installing tansu (cargo install, takes a while the first time)"
  cargo install tansu --version 0.6.0 --features dynostore,libsql
fi
# The package test: cargo-deb builds the .deb, and a cached minimal Debian
# root (debootstrap, about a minute once) is where it is installed.
if ! cargo deb --version >/dev/null 2>&1; then
  echo "test-deps: installing cargo-deb"
  cargo install cargo-deb --version 3.8.0 --locked
fi
if [ "$(id -u)" = 0 ]; then
  "$(dirname "$0")/debian-root.sh"
fi
# Supply chain: `make lint` runs cargo deny (licenses, bans, sources).
if ! cargo deny --version >/dev/null 2>&1; then
  echo "test-deps: installing cargo-deny"
  cargo install cargo-deny --version 0.20.2 --locked
fi
echo "test-deps: ok"
