#!/usr/bin/env bash
# A whole kaiwa cluster on this machine, without containers: HAProxy on one port in front of two
# gateways, two workers, and the machine's PostgreSQL and RabbitMQ (a database and a vhost of
# the cluster's own). The browser client and kaiwa-load work through the HAProxy port.
#
#   scripts/cluster.sh            start it, print where everything is, stop it all on Ctrl-C
#   scripts/cluster.sh up         start it in the background (state in $RUN_DIR)
#   scripts/cluster.sh down       stop what `up` started and drop its database and vhost
#   scripts/cluster.sh restart NAME   kill -9 one process (gw-1, gw-2, wk-1, wk-2) and start it
#                                 again with the same flags; prints the seconds it was down
#
# HAProxy also ends TLS on TLS_PORT (8443), with a self-signed certificate for localhost made at
# `up` with openssl (or TLS_PEM: a PEM file of chain and key of your own), as deploy/haproxy.cfg
# does in containers.
#
# Settings (environment): PORT (8082, HAProxy), TLS_PORT (8443), TLS_PEM, BASE_PORT (8200: gateways on BASE_PORT+1..,
# workers on BASE_PORT+11..), GATEWAYS (2), WORKERS (2), RUN_DIR (target/cluster),
# POSTGRES (postgres://postgres@127.0.0.1:5432/postgres: the server; the cluster makes its own
# database on it), AMQP (amqp://guest:guest@127.0.0.1:5672), POSTGRES_VIA and AMQP_VIA (the
# same servers as the gateways and workers reach them, e.g. through bench/cluster.sh's delaying
# proxies; default POSTGRES and AMQP: psql, rabbitmqctl and `kaiwa migrate` always go direct),
# NAME (kaiwa_cluster: database and vhost), BINARY (target/release/kaiwa, built if missing), and any KAIWA_* setting, which every
# process reads (e.g. KAIWA_REPLY_DELAY_SCALE=0, KAIWA_MAX_CLIENTS=20000).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-8082}
TLS_PORT=${TLS_PORT:-8443}
TLS_PEM=${TLS_PEM:-}
BASE_PORT=${BASE_PORT:-8200}
GATEWAYS=${GATEWAYS:-2}
WORKERS=${WORKERS:-2}
RUN_DIR=${RUN_DIR:-target/cluster}
POSTGRES=${POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}
AMQP=${AMQP:-amqp://guest:guest@127.0.0.1:5672}
POSTGRES_VIA=${POSTGRES_VIA:-$POSTGRES}
AMQP_VIA=${AMQP_VIA:-$AMQP}
NAME=${NAME:-kaiwa_cluster}
BINARY=${BINARY:-target/release/kaiwa}

fail() { printf 'error: %s\n' "$*" >&2; exit 1; }
say() { printf '%s\n' "$*" >&2; }

database_url="${POSTGRES%/*}/$NAME"
# What the gateways and workers are given; setup uses database_url.
process_database_url="${POSTGRES_VIA%/*}/$NAME"
queue_url="${AMQP_VIA%/}/$NAME"

wait_for_port() {
  for _ in $(seq 1 150); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

prerequisites() {
  if ! command -v haproxy >/dev/null; then
    command -v apt-get >/dev/null || fail "haproxy is missing and there is no apt-get to install it"
    say "installing haproxy"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y haproxy >/dev/null \
      || { $sudo apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y haproxy >/dev/null; } \
      || fail "could not install haproxy"
  fi
  command -v psql >/dev/null || fail "psql is needed to make the cluster's database"
  psql -q "$POSTGRES" -c "SELECT 1" >/dev/null 2>&1 \
    || fail "PostgreSQL does not answer at $POSTGRES (start it: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start)"
  command -v rabbitmqctl >/dev/null || fail "rabbitmqctl is needed to make the cluster's vhost"
  rabbitmqctl -q status >/dev/null 2>&1 || fail "RabbitMQ does not answer (start it: rabbitmq-server -detached)"
  if [ ! -x "$BINARY" ]; then
    say "building kaiwa in release mode"
    cargo build --release --locked -p kaiwa --bin kaiwa >&2
  fi
}

# Starts one process: role, name, port. Its command line is kept so `restart` can repeat it.
start_process() {
  local role=$1 name=$2 port=$3
  local cmd=("$BINARY" "$role" --bind "127.0.0.1:$port" --gateway-id "$name"
    --data-dir "$RUN_DIR/$name" --media-dir "$RUN_DIR/media"
    --database-url "$process_database_url" --queue-url "$queue_url")
  mkdir -p "$RUN_DIR/$name"
  printf '%q ' "${cmd[@]}" >"$RUN_DIR/$name.cmd"
  "${cmd[@]}" >>"$RUN_DIR/$name.log" 2>&1 &
  echo $! >"$RUN_DIR/$name.pid"
  wait_for_port "$port" || fail "$name did not start: see $RUN_DIR/$name.log"
}

haproxy_config() {
  cat <<EOF
global
    maxconn 9000
    log stdout format raw local0 warning
defaults
    mode http
    log global
    timeout client 90s
    timeout server 90s
    # A gateway that was just killed refuses connections until two checks fail: try another.
    retries 2
    option redispatch
    timeout connect 1s
    # A WebSocket is a tunnel once upgraded: kaiwa's heartbeats keep it busy.
    timeout tunnel 1h
frontend kaiwa
    bind 127.0.0.1:$PORT
    # TLS ends here; the gateways behind speak plain HTTP on loopback.
    bind 127.0.0.1:$TLS_PORT ssl crt $tls_pem alpn http/1.1
    timeout http-request 5s
    timeout http-keep-alive 15s
    default_backend gateways
backend gateways
    balance leastconn
    # /health answers 503 while a gateway drains or cannot write: HAProxy moves on.
    option httpchk GET /health
    http-check expect status 200
EOF
  for i in $(seq 1 "$GATEWAYS"); do
    echo "    server gw-$i 127.0.0.1:$((BASE_PORT + i)) check inter 1s fall 2 rise 1"
  done
}

up() {
  prerequisites
  [ ! -e "$RUN_DIR/haproxy.pid" ] || fail "a cluster seems to be up already ($RUN_DIR); run: $0 down"
  mkdir -p "$RUN_DIR/media"
  psql -q "$POSTGRES" -c "DROP DATABASE IF EXISTS $NAME WITH (FORCE)" -c "CREATE DATABASE $NAME" >/dev/null
  rabbitmqctl -q delete_vhost "$NAME" >/dev/null 2>&1 || true
  rabbitmqctl -q add_vhost "$NAME" >/dev/null
  rabbitmqctl -q set_permissions -p "$NAME" guest ".*" ".*" ".*" >/dev/null
  "$BINARY" migrate --database-url "$database_url" >&2
  for i in $(seq 1 "$GATEWAYS"); do start_process gateway "gw-$i" $((BASE_PORT + i)); done
  for i in $(seq 1 "$WORKERS"); do start_process worker "wk-$i" $((BASE_PORT + 10 + i)); done
  tls_pem=$TLS_PEM
  if [ -z "$tls_pem" ]; then
    tls_pem="$RUN_DIR/tls/localhost.pem"
    mkdir -p "$RUN_DIR/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
      -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
      -keyout "$RUN_DIR/tls/key.pem" -out "$RUN_DIR/tls/cert.pem" 2>/dev/null \
      || fail "openssl could not make a certificate for HAProxy (set TLS_PEM to one of yours)"
    cat "$RUN_DIR/tls/cert.pem" "$RUN_DIR/tls/key.pem" >"$tls_pem"
  fi
  haproxy_config >"$RUN_DIR/haproxy.cfg"
  haproxy -f "$RUN_DIR/haproxy.cfg" -D -p "$RUN_DIR/haproxy.pid" >>"$RUN_DIR/haproxy.log" 2>&1 \
    || fail "haproxy did not start: see $RUN_DIR/haproxy.log"
  wait_for_port "$PORT" || fail "haproxy does not listen on $PORT"
  say "kaiwa cluster up:"
  say "  clients        ws://127.0.0.1:$PORT/ws  (browser: http://127.0.0.1:$PORT/)"
  say "  over TLS       wss://localhost:$TLS_PORT/ws  (browser: https://localhost:$TLS_PORT/; certificate $tls_pem)"
  for i in $(seq 1 "$GATEWAYS"); do say "  gateway gw-$i   http://127.0.0.1:$((BASE_PORT + i))/health"; done
  for i in $(seq 1 "$WORKERS"); do say "  worker  wk-$i   http://127.0.0.1:$((BASE_PORT + 10 + i))/health"; done
  say "  PostgreSQL     ${database_url}"
  if [ "$process_database_url" != "$database_url" ]; then
    say "                 gateways and workers through ${process_database_url}"
  fi
  say "  RabbitMQ       vhost $NAME"
  if [ "$AMQP_VIA" != "$AMQP" ]; then say "                 gateways and workers through AMQP_VIA"; fi
  say "  logs           $RUN_DIR/*.log"
}

stop_pid_file() {
  local file=$1
  [ -e "$file" ] || return 0
  local pid
  pid=$(cat "$file")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$file"
}

down() {
  stop_pid_file "$RUN_DIR/haproxy.pid"
  for file in "$RUN_DIR"/gw-*.pid "$RUN_DIR"/wk-*.pid; do
    [ -e "$file" ] && stop_pid_file "$file"
  done
  psql -q "$POSTGRES" -c "DROP DATABASE IF EXISTS $NAME WITH (FORCE)" >/dev/null 2>&1 || true
  rabbitmqctl -q delete_vhost "$NAME" >/dev/null 2>&1 || true
  say "kaiwa cluster down"
}

# kill -9 one process, start it again, and say how long its port was closed.
restart() {
  local name=$1
  [ -e "$RUN_DIR/$name.pid" ] || fail "no process $name in $RUN_DIR"
  local pid port
  pid=$(cat "$RUN_DIR/$name.pid")
  port=$(sed -E 's/.*--bind 127\.0\.0\.1:([0-9]+).*/\1/' "$RUN_DIR/$name.cmd")
  local killed_at
  killed_at=$(date +%s.%N)
  kill -KILL "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.01; done
  # exec: the pid kept is kaiwa's own, not that of a shell around it.
  (eval "exec $(cat "$RUN_DIR/$name.cmd")") >>"$RUN_DIR/$name.log" 2>&1 &
  echo $! >"$RUN_DIR/$name.pid"
  wait_for_port "$port" || fail "$name did not come back: see $RUN_DIR/$name.log"
  echo "$(date +%s.%N) - $killed_at" | bc
}

case "${1:-run}" in
  up) up ;;
  down) down ;;
  restart) restart "${2:?which process: gw-1, gw-2, wk-1, wk-2}" ;;
  run)
    up
    trap down EXIT INT TERM
    say "Ctrl-C stops the cluster"
    while sleep 3600; do :; done
    ;;
  *) fail "usage: $0 [run|up|down|restart NAME]" ;;
esac
