#!/usr/bin/env bash
# TLS ended by HAProxy in front of kaiwa, for real: checks deploy/haproxy.cfg with `haproxy -c`
# (with a certificate made here), then starts the cluster of scripts/cluster.sh with the given
# kaiwa binary and checks that https:// and a WebSocket upgrade go through its TLS port, and
# that plain HTTP there is refused. scripts/test.sh runs it.
#
#   scripts/check-tls-proxy.sh path/to/kaiwa
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { printf 'error: %s\n' "$*" >&2; exit 1; }
[ $# -eq 1 ] && [ -x "$1" ] || fail "usage: $0 path/to/kaiwa"
command -v openssl >/dev/null || fail "openssl is needed to make the test certificate"
command -v curl >/dev/null || fail "curl is needed to check the TLS port"

work=$(mktemp -d)
export RUN_DIR="$work/cluster" BINARY="$1" NAME="kaiwa_tls_check_$$"
export PORT=18082 TLS_PORT=18443 BASE_PORT=18200
cleanup() {
  scripts/cluster.sh down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# The container configuration: syntax, and that the TLS frontend loads a certificate directory.
mkdir -p "$work/certs"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=localhost -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat "$work/cert.pem" "$work/key.pem" >"$work/certs/kaiwa.pem"
scripts/cluster.sh up >/dev/null 2>"$work/up.log" || { cat "$work/up.log" >&2; fail "the cluster did not start"; }
KAIWA_TLS_DIR="$work/certs" haproxy -c -q -f deploy/haproxy.cfg || fail "haproxy -c rejects deploy/haproxy.cfg"
echo "deploy/haproxy.cfg: valid, with its TLS frontend"

ca="$RUN_DIR/tls/cert.pem"
health=$(curl -sS --fail --cacert "$ca" "https://localhost:$TLS_PORT/health") \
  || fail "GET https://localhost:$TLS_PORT/health failed through HAProxy"
case "$health" in *'"status":"ok"'*) ;; *) fail "unexpected /health over TLS: $health" ;; esac
echo "https://localhost:$TLS_PORT/health through HAProxy: $health"

# The upgrade must reach a gateway and come back 101 over TLS; --max-time ends the tunnel.
upgrade=$(curl -sS --http1.1 -i --max-time 2 --cacert "$ca" \
  -H "Connection: Upgrade" -H "Upgrade: websocket" -H "Sec-WebSocket-Version: 13" \
  -H "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==" "https://localhost:$TLS_PORT/ws" 2>/dev/null || true)
case "$upgrade" in "HTTP/1.1 101"*) ;; *) fail "no WebSocket upgrade over TLS: ${upgrade%%$'\r'*}" ;; esac
echo "wss://localhost:$TLS_PORT/ws through HAProxy: ${upgrade%%$'\r'*}"

if curl -sS --max-time 2 "http://localhost:$TLS_PORT/health" >/dev/null 2>&1; then
  fail "plain HTTP on the TLS port was answered"
fi
echo "plain HTTP on the TLS port: refused"
