#!/usr/bin/env bash
# What a message costs PostgreSQL (docs/architecture.md, "What a message costs PostgreSQL"):
# `kaiwa serve` on a fresh database, CLIENTS clients in a closed loop for DURATION seconds (or
# RATE msg/s offered), and per completed message: the CPU of kaiwa and of PostgreSQL
# (bench/cpu.py), commits, rows inserted and updated, WAL records and bytes (pg_stat_wal), and
# per table and index the scans, rows read, inserts, updates and heap-only updates
# (pg_stat_user_tables, pg_stat_user_indexes); kaiwa's /metrics beside each report. PostgreSQL
# runs as bench/cluster.sh runs it (autovacuum on, random_page_cost 1.1, reset after).
#
#   bench/pg-cost.sh                                  the build of this checkout
#   BASELINE=/tmp/before/kaiwa bench/pg-cost.sh       that binary first, then this one
#   DELAY_MS=0.25 RATE=1000 bench/pg-cost.sh          PostgreSQL 0.25 ms away (kaiwa-load delay-proxy)
#
# Settings (environment): CLIENTS (50), DURATION (10), RATE (closed loop if unset), DELAY_MS,
# BASELINE, PORT (18083), POSTGRES (postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-50}
DURATION=${DURATION:-10}
RATE=${RATE:-}
DELAY_MS=${DELAY_MS:-}
PORT=${PORT:-18083}
POSTGRES=${POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}
out=${OUT:-target/bench/pg-cost-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
work=$(mktemp -d "$PWD/target/bench-pg-cost.XXXXXX")
# shellcheck source=bench/common.sh
source bench/common.sh
export_bench_settings
db=""

cleanup() {
  stop_server
  stop_delay_proxies
  if [[ -n "$db" ]]; then
    psql -q "$POSTGRES" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  if [[ -n "$pg_tuned" ]]; then untune_postgres || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

tune_postgres

# Counters of the server and of the run's database, as JSON, for the report below.
counters() {
  local url=${POSTGRES%/*}/$db
  psql -qAt "$url" -c "SELECT json_build_object(
    'database', (SELECT row_to_json(d) FROM (SELECT xact_commit AS commits,
        tup_inserted AS inserted, tup_updated AS updated FROM pg_stat_database
        WHERE datname = current_database()) d),
    'wal', (SELECT row_to_json(w) FROM (SELECT wal_records AS records, wal_bytes AS bytes
        FROM pg_stat_wal) w),
    'tables', (SELECT json_object_agg(relname, json_build_array(seq_scan, seq_tup_read,
        idx_scan, n_tup_ins, n_tup_upd, n_tup_hot_upd)) FROM pg_stat_user_tables),
    'indexes', (SELECT json_object_agg(indexrelname, json_build_array(idx_scan, idx_tup_read))
        FROM pg_stat_user_indexes))"
}

run() {
  local name=$1 binary=$2
  step "$name: $binary"
  db="kaiwa_bench_pg_cost_$$_${name//-/_}"
  psql -q "$POSTGRES" -c "CREATE DATABASE $db" >/dev/null
  local url=${POSTGRES%/*}/$db
  if [[ -n "$DELAY_MS" ]]; then
    start_delay_proxy postgres "$url" $((PORT + 1)) 5432
    url=$proxied_url
  fi
  kaiwa_binary=$binary start_kaiwa "$name" --database-url "$url"
  counters >"$work/before.json"
  bench/cpu.py snapshot "$work/cpu-before.json" "kaiwa=pid:$server_pid" postgres=comm:postgres
  load throughput --url "ws://127.0.0.1:$PORT/ws" --clients "$CLIENTS" --duration "$DURATION" \
    ${RATE:+--rate "$RATE"} --label "$name" --json "$out/$name.json" || true
  bench/cpu.py snapshot "$work/cpu-after.json" "kaiwa=pid:$server_pid" postgres=comm:postgres
  counters >"$work/after.json"
  bench/cpu.py report "$work/cpu-before.json" "$work/cpu-after.json" "$out/$name.json" \
    >"$out/cpu-$name.json"
  # kaiwa's own view, kept with the report: the writer's calls (`kaiwa_store_commit_seconds`,
  # `kaiwa_store_batch_size`) say how busy it was and how full its batches.
  curl -sf "http://127.0.0.1:$PORT/metrics" >"$out/$name.metrics" || true
  stop_server
  stop_delay_proxies
  psql -q "$POSTGRES" -c "DROP DATABASE $db WITH (FORCE)" >/dev/null
  db=""
  python3 - "$work/before.json" "$work/after.json" "$out/cpu-$name.json" "$name" <<'PY' |
import json, sys
before, after, cpu = (json.load(open(p)) for p in sys.argv[1:4])
n = cpu["messages"] or 1
print(f"{sys.argv[4]}: {cpu['messages']} messages, CPU ms per message "
      f"{json.dumps(cpu['cpu_ms_per_message'])} (total {cpu['total_ms_per_message']})")
d = {k: (after["database"][k] - before["database"][k]) / n for k in after["database"]}
w = {k: (float(after["wal"][k]) - float(before["wal"][k])) / n for k in after["wal"]}
print(f"  per message: commits {d['commits']:.4f}, rows inserted {d['inserted']:.2f}, "
      f"updated {d['updated']:.2f}, WAL records {w['records']:.1f}, WAL bytes {w['bytes']:.0f}")
print(f"  {'per message':28} {'seq scans':>9} {'seq rows':>9} {'idx scans':>9} "
      f"{'inserts':>8} {'updates':>8} {'heap-only':>9}")
for name, now in sorted((after["tables"] or {}).items()):
    then = (before["tables"] or {}).get(name, [0] * len(now))
    v = [(a - b) / n for a, b in zip(now, then)]
    if any(abs(x) > 0.0005 for x in v):
        print(f"  {name:28} " + " ".join(f"{x:9.3f}" if i != 3 else f"{x:8.3f}"
                                          for i, x in enumerate(v)))
for name, now in sorted((after["indexes"] or {}).items()):
    then = (before["indexes"] or {}).get(name, [0, 0])
    v = [(a - b) / n for a, b in zip(now, then)]
    if any(abs(x) > 0.0005 for x in v):
        print(f"  {name:28} {'':9} {'':9} {v[0]:9.3f}")
PY
    tee "$out/$name.txt"
}

step "building kaiwa and kaiwa-load (release)"
cargo build --release --locked -p kaiwa -p kaiwa-load --bins
if [[ -n "${BASELINE:-}" ]]; then run baseline "$BASELINE"; fi
run this target/release/kaiwa
echo "reports in $out" >&2
