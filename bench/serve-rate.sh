#!/usr/bin/env bash
# What a message costs one `kaiwa serve` on SQLite at a steady rate (docs/architecture.md,
# "Fewer wake-ups per message"): where batches hold one or two commands, a message costs ten
# to thirty times its closed-loop CPU. For each rate in RATES, CLIENTS clients offer that many
# msg/s for DURATION seconds to a fresh server; per run: the server's CPU per completed message
# (bench/cpu.py), its writer's commits per message (`kaiwa_store_commit_seconds_count`), and p50
# and p99 to the last reply. With BASELINE, that binary and this checkout's run in turn, PAIRS
# times per rate, so that a change is judged by runs minutes apart.
#
#   bench/serve-rate.sh                                the build of this checkout
#   BASELINE=/tmp/before/kaiwa bench/serve-rate.sh     pairs: that binary, then this one
#
# Settings (environment): RATES ("100 200 1000"), PAIRS (3), CLIENTS (50), DURATION (10),
# BASELINE, PORT (18084).
set -euo pipefail
cd "$(dirname "$0")/.."

RATES=${RATES:-100 200 1000}
PAIRS=${PAIRS:-3}
CLIENTS=${CLIENTS:-50}
DURATION=${DURATION:-10}
PORT=${PORT:-18084}
BASELINE=${BASELINE:-}
out=${OUT:-target/bench/serve-rate-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
work=$(mktemp -d "$PWD/target/bench-serve-rate.XXXXXX")
# shellcheck source=bench/common.sh
source bench/common.sh
export_bench_settings
kaiwa_binary=""

cleanup() {
  stop_server
  rm -rf "$work"
}
trap cleanup EXIT

# One run: the server from $2 (a fresh data directory), RATE $3, reports under the name $1.
run() {
  local name=$1 rate=$3
  kaiwa_binary=$2 start_kaiwa "$name"
  bench/cpu.py snapshot "$work/cpu-before.json" "kaiwa=pid:$server_pid"
  load throughput --url "ws://127.0.0.1:$PORT/ws" --clients "$CLIENTS" --rate "$rate" \
    --duration "$DURATION" --label "$name" --json "$out/$name.json" || true
  bench/cpu.py snapshot "$work/cpu-after.json" "kaiwa=pid:$server_pid"
  bench/cpu.py report "$work/cpu-before.json" "$work/cpu-after.json" "$out/$name.json" \
    >"$out/cpu-$name.json"
  curl -sf "http://127.0.0.1:$PORT/metrics" >"$out/$name.metrics" || true
  stop_server
  python3 - "$out" "$name" "$rate" <<'PY' | tee -a "$out/summary.txt"
import json, re, sys
out, name, rate = sys.argv[1:4]
load = json.load(open(f"{out}/{name}.json"))
cpu = json.load(open(f"{out}/cpu-{name}.json"))
metrics = open(f"{out}/{name}.metrics").read()
found = re.search(r"^kaiwa_store_commit_seconds_count (\S+)", metrics, re.M)
n = cpu["messages"] or 1
commits = float(found.group(1)) / n if found else float("nan")
reply = load["all_reply_ms"]
print(f"{name:24} {rate:>6} {cpu['messages']:>8} {cpu['total_ms_per_message']:>10.3f} "
      f"{commits:>9.2f} {reply['p50']:>8.1f} {reply['p99']:>8.1f}")
PY
}

step "building kaiwa and kaiwa-load (release)"
cargo build --release --locked -p kaiwa -p kaiwa-load --bins
printf '%-24s %6s %8s %10s %9s %8s %8s\n' run "msg/s" messages "CPU ms/msg" commits/msg \
  "p50 ms" "p99 ms" | tee "$out/summary.txt"
for rate in $RATES; do
  for pair in $(seq 1 "$PAIRS"); do
    if [[ -n "$BASELINE" ]]; then run "baseline-$rate-$pair" "$BASELINE" "$rate"; fi
    run "this-$rate-$pair" target/release/kaiwa "$rate"
  done
done
step "summary"
cat "$out/summary.txt"
echo "reports in $out" >&2
