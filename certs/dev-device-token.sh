#!/usr/bin/env sh
# A device token for development: appends "DEVICE:sha256(token)" to
# OUT_DIR/device-tokens (the gateway's http.device_tokens_file) and writes the
# token itself to OUT_DIR/DEVICE.token (mode 0600). Does nothing when the
# device already has a token. Same format as `gateway token new DEVICE`.
#
#   certs/dev-device-token.sh OUT_DIR DEVICE
set -eu
if [ $# -ne 2 ]; then
    echo "usage: $0 OUT_DIR DEVICE" >&2
    exit 2
fi
out=$1
device=$2
case $device in
[A-Za-z0-9]*) ;;
*)
    echo "bad device id: $device" >&2
    exit 2
    ;;
esac
mkdir -p "$out"
if [ -f "$out/$device.token" ]; then
    exit 0
fi
token=$(openssl rand -hex 32)
hash=$(printf '%s' "$token" | sha256sum | cut -d' ' -f1)
(umask 077 && printf '%s\n' "$token" >"$out/$device.token")
printf '%s:%s\n' "$device" "$hash" >>"$out/device-tokens"
chmod 644 "$out/device-tokens"
echo "token for $device in $out/$device.token"
