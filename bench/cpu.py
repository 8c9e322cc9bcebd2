#!/usr/bin/env python3
"""CPU time by part of a system under test, for the benchmark scripts.

    bench/cpu.py snapshot FILE PART=PATTERN...   CPU ticks of every process of each part, now
    bench/cpu.py report BEFORE AFTER REPORT.json  CPU ms per completed message, by part (JSON)

A part's processes are found when each snapshot is taken, so that PostgreSQL backends started
during the run count from zero; a process that ended between the two is not counted (the
benchmarks keep their connections open, so that loses nothing that matters). PATTERN is one of
  pid:N[,N...]    those processes (kaiwa's, by the pid files of the scripts)
  comm:NAME       every process whose command name is NAME (postgres, beam.smp, haproxy)
The load tool is never a part: what it costs is not the server's.
"""
import json
import os
import sys


def ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime: fields 14 and 15 of stat(5), 12 and 13 after the command name.
    return int(fields[11]) + int(fields[12])


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def pids_of(pattern):
    kind, _, value = pattern.partition(":")
    if kind == "pid":
        return [int(p) for p in value.split(",") if p]
    if kind == "comm":
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and comm(p) == value]
    sys.exit(f"unknown pattern {pattern!r}: pid:N,... or comm:NAME")


def snapshot(path, parts):
    taken = {}
    for part in parts:
        name, _, pattern = part.partition("=")
        taken[name] = {
            str(pid): t for pid in pids_of(pattern) if (t := ticks(pid)) is not None
        }
    with open(path, "w") as f:
        json.dump(taken, f)


def report(before_path, after_path, report_path):
    before, after = (json.load(open(p)) for p in (before_path, after_path))
    run = json.load(open(report_path))
    messages = run.get("completed") or 0
    per_tick_ms = 1000.0 / os.sysconf("SC_CLK_TCK")
    parts = {}
    for name, now in after.items():
        then = before.get(name, {})
        used = sum(t - then.get(pid, 0) for pid, t in now.items())
        parts[name] = round(used * per_tick_ms / messages, 4) if messages else None
    total = sum(v for v in parts.values() if v is not None)
    print(json.dumps({"messages": messages, "cpu_ms_per_message": parts,
                      "total_ms_per_message": round(total, 4)}))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "snapshot":
        snapshot(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 5 and sys.argv[1] == "report":
        report(*sys.argv[2:])
    else:
        sys.exit(__doc__)
