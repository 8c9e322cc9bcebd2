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
start_kaiwa() {
  local name=$1
  shift
  target/release/kaiwa serve --bind "127.0.0.1:$PORT" --data-dir "$work/$name" --log warn "$@" \
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
# vhost ($cluster_name).
cluster() {
  PORT=$PORT BASE_PORT=$BASE_PORT RUN_DIR="$work/cluster" NAME=$cluster_name \
    BINARY=target/release/kaiwa scripts/cluster.sh "$@"
}
