#!/usr/bin/env bash
# What the gateway needs to build, and what its tests need to run: one list
# and one script, skipping what is already installed, so a fresh machine and
# a warm one both work.
#
#   scripts/deps.sh build   # before `make run` / `make build`: the build dependencies
#   scripts/deps.sh test    # before `make test`: the build dependencies, then the test servers and tools
#
# As root it installs what is missing with apt; otherwise it uses `sudo -n`
# when that works without a password, and else names the missing packages in
# one line and exits 1.
set -euo pipefail

MODE="${1:-test}"
case "$MODE" in build|test) ;; *) echo "deps.sh: build or test, not '$MODE'" >&2; exit 2 ;; esac

need() { command -v "$1" >/dev/null 2>&1; }

# apt_install PKG...: installs the packages (root, or sudo without a password)
# or names them in one line and fails.
apt_install() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if need sudo && sudo -n true 2>/dev/null; then
      sudo="sudo -n"
    else
      echo "deps: missing $*; install them with: sudo apt-get install -y $*" >&2
      exit 1
    fi
  fi
  echo "deps: installing $*"
  $sudo apt-get update -qq
  # Debian's postinst tries to start the mosquitto and prometheus services;
  # the tests start their own brokers and Prometheus, so a refused service
  # start is fine.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" || {
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || { echo "deps: $p failed to install" >&2; exit 1; }; done
  }
}

if ! need cargo; then
  echo "deps: cargo is required (install Rust with rustup)" >&2
  exit 1
fi

# rustfmt and clippy are part of the lint step.
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$comp"
  fi
done

# The build: a C compiler and make for the bundled SQLite and librdkafka
# (its own configure + make, no cmake), and pkg-config with the OpenSSL
# headers for openssl-sys. zlib comes from zlib1g (essential on Debian) or
# is built by libz-sys. The binary links libc, libssl/libcrypto and libz,
# nothing else (tests/api/package.rs checks it with ldd).
missing=()
need cc || missing+=(gcc)
need make || missing+=(make)
need pkg-config || missing+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi
if [ "$MODE" = build ]; then
  exit 0
fi

# The tests: the MQTT tests run a real Mosquitto, publish with mosquitto_pub
# and make throwaway certificates with the openssl CLI.
missing=()
need openssl || missing+=(openssl)
need curl || missing+=(curl)                                     # the HTTPS test's client
need mosquitto || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
need mosquitto_pub || missing+=(mosquitto-clients)
need prometheus || missing+=(prometheus)                         # the observability tests: prometheus + promtool
need debootstrap || missing+=(debootstrap)                       # the package test's Debian root
need systemd-analyze || missing+=(systemd)                       # ... and `systemd-analyze verify` of the unit
need nginx || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)  # make bench: the HTTP ceiling (nginx answering 202)
[ -x /usr/bin/chromium ] || missing+=(chromium)                  # the status page's browser test (headless)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)       # ... driven by Selenium through /usr/bin/chromedriver
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi
# Debian installs mosquitto in /usr/sbin, which is not on every PATH.
if ! need mosquitto && [ -x /usr/sbin/mosquitto ]; then
  echo "deps: note: mosquitto is /usr/sbin/mosquitto; the tests look there too"
fi
# Python tools for the sink tests (moto as the S3 server, boto3 to read it
# back), the observability tests (oteltap, a real OTLP/HTTP receiver), the
# README's uplink consumers (zstandard, paho-mqtt:
# tests/support/readme_consumers.py) and the status page's browser test
# (selenium, always with Debian's /usr/bin/chromedriver: no driver or browser
# is ever downloaded) live in a virtualenv of their own.
VENV="$(cd "$(dirname "$0")/.." && pwd)/.venv-test"
if ! "$VENV/bin/python" -c "import boto3, moto, confluent_kafka, oteltap, opentelemetry.proto, jsonschema, yaml, zstandard, paho.mqtt, selenium" >/dev/null 2>&1 || [ ! -x "$VENV/bin/moto_server" ]; then
  echo "deps: creating $VENV (moto, boto3, confluent-kafka, oteltap, jsonschema, zstandard, paho-mqtt, selenium)"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    apt_install python3-venv
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check 'moto[s3]' flask flask-cors boto3 confluent-kafka oteltap opentelemetry-proto jsonschema pyyaml zstandard paho-mqtt selenium
fi

# The Kafka-API broker for the kafka sink tests: tansu, built once (10-18 min
# on 2 cores) and reused from ~/.cargo/bin. A default-feature build has no
# storage engine, hence the features.
if ! command -v tansu >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/tansu" ]; then
  echo "deps: installing tansu (cargo install, takes a while the first time)"
  cargo install tansu --version 0.6.0 --features dynostore,libsql
fi
# The package test: cargo-deb builds the .deb, and a cached minimal Debian
# root (debootstrap, about a minute once) is where it is installed.
if ! cargo deb --version >/dev/null 2>&1; then
  echo "deps: installing cargo-deb"
  cargo install cargo-deb --version 3.8.0 --locked
fi
if [ "$(id -u)" = 0 ]; then
  "$(dirname "$0")/debian-root.sh"
fi
# Supply chain: `make lint` runs cargo deny (licenses, bans, sources).
if ! cargo deny --version >/dev/null 2>&1; then
  echo "deps: installing cargo-deny"
  cargo install cargo-deny --version 0.20.2 --locked
fi
echo "deps: ok"
