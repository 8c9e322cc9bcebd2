#!/usr/bin/env bash
# Benchmarks kaiwa on this machine and prints one table (README, "Load testing and benchmarks"):
#   1. spec        the exercise's scenario against kaiwa on its default limits and delays
#   2. echo        a bare WebSocket echo server (kaiwa-echo): the ceiling in messages/second
#   3. kaiwa       kaiwa end to end (reply delays off, high limits), same clients: a ratio of 2;
#                  kaiwa-auth the same with auth on, every client with a token of its own
#   4. rate-N      p99 latency at fixed offered rates (open loop)
#   5. idle-N      resident memory per idle native connection, read from /proc/<pid>/status;
#                  idle-legacy-N and idle-path-N the same for the other protocols
#                  (kaiwa-load connections --dialect legacy|path)
#   6. store       the SQLite store alone, concurrent inserts, group commit
# With PostgreSQL (on by default; WITH_POSTGRES=0 leaves it out), beside the SQLite figures:
#   3. kaiwa-postgres, 4. rate-1000-postgres, 6. store-postgres: the same, with kaiwa's store on
#      a fresh database of the PostgreSQL server in POSTGRES, dropped afterwards
# Everything runs on loopback. Reports land in target/bench/<UTC time>/ as JSON, with the table;
# beside each message run's JSON, its plot (kaiwa-load --plot: throughput and latency over the
# run, latency by message type) as SVG.
#
# Settings (environment): CLIENTS (50), DURATION seconds (10), RATES ("1000 5000"),
# IDLE ("10000 19000": native connections, a run each), IDLE_DIALECTS ("legacy path"; "" leaves
# them out), IDLE_DIALECT_CLIENTS (10000: one run of each dialect), ONLY (idle: the idle
# connections alone, no PostgreSQL needed), STORE_MESSAGES (200000), PORT (18082),
# ECHO_PORT (18090), WITH_POSTGRES (1), POSTGRES (postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-50}
DURATION=${DURATION:-10}
RATES=${RATES:-"1000 5000"}
IDLE=${IDLE:-"10000 19000"}
IDLE_DIALECTS=${IDLE_DIALECTS-"legacy path"}
IDLE_DIALECT_CLIENTS=${IDLE_DIALECT_CLIENTS:-10000}
ONLY=${ONLY:-}
STORE_MESSAGES=${STORE_MESSAGES:-200000}
PORT=${PORT:-18082}
ECHO_PORT=${ECHO_PORT:-18090}
out=${OUT:-target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
# On the real disk, not tmpfs: the store's fsyncs are part of what is measured.
work=$(mktemp -d "$PWD/target/bench-data.XXXXXX")
# shellcheck source=bench/common.sh
source bench/common.sh
WITH_POSTGRES=${WITH_POSTGRES:-1}
# The idle runs alone need no PostgreSQL.
if [[ "$ONLY" == idle ]]; then WITH_POSTGRES=0; fi
POSTGRES=${POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}
pg_databases=()

cleanup() {
  stop_server
  for db in "${pg_databases[@]}"; do
    psql -q "$POSTGRES" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# A fresh PostgreSQL database for one run, in $pg_url (not in a subshell: cleanup drops it).
pg_database() {
  local name="kaiwa_bench_$1_$$"
  psql -q "$POSTGRES" -c "CREATE DATABASE $name" >/dev/null
  pg_databases+=("$name")
  pg_url="${POSTGRES%/*}/$name"
}

if [[ "$WITH_POSTGRES" == 1 ]] && ! psql -q "$POSTGRES" -c "SELECT 1" >/dev/null 2>&1; then
  echo "PostgreSQL does not answer at $POSTGRES: start it, set POSTGRES, or WITH_POSTGRES=0" >&2
  exit 1
fi

# The flags kaiwa is benchmarked with: no reply delays, limits out of the way, idle
# connections never closed.
FAST=(--reply-delay-scale 0 --max-clients 20000 --max-in-flight 100000
  --first-message-timeout 86400 --heartbeat-timeout 86400)


step "building in release mode"
cargo build --release --locked -p kaiwa -p kaiwa-load --bins --example store_bench

if [[ "$ONLY" != idle ]]; then
step "spec: 100 clients, 2,000 messages, default limits (50 clients) and delays"
start_kaiwa spec
load spec --url "ws://127.0.0.1:$PORT/ws" --label spec --json "$out/1-spec.json" \
  --plot "$out/1-spec.svg" || true
stop_server

step "echo ceiling: $CLIENTS clients for ${DURATION}s"
target/release/kaiwa-echo --bind "127.0.0.1:$ECHO_PORT" >"$out/echo.server.log" 2>&1 &
server_pid=$!
wait_for_port "$ECHO_PORT"
load throughput --echo --url "ws://127.0.0.1:$ECHO_PORT/ws" --clients "$CLIENTS" \
  --duration "$DURATION" --label echo --json "$out/2-echo.json" --plot "$out/2-echo.svg" || true
stop_server

step "kaiwa end to end: $CLIENTS clients for ${DURATION}s"
start_kaiwa throughput "${FAST[@]}"
load throughput --url "ws://127.0.0.1:$PORT/ws" --clients "$CLIENTS" --duration "$DURATION" \
  --label kaiwa --json "$out/3-kaiwa.json" --plot "$out/3-kaiwa.svg" || true
stop_server

step "kaiwa end to end with auth on (every client signs in with its own token): $CLIENTS clients for ${DURATION}s"
# The secret goes through the environment of both, never on a command line.
bench_secret=$(head -c 48 /dev/urandom | base64)
KAIWA_AUTH_SECRET="$bench_secret" start_kaiwa throughput-auth "${FAST[@]}"
KAIWA_AUTH_SECRET="$bench_secret" load throughput --url "ws://127.0.0.1:$PORT/ws" \
  --clients "$CLIENTS" --duration "$DURATION" --label kaiwa-auth --json "$out/3-kaiwa-auth.json" \
  --plot "$out/3-kaiwa-auth.svg" || true
stop_server

step "kaiwa end to end, --sqlite-synchronous normal: $CLIENTS clients for ${DURATION}s"
start_kaiwa throughput-normal "${FAST[@]}" --sqlite-synchronous normal
load throughput --url "ws://127.0.0.1:$PORT/ws" --clients "$CLIENTS" --duration "$DURATION" \
  --label kaiwa-sync-normal --json "$out/3-kaiwa-normal.json" --plot "$out/3-kaiwa-normal.svg" \
  || true
stop_server

if [[ "$WITH_POSTGRES" == 1 ]]; then
  step "kaiwa end to end on PostgreSQL: $CLIENTS clients for ${DURATION}s"
  pg_database throughput
  start_kaiwa throughput-postgres "${FAST[@]}" --database-url "$pg_url"
  load throughput --url "ws://127.0.0.1:$PORT/ws" --clients "$CLIENTS" --duration "$DURATION" \
    --label kaiwa-postgres --json "$out/3-kaiwa-postgres.json" \
    --plot "$out/3-kaiwa-postgres.svg" || true
  stop_server
fi

for rate in $RATES; do
  step "kaiwa at $rate msg/s offered for ${DURATION}s"
  start_kaiwa "rate-$rate" "${FAST[@]}"
  load throughput --url "ws://127.0.0.1:$PORT/ws" --clients "$CLIENTS" --rate "$rate" \
    --duration "$DURATION" --label "rate-$rate" --json "$out/4-rate-$rate.json" \
    --plot "$out/4-rate-$rate.svg" || true
  stop_server
done

if [[ "$WITH_POSTGRES" == 1 ]]; then
  step "kaiwa on PostgreSQL at 1000 msg/s offered for ${DURATION}s"
  pg_database rate
  start_kaiwa rate-1000-postgres "${FAST[@]}" --database-url "$pg_url"
  load throughput --url "ws://127.0.0.1:$PORT/ws" --clients "$CLIENTS" --rate 1000 \
    --duration "$DURATION" --label rate-1000-postgres --json "$out/4-rate-1000-postgres.json" \
    --plot "$out/4-rate-1000-postgres.svg" || true
  stop_server
fi

fi

for n in $IDLE; do
  step "$n idle connections"
  start_kaiwa "idle-$n" "${FAST[@]}"
  load connections --url "ws://127.0.0.1:$PORT/ws" --clients "$n" --server-pid "$server_pid" \
    --label "idle-$n" --json "$out/5-idle-$n.json" || true
  stop_server
done
for dialect in $IDLE_DIALECTS; do
  n=$IDLE_DIALECT_CLIENTS
  step "$n idle $dialect connections"
  start_kaiwa "idle-$dialect-$n" "${FAST[@]}"
  load connections --dialect "$dialect" --url "ws://127.0.0.1:$PORT/ws" --clients "$n" \
    --server-pid "$server_pid" --label "idle-$dialect-$n" --json "$out/5-idle-$dialect-$n.json" \
    || true
  stop_server
done

if [[ "$ONLY" != idle ]]; then
step "SQLite store alone: $STORE_MESSAGES messages, 64 concurrent writers"
target/release/examples/store_bench --messages "$STORE_MESSAGES" --writers 64 \
  --data-dir "$work/store" --label store >"$out/6-store.json"

if [[ "$WITH_POSTGRES" == 1 ]]; then
  step "PostgreSQL store alone: $STORE_MESSAGES messages, 64 concurrent writers"
  pg_database store
  target/release/examples/store_bench --messages "$STORE_MESSAGES" --writers 64 \
    --database-url "$pg_url" --label store-postgres >"$out/6-store-postgres.json"
fi
fi

step "results in $out"
{
  echo "kaiwa benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, commit $(git describe --always --dirty)"
  target/release/kaiwa-load table "$out"/[0-9]-*.json
} | tee "$out/table.txt"
