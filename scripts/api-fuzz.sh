#!/usr/bin/env bash
# Fuzzes kaiwa's HTTP API with schemathesis against the OpenAPI document kaiwa serves itself
# (/api/openapi.json), once with auth off and once with auth on (as no one, as a client with a
# token, as the admin). Every check runs except positive_data_acceptance: a client id is at
# most 128 bytes, which a JSON Schema cannot say (maxLength counts characters), so a valid
# long id of multibyte characters would be refused rightly. Any failure fails the run.
#
# Usage: scripts/api-fuzz.sh KAIWA_BINARY ST_BINARY [examples per operation]
set -euo pipefail

kaiwa="$(realpath "${1:?the kaiwa binary}")"
st="$(realpath "${2:?the schemathesis (st) binary}")"
examples="${3:-50}"
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts kaiwa with the given flags on a free port; sets $url.
start() {
  local name="$1"
  shift
  local port
  port="$(free_port)"
  mkdir -p "$work/$name"
  "$kaiwa" serve --bind "127.0.0.1:$port" --data-dir "$work/$name" --reply-delay-scale 0 \
    --database-url "sqlite://$work/$name/kaiwa.db" --openai-api-key "" "$@" \
    >"$work/$name/kaiwa.log" 2>&1 &
  pids+=("$!")
  url="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    if curl -fsS "$url/health" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  cat "$work/$name/kaiwa.log" >&2
  echo "kaiwa ($name) did not start" >&2
  exit 1
}

fuzz() {
  local what="$1"
  shift
  printf '\n--- schemathesis: %s\n' "$what"
  (cd "$work" && "$st" run "$url/api/openapi.json" --checks all \
    --exclude-checks positive_data_acceptance --max-examples "$examples" \
    --no-color "$@")
}

start anonymous
fuzz "auth off"

export KAIWA_AUTH_SECRET="api-fuzz-secret-long-enough-for-hs256-$$"
admin="api-fuzz-admin-token-$$"
start authenticated --admin-token "$admin"
client_token="$("$kaiwa" token --client-id fuzzer --ttl 1h)"
fuzz "auth on, no token"
fuzz "auth on, a client's token" -H "Authorization: Bearer $client_token"
fuzz "auth on, the admin token" -H "Authorization: Bearer $admin"
unset KAIWA_AUTH_SECRET
