#!/usr/bin/env sh
# Development certificates for the gateway, the broker and clients.
#
#   certs/gen-dev-certs.sh OUT_DIR [CLIENT_CN ...]
#
# Writes into OUT_DIR (created; nothing is overwritten, so a second run only
# adds missing clients):
#   ca.crt, ca.key            a throwaway CA (CN "iot-gateway dev CA")
#   server.crt, server.key    a server certificate for the broker and the
#                             gateway's HTTPS, valid for $SERVER_SANS
#                             (default localhost, 127.0.0.1, mosquitto, gateway)
#   CN.crt, CN.key            one client certificate per CLIENT_CN (CN = the
#                             name: a device id, "gateway" for the gateway's
#                             MQTT client, "gateway-admin" for the admin API)
# Keys are EC P-256 in PKCS#8 PEM (what the gateway's TLS stack reads).
# Validity: $CERT_DAYS days (default 825). Keys are generated here and never
# committed (certs/out/ is git-ignored). These are for development and tests:
# the keys are readable by every local user so containers running as
# non-root users can load them.
set -eu

if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [CLIENT_CN ...]" >&2
    exit 2
fi
out=$1
shift
days=${CERT_DAYS:-825}
sans=${SERVER_SANS:-DNS:localhost,IP:127.0.0.1,DNS:mosquitto,DNS:gateway}

mkdir -p "$out"
cd "$out"

key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key"
}

if [ ! -f ca.crt ]; then
    key ca
    openssl req -x509 -new -key ca.key -days "$days" -subj "/CN=iot-gateway dev CA" -out ca.crt
fi

# sign NAME EXTENSIONS: a key and a certificate with CN=NAME signed by the CA.
sign() {
    name=$1
    if [ -f "$name.crt" ]; then
        return 0
    fi
    key "$name"
    openssl req -new -key "$name.key" -subj "/CN=$name" -out "$name.csr"
    printf '%s\n' "$2" >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days "$days" -extfile "$name.ext" -out "$name.crt" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
}

sign server "subjectAltName=$sans
extendedKeyUsage=serverAuth"
for client in "$@"; do
    case $client in
    */* | .* | "")
        echo "bad client name: $client" >&2
        exit 2
        ;;
    esac
    sign "$client" "extendedKeyUsage=clientAuth"
done
chmod 644 ./*.crt ./*.key
chmod 600 ca.key
echo "certificates in $(pwd): ca.crt, server.crt$(for c in "$@"; do printf ', %s.crt' "$c"; done)"
