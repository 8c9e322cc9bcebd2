#!/usr/bin/env bash
# Two builds of the cluster back to back (docs/architecture.md, "What a message costs
# PostgreSQL"): the cluster of scripts/cluster.sh (HAProxy, 2 gateways, 2 workers, PostgreSQL,
# RabbitMQ) started from BASELINE's binary, then from this checkout's, PAIRS times in turn, each
# under CLIENTS clients in a closed loop (or RATE msg/s offered) for DURATION seconds, on a fresh
# database and vhost. Per run: messages completed, the CPU each part used per message
# (bench/cpu.py; the load tool not counted), and p50 and p99 to the last reply. This machine's
# speed moves by a third within an hour, so a change is judged by pairs run minutes apart,
# never by runs of different hours.
#
#   BASELINE=/tmp/before/kaiwa bench/cluster-pairs.sh
#   BASELINE=target/release/kaiwa BASELINE_ENV=KAIWA_WRITE_INTERVAL=0 RATE=1000 \
#     bench/cluster-pairs.sh          a setting against its default, on one build
#
# Settings (environment): BASELINE (required: a kaiwa binary), BASELINE_ENV (NAME=VALUE ...:
# set for the baseline's processes only, to compare a setting), PAIRS (3), CLIENTS (50),
# RATE, DURATION (10), PORT (18082), BASE_PORT (18200), POSTGRES, AMQP (as
# scripts/cluster.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${BASELINE:?BASELINE=<a kaiwa binary> to compare this checkout with}"
BASELINE_ENV=${BASELINE_ENV:-}
RATE=${RATE:-}
PAIRS=${PAIRS:-3}
CLIENTS=${CLIENTS:-50}
DURATION=${DURATION:-10}
PORT=${PORT:-18082}
BASE_PORT=${BASE_PORT:-18200}
POSTGRES=${POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}
out=${OUT:-target/bench/cluster-pairs-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
work=$(mktemp -d "$PWD/target/bench-cluster-pairs.XXXXXX")
# shellcheck source=bench/common.sh
source bench/common.sh
export_bench_settings
cluster_name="kaiwa_bench_pairs_$$"
cluster_up=""
# The binary common.sh's `cluster` starts: each run's own.
kaiwa_binary=""

cleanup() {
  if [[ -n "$cluster_up" ]]; then cluster down || true; fi
  if [[ -n "$pg_tuned" ]]; then untune_postgres || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

tune_postgres
step "building kaiwa and kaiwa-load (release)"
cargo build --release --locked -p kaiwa -p kaiwa-load --bins

run() {
  local name=$1 settings=$3
  kaiwa_binary=$2
  step "$name: $CLIENTS clients${RATE:+ at $RATE msg/s} for ${DURATION}s through HAProxy" \
    "($kaiwa_binary${settings:+, $settings})"
  cluster_up=1
  # The settings reach the cluster's processes only, through the environment they inherit.
  # shellcheck disable=SC2086 # NAME=VALUE words, split but never globbed
  (set -f; if [[ -n "$settings" ]]; then export $settings; fi; cluster up) >/dev/null
  local parts
  read -ra parts <<<"$(cluster_parts)"
  bench/cpu.py snapshot "$work/cpu-before.json" "${parts[@]}"
  load throughput --url "ws://127.0.0.1:$PORT/ws" --clients "$CLIENTS" ${RATE:+--rate "$RATE"} \
    --duration "$DURATION" --label "$name" --json "$out/$name.json" || true
  bench/cpu.py snapshot "$work/cpu-after.json" "${parts[@]}"
  bench/cpu.py report "$work/cpu-before.json" "$work/cpu-after.json" "$out/$name.json" \
    >"$out/cpu-$name.json"
  # The processes' logs, for a run that went wrong (a lease lost shows there, not in the table).
  mkdir -p "$out/logs-$name"
  cp "$work"/cluster/*.log "$out/logs-$name/" 2>/dev/null || true
  cluster down >/dev/null
  cluster_up=""
  # The next run starts on written-out pages, as the first did.
  psql -q "$POSTGRES" -c "CHECKPOINT" >/dev/null
  sync
}

for pair in $(seq 1 "$PAIRS"); do
  run "baseline-$pair" "$BASELINE" "$BASELINE_ENV"
  run "this-$pair" target/release/kaiwa ""
done

{
  echo "kaiwa cluster pairs, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores," \
    "${RATE:-closed loop}${RATE:+ msg/s}, this: $(git describe --always --dirty)," \
    "baseline: $BASELINE${BASELINE_ENV:+ with $BASELINE_ENV}"
  python3 - "$out" "$PAIRS" <<'EOF'
import json, os, sys
out, pairs = sys.argv[1], int(sys.argv[2])
parts = ["gateways", "workers", "haproxy", "postgres", "rabbitmq"]
print(f"{'run':<12} {'messages':>9} {'total':>7} " + " ".join(f"{p:>9}" for p in parts)
      + "  reply p50, p99 ms")
sums = {}
for pair in range(1, pairs + 1):
    for build in ("baseline", "this"):
        name = f"{build}-{pair}"
        try:
            cpu = json.load(open(os.path.join(out, f"cpu-{name}.json")))
        except (OSError, ValueError):
            print(f"{name:<12} no report")
            continue
        by_part = cpu["cpu_ms_per_message"]
        try:
            reply = json.load(open(os.path.join(out, f"{name}.json")))["all_reply_ms"]
            latency = f"  {reply['p50']:.1f}, {reply['p99']:.1f}"
        except (OSError, ValueError, KeyError, TypeError):
            latency = "  -"
        print(f"{name:<12} {cpu['messages']:>9} {cpu['total_ms_per_message']:>7.4f} "
              + " ".join(f"{by_part.get(p) or 0:>9.4f}" for p in parts) + latency)
        s = sums.setdefault(build, {"n": 0, "total": 0.0, **{p: 0.0 for p in parts}})
        s["n"] += 1
        s["total"] += cpu["total_ms_per_message"]
        for p in parts:
            s[p] += by_part.get(p) or 0
if len(sums) == 2:
    base, this = sums["baseline"], sums["this"]
    def change(key):
        b, t = base[key] / base["n"], this[key] / this["n"]
        return f"{100 * (t - b) / b:+.0f} %" if b else "-"
    print(f"{'this vs baseline, means':<22} total {change('total')}, "
          + ", ".join(f"{p} {change(p)}" for p in parts))
EOF
} | tee "$out/table.txt"
