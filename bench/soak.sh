#!/usr/bin/env bash
# Soak: does kaiwa's memory follow the number of messages it has handled, or only its load?
# Every system below runs under kaiwa-load at a fixed rate for DURATION seconds, then sits idle
# for IDLE_WAIT seconds; meanwhile the resident memory (RssAnon and RssFile, /proc/<pid>/status)
# of every kaiwa process is sampled every SAMPLE seconds.
#   serve-sqlite     kaiwa serve on its embedded defaults (SQLite, in-process queue)
#   serve-postgres   kaiwa serve on a fresh PostgreSQL database
#   cluster          scripts/cluster.sh: HAProxy, 2 gateways, 2 workers, PostgreSQL, RabbitMQ
# Per process it prints:
#   warm      RssAnon at the end of the warm-up (WARMUP seconds into the load)
#   MB/M      the growth of RssAnon per million messages after the warm-up: the least-squares
#             slope over the samples from WARMUP to the end of the load, divided by the messages
#             the whole run completed per second (a gateway or worker of the cluster saw only
#             its share of them; the figure is per message of the whole run). Target: < 2.
#   end       RssAnon when the load stopped
#   idle      RssAnon IDLE_WAIT seconds later; target: back near `warm`
#   file      RssFile at the end (mapped binary and libraries: does not grow with messages)
# Reports land in target/bench/soak-<UTC time>/: the samples (samples.tsv), kaiwa-load's JSON
# reports and the table (table.txt).
#
# Settings (environment): CLIENTS (100), RATE (3000 msg/s for kaiwa serve on SQLite),
# POSTGRES_RATE (1000: kaiwa serve on PostgreSQL fell behind at 2000 here), CLUSTER_RATE (1000:
# what two cores carry through the cluster with room to spare), DURATION seconds (240), WARMUP
# seconds (60), IDLE_WAIT seconds (60), SAMPLE seconds (2), SYSTEMS ("serve-sqlite
# serve-postgres cluster"), PORT (18082), BASE_PORT (18200), POSTGRES
# (postgres://postgres@127.0.0.1:5432/postgres), AMQP (amqp://guest:guest@127.0.0.1:5672).
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-100}
RATE=${RATE:-3000}
POSTGRES_RATE=${POSTGRES_RATE:-1000}
CLUSTER_RATE=${CLUSTER_RATE:-1000}
DURATION=${DURATION:-240}
WARMUP=${WARMUP:-60}
IDLE_WAIT=${IDLE_WAIT:-60}
SAMPLE=${SAMPLE:-2}
SYSTEMS=${SYSTEMS:-"serve-sqlite serve-postgres cluster"}
PORT=${PORT:-18082}
BASE_PORT=${BASE_PORT:-18200}
POSTGRES=${POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}
export POSTGRES AMQP="${AMQP:-amqp://guest:guest@127.0.0.1:5672}"
out=${OUT:-target/bench/soak-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
work=$(mktemp -d "$PWD/target/bench-soak.XXXXXX")
# shellcheck source=bench/common.sh
source bench/common.sh
pg_db=""
cluster_name="kaiwa_soak_cluster_$$"
cluster_up=""
sampler_pid=""
# Every message answered at once: memory is the only thing that changes with time.
export_bench_settings

stop_sampler() {
  if [[ -n "$sampler_pid" ]]; then
    kill "$sampler_pid" 2>/dev/null || true
    wait "$sampler_pid" 2>/dev/null || true
    sampler_pid=""
  fi
}
cleanup() {
  stop_sampler
  stop_server
  if [[ -n "$cluster_up" ]]; then cluster down || true; fi
  if [[ -n "$pg_db" ]]; then
    psql -q "$POSTGRES" -c "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Appends "system process seconds rss_anon_kib rss_file_kib" for every process given as
# name=pid, every SAMPLE seconds, seconds counted from the call.
sample() {
  local system=$1
  shift
  local start
  start=$(date +%s.%N)
  while true; do
    local now
    now=$(date +%s.%N)
    for named in "$@"; do
      local name=${named%%=*} pid=${named#*=}
      awk -v soaked="$system" -v name="$name" -v t="$(echo "$now - $start" | bc)" '
        /^RssAnon:/ { anon = $2 } /^RssFile:/ { file = $2 }
        END { if (anon != "") printf "%s\t%s\t%.1f\t%s\t%s\n", soaked, name, t, anon, file }
      ' "/proc/$pid/status" 2>/dev/null >>"$out/samples.tsv" || true
    done
    sleep "$SAMPLE"
  done
}

# The load, then the idle wait, with the sampler running from the first message to the end.
soak() {
  local system=$1 url=$2 rate=$3
  shift 3
  step "$system: $CLIENTS clients, $rate msg/s for ${DURATION}s, then ${IDLE_WAIT}s idle"
  sample "$system" "$@" &
  sampler_pid=$!
  load throughput --url "$url" --clients "$CLIENTS" --rate "$rate" --duration "$DURATION" \
    --label "soak-$system" --json "$out/$system.json" || true
  sleep "$IDLE_WAIT"
  stop_sampler
}

step "building kaiwa and kaiwa-load (release)"
cargo build --release --locked -p kaiwa -p kaiwa-load --bins

for system in $SYSTEMS; do
  case "$system" in
    serve-sqlite)
      start_kaiwa serve-sqlite
      soak serve-sqlite "ws://127.0.0.1:$PORT/ws" "$RATE" "kaiwa=$server_pid"
      stop_server
      ;;
    serve-postgres)
      pg_db="kaiwa_soak_serve_$$"
      psql -q "$POSTGRES" -c "CREATE DATABASE $pg_db" >/dev/null
      start_kaiwa serve-postgres --database-url "${POSTGRES%/*}/$pg_db"
      soak serve-postgres "ws://127.0.0.1:$PORT/ws" "$POSTGRES_RATE" "kaiwa=$server_pid"
      stop_server
      psql -q "$POSTGRES" -c "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" >/dev/null
      pg_db=""
      ;;
    cluster)
      cluster_up=1
      cluster up
      processes=()
      for file in "$work"/cluster/gw-*.pid "$work"/cluster/wk-*.pid; do
        name=$(basename "$file" .pid)
        processes+=("$name=$(cat "$file")")
      done
      soak cluster "ws://127.0.0.1:$PORT/ws" "$CLUSTER_RATE" "${processes[@]}"
      cluster down
      cluster_up=""
      ;;
    *)
      echo "unknown system $system (serve-sqlite, serve-postgres, cluster)" >&2
      exit 1
      ;;
  esac
