#!/usr/bin/env bash
# What one call of `write_batch` costs PostgreSQL, by what it carries (docs/architecture.md,
# "What a call costs"). At a steady rate a writer's batches hold one to a few commands, and
# each is a call of its own: that call's cost, not a message's, is what fills the cores. Here
# pgbench makes the calls from one connection, without kaiwa, so the figures move by a tenth
# between runs rather than by the third of the whole-system benchmarks: small changes to the
# function show. For each ROWS (rows a call), three scripts run DURATION seconds each on a
# fresh database migrated by kaiwa: `m`, a call of ROWS new messages (as `kaiwa serve` makes
# them; with LIMIT set, under a cluster's in-flight limit); `mr`, the same and then a call of a
# reply to each; `mrd`, those two and then a call of their delivery marks. PostgreSQL's CPU
# (bench/cpu.py, every postgres process) per script run, and by difference per call of each
# kind. With BASELINE, a database migrated by that binary runs each script first, PAIRS times.
#
#   bench/pg-call.sh                                 this checkout's migrations
#   BASELINE=/tmp/before/kaiwa bench/pg-call.sh      pairs: that binary's, then this one's
#
# Settings (environment): ROWS ("1 8 64"), DURATION (8), PAIRS (2), LIMIT (the in-flight
# limit given; unset: none, as in one process; the messages of `m` are never finished, so give
# one that no run reaches, such as 1000000000: a message refused is not stored, and the reply
# to it then fails the run), BASELINE, POSTGRES (postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-1 8 64}
DURATION=${DURATION:-8}
PAIRS=${PAIRS:-2}
LIMIT=${LIMIT:-}
BASELINE=${BASELINE:-}
POSTGRES=${POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}
out=${OUT:-target/bench/pg-call-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
work=$(mktemp -d "$PWD/target/bench-pg-call.XXXXXX")
# shellcheck source=bench/common.sh
source bench/common.sh
if ! command -v pgbench >/dev/null; then
  echo "pgbench is missing (Debian: postgresql-client)" >&2
  exit 1
fi
dbs=()

cleanup() {
  for db in "${dbs[@]}"; do
    psql -q "$POSTGRES" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  if [[ -n "$pg_tuned" ]]; then untune_postgres || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

tune_postgres
step "building kaiwa (release)"
cargo build --release --locked -p kaiwa --bin kaiwa

# A database of its own, migrated by binary $2; its URL in $db_url.
database() {
  local db="kaiwa_bench_pg_call_$$_$1"
  psql -q "$POSTGRES" -c "CREATE DATABASE $db" >/dev/null
  dbs+=("$db")
  db_url=${POSTGRES%/*}/$db
  "$2" migrate --data-dir "$work/$1" --database-url "$db_url" >/dev/null
}

# The arguments of `write_batch` (migration 10's order), each given as NAME=VALUE; the rest
# empty arrays. Written out once here so that every script calls it the same way.
call() {
  local -A a=(
    [m_client]="'{}'::text[]" [m_client_msg_id]="'{}'::text[]" [m_type]="'{}'::text[]"
    [m_content]="'{}'::text[]" [m_filename]="'{}'::text[]" [m_mime_type]="'{}'::text[]"
    [m_size]="'{}'::bigint[]" [m_timezone]="'{}'::text[]" [m_status]="'{}'::text[]"
    [m_reason]="'{}'::text[]" [m_client_timestamp]="'{}'::text[]"
    [m_received_at]="'{}'::timestamptz[]" [admitted_by]="'gw-bench'::text"
    [max_in_flight]="${LIMIT:-NULL}::bigint" [stream_locks]="7::int"
    [r_message]="'{}'::bigint[]" [r_client]="'{}'::text[]" [r_type]="'{}'::text[]"
    [r_content]="'{}'::text[]" [r_filename]="'{}'::text[]" [r_mime_type]="'{}'::text[]"
    [r_fallback]="'{}'::boolean[]" [r_created_at]="'{}'::timestamptz[]"
    [completed]="'{}'::bigint[]" [look_for_stored]="false"
    [d_reply]="'{}'::bigint[]" [d_delivery]="'{}'::text[]" [d_at]="'{}'::timestamptz[]"
    [a_client]="'{}'::text[]" [a_seq]="'{}'::bigint[]" [a_at]="'{}'::timestamptz[]"
    [x_client]="'{}'::text[]" [x_seq]="'{}'::bigint[]"
  )
  local kv
  for kv in "$@"; do a[${kv%%=*}]=${kv#*=}; done
  local order=(m_client m_client_msg_id m_type m_content m_filename m_mime_type m_size
    m_timezone m_status m_reason m_client_timestamp m_received_at admitted_by max_in_flight
    stream_locks r_message r_client r_type r_content r_filename r_mime_type r_fallback
    r_created_at completed look_for_stored d_reply d_delivery d_at a_client a_seq a_at
    x_client x_seq)
  local args=() name
  for name in "${order[@]}"; do args+=("${a[$name]}"); done
  local IFS=,
  echo "write_batch(${args[*]})"
}

# The three scripts for $1 rows a call, in $work/{m,mr,mrd}-$1.sql. Fifty clients' messages,
# as a gateway's batch mixes them; each call's ids come back contiguous (one connection draws
# them), so the next call names them by their first and last.
scripts() {
  local n=$1
  local g="FROM generate_series(1, $n) AS g"
  local messages replies marks
  messages="SELECT min(id) AS lo, max(id) AS hi FROM $(call \
    "m_client=ARRAY(SELECT 'bench-' || (g % 50) $g)" \
    "m_client_msg_id=ARRAY(SELECT :run || '-' || g $g)" \
    "m_type=array_fill('text'::text, ARRAY[$n])" \
    "m_content=array_fill('a message of a usual length, neither short nor long'::text, ARRAY[$n])" \
    "m_filename=array_fill(NULL::text, ARRAY[$n])" "m_mime_type=array_fill(NULL::text, ARRAY[$n])" \
    "m_size=array_fill(NULL::bigint, ARRAY[$n])" \
    "m_timezone=array_fill('Asia/Tokyo'::text, ARRAY[$n])" \
    "m_status=array_fill('accepted'::text, ARRAY[$n])" \
    "m_reason=array_fill(NULL::text, ARRAY[$n])" \
    "m_client_timestamp=array_fill(NULL::text, ARRAY[$n])" \
    "m_received_at=array_fill(now(), ARRAY[$n])") \\gset"
  replies="SELECT min(id) AS rlo, max(id) AS rhi FROM $(call \
    "r_message=ARRAY(SELECT :lo + g - 1 $g)" \
    "r_client=ARRAY(SELECT 'bench-' || (g % 50) $g)" \
    "r_type=array_fill('text'::text, ARRAY[$n])" \
    "r_content=array_fill('a reply of a usual length, a sentence or two'::text, ARRAY[$n])" \
    "r_filename=array_fill(NULL::text, ARRAY[$n])" "r_mime_type=array_fill(NULL::text, ARRAY[$n])" \
    "r_fallback=array_fill(false, ARRAY[$n])" "r_created_at=array_fill(now(), ARRAY[$n])" \
    "completed=ARRAY(SELECT :lo + g - 1 $g)") \\gset"
  marks="SELECT count(*) FROM $(call \
    "d_reply=ARRAY(SELECT :rlo + g - 1 $g)" \
    "d_delivery=array_fill('delivered'::text, ARRAY[$n])" "d_at=array_fill(now(), ARRAY[$n])");"
  local run='\set run random(1, 9000000000000000000)'
  printf '%s\n%s\n' "$run" "$messages" >"$work/m-$n.sql"
  printf '%s\n%s\n%s\n' "$run" "$messages" "$replies" >"$work/mr-$n.sql"
  printf '%s\n%s\n%s\n%s\n' "$run" "$messages" "$replies" "$marks" >"$work/mrd-$n.sql"
}

# Transactions committed in the database of URL $1 so far (each call is one).
commits() {
  psql -qAt "$1" -c "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
}

# One script on one database for DURATION seconds; appends "name script rows runs cpu_ms" to
# $work/runs. The CPU and the count are read a second into the run and a second before its
# end, while pgbench's connection is open (bench/cpu.py counts live processes only).
measure() {
  local name=$1 url=$2 script=$3 rows=$4
  pgbench -n -M prepared -c 1 -T $((DURATION + 2)) -f "$work/$script-$rows.sql" "$url" \
    >"$work/pgbench.log" 2>&1 &
  local bench=$!
  sleep 1
  local before after
  before=$(commits "$url")
  bench/cpu.py snapshot "$work/cpu-before.json" postgres=comm:postgres
  sleep "$DURATION"
  bench/cpu.py snapshot "$work/cpu-after.json" postgres=comm:postgres
  after=$(commits "$url")
  wait "$bench" || { cat "$work/pgbench.log" >&2; return 1; }
  python3 - "$work/cpu-before.json" "$work/cpu-after.json" "$before" "$after" "$script" \
    "$name" "$rows" >>"$work/runs" <<'PY'
import json, os, sys
before, after = (json.load(open(p)) for p in sys.argv[1:3])
calls_a_run = {"m": 1, "mr": 2, "mrd": 3}[sys.argv[5]]
# One commit of the first count's own query is counted between the two counts.
runs = (int(sys.argv[4]) - int(sys.argv[3]) - 1) / calls_a_run
tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
then = before["postgres"]
ticks = sum(t - then.get(pid, 0) for pid, t in after["postgres"].items())
print(sys.argv[6], sys.argv[5], sys.argv[7], int(runs), ticks * tick_ms / max(runs, 1))
PY
}

names=()
if [[ -n "$BASELINE" ]]; then
  database baseline "$BASELINE"
  baseline_url=$db_url
  names+=(baseline)
fi
database this target/release/kaiwa
this_url=$db_url
names+=(this)
: >"$work/runs"
for rows in $ROWS; do
  scripts "$rows"
  for pair in $(seq 1 "$PAIRS"); do
    for script in m mr mrd; do
      for name in "${names[@]}"; do
        url=$this_url
        if [[ $name == baseline ]]; then url=$baseline_url; fi
        step "$name: $script, $rows rows a call ($pair of $PAIRS)"
        measure "$name" "$url" "$script" "$rows"
      done
    done
  done
done
cp "$work/runs" "$out/runs.txt"

{
  echo "write_batch's cost to PostgreSQL, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores," \
    "this: $(git describe --always --dirty)${BASELINE:+, baseline: $BASELINE}," \
    "${LIMIT:+in-flight limit $LIMIT, }${DURATION}s a run, $PAIRS runs each"
  python3 - "$out/runs.txt" "$DURATION" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, script, rows, n, ms = line.split()
    runs[(name, int(rows), script)].append((int(n), float(ms)))
names = sorted({k[0] for k in runs}, key=lambda n: n != "baseline")
print(f"{'build':<9} {'rows':>4}  {'m calls/s':>13}  PostgreSQL CPU ms: "
      f"{'m':>6} {'mr':>6} {'mrd':>6} | a call of messages, replies, marks")
for rows in sorted({k[1] for k in runs}):
    for name in names:
        ms = {s: statistics.median(x[1] for x in runs[(name, rows, s)]) for s in ("m", "mr", "mrd")}
        rate = statistics.median(x[0] for x in runs[(name, rows, "m")]) / float(sys.argv[2])
        every = [f"{x[1]:.3f}" for s in ("m", "mr", "mrd") for x in runs[(name, rows, s)]]
        print(f"{name:<9} {rows:>4}  {rate:>13.0f}  {'':>18}{ms['m']:>6.3f} {ms['mr']:>6.3f} "
              f"{ms['mrd']:>6.3f} | {ms['m']:.3f}, {ms['mr'] - ms['m']:.3f}, "
              f"{ms['mrd'] - ms['mr']:.3f}   (runs: {' '.join(every)})")
PY
} | tee "$out/table.txt"
