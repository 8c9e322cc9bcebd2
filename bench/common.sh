# shellcheck shell=bash disable=SC2154
# What the benchmark scripts share; sourced by bench/run.sh, bench/cluster.sh and bench/soak.sh,
# which set PORT, work (a data directory of the run's own) and out (where reports go) first.

step() { printf '\n==> %s\n' "$*" >&2; }

load() { target/release/kaiwa-load "$@" --quiet; }

wait_for_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing is listening on port $1" >&2
  return 1
}

server_pid=""

# kaiwa serve on a fresh data directory, in the background; extra flags follow the defaults.
# kaiwa_binary names another build (a baseline's).
start_kaiwa() {
  local name=$1
  shift
  "${kaiwa_binary:-target/release/kaiwa}" serve --bind "127.0.0.1:$PORT" --data-dir "$work/$name" --log warn "$@" \
    >"$out/$name.server.log" 2>&1 &
  server_pid=$!
  wait_for_port "$PORT"
}

stop_server() {
  if [[ -n "$server_pid" ]]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}

# Reply delays off, every message inside its window, limits out of the way: what is measured is
# kaiwa, not its pacing. Through the environment, which every process of scripts/cluster.sh
# reads too.
export_bench_settings() {
  export KAIWA_REPLY_DELAY_SCALE=0 KAIWA_MAX_IN_FLIGHT=100000 KAIWA_MAX_CLIENTS=20000 \
    KAIWA_FIRST_MESSAGE_TIMEOUT=86400 KAIWA_HEARTBEAT_TIMEOUT=86400 KAIWA_TEXT_WINDOW=00:00-24:00 \
    KAIWA_LOG=warn
  unset OPENAI_API_KEY
}

# scripts/cluster.sh with this run's ports, its directory under $work and its own database and
# vhost ($cluster_name), started from $kaiwa_binary (default: this checkout's build).
cluster() {
  PORT=$PORT BASE_PORT=$BASE_PORT RUN_DIR="$work/cluster" NAME=$cluster_name \
    BINARY=${kaiwa_binary:-target/release/kaiwa} scripts/cluster.sh "$@"
}

# The running cluster's parts for bench/cpu.py, one word each: its gateways and workers by the
# pid files of `cluster up`, the servers by command name.
cluster_parts() {
  local gw wk
  gw=$(cat "$work"/cluster/gw-*.pid | paste -sd, -)
  wk=$(cat "$work"/cluster/wk-*.pid | paste -sd, -)
  echo "gateways=pid:$gw workers=pid:$wk haproxy=comm:haproxy postgres=comm:postgres" \
    "rabbitmq=comm:beam.smp"
}

# PostgreSQL as production runs it (docs/architecture.md, "What kaiwa needs from PostgreSQL"):
# autovacuum on, and the page cost of storage that is cached or on SSD. Set with ALTER SYSTEM
# for the run and reset after: the development VM's PostgreSQL runs without autovacuum and with
# the spinning-disk default (random_page_cost 4), under which the planner answered a batch's
# delivery marks with a scan of every reply (measured: 73 rows read per message).
# Needs POSTGRES; sets pg_tuned, so the caller's cleanup knows to reset.
pg_tuned=""
tune_postgres() {
  psql -q "$POSTGRES" -c "ALTER SYSTEM SET autovacuum = on" \
    -c "ALTER SYSTEM SET random_page_cost = 1.1" -c "SELECT pg_reload_conf()" >/dev/null
  pg_tuned=1
}
untune_postgres() {
  pg_tuned=""
  psql -q "$POSTGRES" -c "ALTER SYSTEM RESET autovacuum" -c "ALTER SYSTEM RESET random_page_cost" \
    -c "SELECT pg_reload_conf()" >/dev/null
}

# kaiwa-load delay-proxy in front of a server (DELAY_MS ms each way), as between machines;
# the caller stops them with stop_delay_proxies after the processes that talk through them.
proxy_pids=()
# host:port of a URL (scheme://[user[:password]@]host[:port][/path]), with the default port
# when it names none.
authority() {
  local rest=${1#*://}
  rest=${rest##*@}
  rest=${rest%%/*}
  rest=${rest%%\?*}
  echo "$rest"
}
# Starts a proxy on 127.0.0.1:port to the server of url; sets proxied_url to url with the
# proxy in the server's place. (Not in a command substitution: the pid must reach proxy_pids.)
proxied_url=""
start_delay_proxy() {
  local name=$1 url=$2 port=$3 default_port=$4
  local original target log="$out/delay-proxy-$1.log"
  original=$(authority "$url")
  target=$original
  [[ "$target" =~ :[0-9]+$ ]] || target="$target:$default_port"
  target/release/kaiwa-load delay-proxy --listen "127.0.0.1:$port" --to "$target" \
    --delay-ms "$DELAY_MS" >"$log" 2>&1 &
  proxy_pids+=($!)
  # Ready once it says so: a test connection would reach the server as a client that never
  # speaks (and PostgreSQL logs each one).
  for _ in $(seq 1 100); do
    if grep -q "each way" "$log"; then break; fi
    kill -0 "${proxy_pids[-1]}" 2>/dev/null || { cat "$log" >&2; return 1; }
    sleep 0.1
  done
  grep -q "each way" "$log" || { echo "the $name delay proxy did not start" >&2; return 1; }
  proxied_url=${url/"$original"/127.0.0.1:$port}
}
stop_delay_proxies() {
  local pid
  for pid in "${proxy_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  proxy_pids=()
}