done

{
  echo "kaiwa soak, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, commit $(git describe --always --dirty);" \
    "$CLIENTS clients, ${DURATION}s of load, ${WARMUP}s warm-up, ${IDLE_WAIT}s idle after"
  python3 - "$out" "$WARMUP" "$DURATION" <<'EOF'
import csv, json, sys
from collections import defaultdict

out, warmup, duration = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
samples = defaultdict(list)
with open(f"{out}/samples.tsv") as f:
    for system, name, t, anon, file in csv.reader(f, delimiter="\t"):
        samples[(system, name)].append((float(t), int(anon) * 1024, int(file) * 1024))

def mb(n):
    return f"{n / 1e6:.1f}"

print(f"{'system':<15}{'process':<9}{'messages':>10}{'msg/s':>8}{'warm MB':>9}"
      f"{'MB/M':>7}{'end MB':>8}{'idle MB':>9}{'file MB':>9}")
for (system, name), rows in samples.items():
    try:
        report = json.load(open(f"{out}/{system}.json"))
    except (OSError, ValueError):
        print(f"{system:<15}{name:<9} no kaiwa-load report")
        continue
    completed, lost = report["completed"], report["lost"]
    rate = completed / report["elapsed_s"]
    during = [(t, a) for t, a, _ in rows if warmup <= t <= duration]
    if len(during) < 2:
        print(f"{system:<15}{name:<9} too few samples")
        continue
    n = len(during)
    mean_t = sum(t for t, _ in during) / n
    mean_a = sum(a for _, a in during) / n
    slope = sum((t - mean_t) * (a - mean_a) for t, a in during) / sum(
        (t - mean_t) ** 2 for t, _ in during)
    per_million = slope / rate * 1e6
    warm = during[0][1]
    end = during[-1][1]
    idle = rows[-1][1]
    lost_note = f"  ({lost} lost)" if lost else ""
    print(f"{system:<15}{name:<9}{completed:>10}{rate:>8.0f}{mb(warm):>9}{per_million / 1e6:>7.2f}"
          f"{mb(end):>8}{mb(idle):>9}{mb(rows[-1][2]):>9}{lost_note}")
EOF
} | tee "$out/table.txt"
