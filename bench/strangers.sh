#!/usr/bin/env bash
# What strangers cost kaiwa (docs/architecture.md, "What a stranger can cost"): kaiwa-load
# strangers against `kaiwa serve` with auth on and with auth off, on the default limits and
# timeouts: 300 upgrades that never speak, 8 first frames of 30 MB, 300 HTTP requests whose
# headers never end, and one real client among them. With BASELINE set to another kaiwa binary
# (an earlier commit's, say), the same runs against it first, for a before and after in one go.
#
#   bench/strangers.sh
#   BASELINE=/tmp/before/target/release/kaiwa bench/strangers.sh
#
# Settings (environment): SILENT (300), LARGE (8), LARGE_BYTES (30000000), SLOW_HEADERS (300),
# PORT (18082), BASELINE.
set -euo pipefail
cd "$(dirname "$0")/.."

SILENT=${SILENT:-300}
LARGE=${LARGE:-8}
LARGE_BYTES=${LARGE_BYTES:-30000000}
SLOW_HEADERS=${SLOW_HEADERS:-300}
PORT=${PORT:-18082}
BASELINE=${BASELINE:-}
out=${OUT:-target/bench/strangers-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
work=$(mktemp -d "$PWD/target/bench-data.XXXXXX")
# shellcheck source=bench/common.sh
source bench/common.sh
trap 'stop_server; rm -rf "$work"' EXIT

step "building in release mode"
cargo build --release --locked -p kaiwa -p kaiwa-load --bins

secret=$(head -c 48 /dev/urandom | base64)
# One run: the server `binary`, named `name`, with auth on or off.
attack() {
  local binary=$1 name=$2 auth=$3
  local -a env=()
  [[ "$auth" == on ]] && env=(KAIWA_AUTH_SECRET="$secret")
  step "$name: auth $auth"
  env "${env[@]}" "$binary" serve --bind "127.0.0.1:$PORT" --data-dir "$work/$name-$auth" \
    --log warn --reply-delay-scale 0 >"$out/$name-$auth.server.log" 2>&1 &
  server_pid=$!
  wait_for_port "$PORT"
  env "${env[@]}" target/release/kaiwa-load strangers --url "ws://127.0.0.1:$PORT/ws" \
    --server-pid "$server_pid" --silent "$SILENT" --large "$LARGE" --large-bytes "$LARGE_BYTES" \
    --slow-headers "$SLOW_HEADERS" --wait 60 --json "$out/$name-$auth.json" | tee "$out/$name-$auth.txt" || true
  stop_server
}

for auth in on off; do
  [[ -n "$BASELINE" ]] && attack "$BASELINE" baseline "$auth"
  attack target/release/kaiwa kaiwa "$auth"
done
step "reports in $out"
