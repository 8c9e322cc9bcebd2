#!/usr/bin/env bash
# Outages under load, as an operator would try them before trusting a cluster: the cluster of
# scripts/cluster.sh with its default limits and reply delays, kaiwa-load --reconnect at a fixed
# rate over both gateways directly, and meanwhile, one after another:
#   RabbitMQ   rabbitmqctl stop_app for BROKER_DOWN seconds, then start_app
#   PostgreSQL pg_ctlcluster restart (fast)
#   gw-2, wk-1 kill -9, started again at once (scripts/cluster.sh restart)
# It prints when each happened and kaiwa-load's report: whether every message got its replies
# and statuses (nothing lost, no processing_failed), the longest time no client got a reply, and
# the longest one client waited. Target (issue 17): the longest silence is the broker's outage
# plus at most 2 s. Reports land in target/bench/outages-<UTC time>/.
#
# It stops and restarts the machine's RabbitMQ and PostgreSQL: run it alone, as root (or as a
# user allowed to run rabbitmqctl and pg_ctlcluster).
#
# Settings (environment): CLIENTS (100), RATE (200 msg/s), DURATION (60 s), BROKER_DOWN (6 s),
# PORT (19082), BASE_PORT (19200), POSTGRES (postgres://postgres@127.0.0.1:5432/postgres),
# AMQP (amqp://guest:guest@127.0.0.1:5672).
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-100}
RATE=${RATE:-200}
DURATION=${DURATION:-60}
BROKER_DOWN=${BROKER_DOWN:-6}
PORT=${PORT:-19082}
BASE_PORT=${BASE_PORT:-19200}
POSTGRES=${POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}
export POSTGRES AMQP="${AMQP:-amqp://guest:guest@127.0.0.1:5672}"
out=${OUT:-target/bench/outages-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
work=$(mktemp -d "$PWD/target/bench-outages.XXXXXX")
# shellcheck source=bench/common.sh
source bench/common.sh
cluster_name="kaiwa_outages_$$"
cluster_up=""
pg_version=$(ls /etc/postgresql)

cleanup() {
  # Whatever happened, the services are left running.
  rabbitmqctl -q start_app >/dev/null 2>&1 || true
  pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start >/dev/null 2>&1 || true
  if [[ -n "$cluster_up" ]]; then cluster down || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# The cluster's defaults (limits, reply delays), but every message inside its window, clients
# enough for the load, and no client closed for being slow to send its first message.
unset OPENAI_API_KEY
export KAIWA_LOG=warn KAIWA_TEXT_WINDOW=00:00-24:00 KAIWA_MAX_CLIENTS=$((CLIENTS * 10)) \
  KAIWA_FIRST_MESSAGE_TIMEOUT=86400

step "building kaiwa and kaiwa-load (release)"
cargo build --release --locked -p kaiwa -p kaiwa-load --bins

cluster_up=1
cluster up
at() { printf '%s  %s\n' "$(date -u +%H:%M:%S.%3N)" "$*" | tee -a "$out/events.txt" >&2; }

step "load: $CLIENTS clients, $RATE msg/s for ${DURATION}s over gw-1 and gw-2, reconnecting"
target/release/kaiwa-load throughput --url "ws://127.0.0.1:$((BASE_PORT + 1))/ws" \
  --url "ws://127.0.0.1:$((BASE_PORT + 2))/ws" --reconnect --clients "$CLIENTS" --rate "$RATE" \
  --duration "$DURATION" --label outages --json "$out/load.json" >"$out/load.txt" 2>&1 &
load_pid=$!

sleep 8
at "RabbitMQ: stop_app"
rabbitmqctl -q stop_app
sleep "$BROKER_DOWN"
rabbitmqctl -q start_app
rabbitmqctl -q await_startup
at "RabbitMQ: back (await_startup returned)"
sleep 8
at "PostgreSQL: restart"
pg_ctlcluster --skip-systemctl-redirect "$pg_version" main restart -m fast
at "PostgreSQL: back"
sleep 8
at "gw-2: kill -9, started again"
cluster restart gw-2 >/dev/null
sleep 6
at "wk-1: kill -9, started again"
cluster restart wk-1 >/dev/null

status=0
wait "$load_pid" || status=$?
cluster down
cluster_up=""
cat "$out/load.txt"
echo "events: $out/events.txt; report: $out/load.json"
exit "$status"
