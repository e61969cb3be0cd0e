#!/usr/bin/env bash
# 100,000 concurrent authenticated connections on one machine, held HOLD, every one still
# receiving.
#
#   benches/run-100k.sh                  # HOLD=5m
#   HOLD=30s benches/run-100k.sh         # quick check
#
# The per-process open-file limit (20,000 here, not raisable) caps one process at ~19.9k
# sockets, so: K herald instances on one port (SO_REUSEPORT; HERALD_THREADS=1 each, one
# redis-server between them) and L herald-load processes, each with its own users
# (--user-prefix g<i>-) and its own source addresses (127.0.0.<10i+1>-127.0.0.<10i+10>).
# Every generator runs unicast: one connection per user, messages PUBLISHed to Redis
# round-robin over its users at a rate that gives each user MSGS_PER_USER messages during
# the hold; all generators share one measured window (--start-at).
#
# Output: benches/results/100k-<UTC timestamp>/gen-<i>.json (herald-load reports),
# summary.json and summary.md (printed); herald-<i>.log, redis.log. Exit status 1 when
# the run misses its bar (established < TOTAL, an unexpected close, a lost message, or a
# connection that received nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
ROOT=$PWD

TOTAL=${TOTAL:-100000}
K=${K:-6}                     # herald instances
L=${L:-6}                     # herald-load processes
HOLD=${HOLD:-5m}
MSGS_PER_USER=${MSGS_PER_USER:-3}
PORT=${PORT:-18600}
REDIS_PORT=${REDIS_PORT:-16600}
CONNECT_RATE=${CONNECT_RATE:-4000}     # per generator
CONNECT_BUDGET=${CONNECT_BUDGET:-45}   # seconds from launch to the shared start
WARMUP=${WARMUP:-5s}
PAYLOAD=${PAYLOAD:-128}
MAX_PER_INSTANCE=${MAX_PER_INSTANCE:-19500}
SECRET=run-100k-secret

if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release --quiet -p herald -p herald-load
fi
HERALD=$ROOT/target/release/herald
LOAD=$ROOT/target/release/herald-load
command -v redis-server >/dev/null || { echo "run-100k.sh: needs redis-server" >&2; exit 2; }
command -v python3 >/dev/null || { echo "run-100k.sh: needs python3" >&2; exit 2; }

hold_s=$(python3 -c "
import sys, re
m = re.fullmatch(r'(\d+(?:\.\d+)?)(ms|s|m|h)?', '$HOLD')
if not m: sys.exit('HOLD: use 30s, 5m, 1h')
print(float(m[1]) * {'ms': 0.001, 's': 1, 'm': 60, 'h': 3600, None: 1}[m[2]])")
per_gen=$((TOTAL / L))
if (( per_gen > 19000 )); then echo "run-100k.sh: $per_gen connections per generator is over ~19k; raise L" >&2; exit 2; fi
if (( TOTAL > K * MAX_PER_INSTANCE )); then echo "run-100k.sh: raise K: $K x $MAX_PER_INSTANCE < $TOTAL" >&2; exit 2; fi

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$ROOT/benches/results/100k-$STAMP}
mkdir -p "$OUT"

PIDS=()
cleanup() {
    set +e
    for pid in "${GEN_PIDS[@]}" "${PIDS[@]}"; do stop_pid "$pid"; done
}
GEN_PIDS=()
trap cleanup EXIT
trap 'exit 130' INT TERM

# utime+stime (seconds) and VmRSS (kB) summed over pids
sample() {
    python3 - "$@" <<'EOF'
import os, sys
tck = os.sysconf("SC_CLK_TCK")
cpu = rss = 0
for pid in sys.argv[1:]:
    try:
        stat = open(f"/proc/{pid}/stat").read()
        f = stat[stat.rfind(")") + 2:].split()
        cpu += (int(f[11]) + int(f[12])) / tck
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
    except OSError:
        pass
print(f"{cpu:.2f} {rss}")
EOF
}

echo "run-100k.sh: $TOTAL connections, $K herald instances, $L generators, hold $HOLD; results in $OUT" >&2
la_start=$(cut -d' ' -f1-3 /proc/loadavg)

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --client-output-buffer-limit "pubsub 256mb 64mb 60" >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_port "$REDIS_PORT"

HERALD_PIDS=()
for i in $(seq 0 $((K - 1))); do
    HERALD_LISTEN=127.0.0.1:$PORT HERALD_REDIS_URL=redis://127.0.0.1:$REDIS_PORT HERALD_JWT_SECRET=$SECRET \
        HERALD_THREADS=1 HERALD_MAX_CONNECTIONS=$MAX_PER_INSTANCE HERALD_LOG=warn \
        "$HERALD" >"$OUT/herald-$i.log" 2>&1 &
    HERALD_PIDS+=("$!")
    PIDS+=("$!")
done
wait_port "$PORT"
sleep 1
for pid in "${HERALD_PIDS[@]}"; do
    alive "$pid" || { echo "run-100k.sh: herald $pid exited; see $OUT/herald-*.log" >&2; exit 1; }
done
read -r base_cpu base_rss < <(sample "${HERALD_PIDS[@]}")
read -r redis_cpu0 _ < <(sample "$REDIS_PID")

now=$(date +%s.%N)
start_at=$(python3 -c "print(f'{$now + $CONNECT_BUDGET:.3f}')")
warmup_s=$(python3 -c "import re; m=re.fullmatch(r'(\d+(?:\.\d+)?)(ms|s|m)?','$WARMUP'); print(float(m[1])*{'ms':0.001,'s':1,'m':60,None:1}[m[2]])")
for i in $(seq 0 $((L - 1))); do
    n=$per_gen
    (( i == L - 1 )) && n=$((TOTAL - per_gen * (L - 1)))
    rate=$(python3 -c "import math; print(max(1, math.ceil($MSGS_PER_USER * $n / $hold_s)))")
    ip0=$((10 * i + 1)); ip1=$((10 * i + 10))
    "$LOAD" unicast -n "$n" --user-prefix "g$i-" --secret "$SECRET" \
        --url "ws://127.0.0.1:$PORT/ws?token={token}" --redis "127.0.0.1:$REDIS_PORT" \
        --source-ips "127.0.0.$ip0-127.0.0.$ip1" --connect-rate "$CONNECT_RATE" --connect-timeout 30s \
        --rate "$rate" --start-at "$start_at" --warmup "$WARMUP" --duration "$HOLD" --drain 5s \
        --token-ttl 2h --payload-bytes "$PAYLOAD" \
        --json-out "$OUT/gen-$i.json" >/dev/null 2>"$OUT/gen-$i.log" &
    GEN_PIDS+=("$!")
done

# Connections per instance and server memory, once everyone is in the window.
sleep_until() { python3 -c "import time; time.sleep(max(0, $1 - time.time()))"; }
sleep_until "$(python3 -c "print($start_at + $warmup_s)")"
read -r w0_cpu w0_rss < <(sample "${HERALD_PIDS[@]}")
read -r redis_w0 _ < <(sample "$REDIS_PID")
w0_gen=$(sample "${GEN_PIDS[@]}")
fds=()
for pid in "${HERALD_PIDS[@]}"; do fds+=("$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)"); done
established=$(ss -Htn state established "( sport = :$PORT )" | wc -l)
echo "run-100k.sh: window started: $established server-side established sockets; descriptors per instance: ${fds[*]}" >&2
la_window=$(cut -d' ' -f1-3 /proc/loadavg)
# Progress every minute of the hold.
end_at=$(python3 -c "print($start_at + $warmup_s + $hold_s)")
while python3 -c "import sys,time; sys.exit(0 if time.time() < $end_at - 1 else 1)"; do
    sleep "$(python3 -c "import time; print(max(0.1, min(60, $end_at - 1 - time.time())))")"
    est=$(ss -Htn state established "( sport = :$PORT )" | wc -l)
    echo "run-100k.sh: holding: $est established, loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done
read -r w1_cpu w1_rss < <(sample "${HERALD_PIDS[@]}")
read -r redis_w1 _ < <(sample "$REDIS_PID")
w1_gen=$(sample "${GEN_PIDS[@]}")
la_end=$(cut -d' ' -f1-3 /proc/loadavg)
gen_fail=0
for pid in "${GEN_PIDS[@]}"; do wait "$pid" || gen_fail=$((gen_fail + 1)); done
GEN_PIDS=()
for pid in "${HERALD_PIDS[@]}"; do
    alive "$pid" || echo "run-100k.sh: herald $pid died during the run" >&2
done

python3 - "$OUT" <<EOF
import json, glob, sys
out = sys.argv[1]
gens = []
for i in range($L):
    try:
        gens.append(json.load(open(f"{out}/gen-{i}.json")))
    except (OSError, ValueError):
        gens.append(None)
ok = [g for g in gens if g]
s = lambda f: sum(f(g) for g in ok)
est = s(lambda g: g["connections"]["established"])
unexpected = s(lambda g: g["connections"]["unexpected_closes"])
failed = s(lambda g: g["connections"]["failed"])
lost = s(lambda g: g["deliveries"]["lost"])
dup = s(lambda g: g["deliveries"]["duplicates"])
expected = s(lambda g: g["deliveries"]["expected"])
received = s(lambda g: g["deliveries"]["received"])
silent = s(lambda g: g["per_connection"]["received_none_in_window"])
open_end = s(lambda g: g["per_connection"]["open_at_end"])
min_msgs = min((g["per_connection"]["min_window_messages"] for g in ok
                if g["per_connection"]["min_window_messages"] is not None), default=None)
max_silence = max((g["per_connection"]["max_silence_at_end_s"] for g in ok), default=None)
connected_last = max(g["window"]["connected_at_unix_s"] for g in ok) if ok else None
window_first = min(g["window"]["start_unix_s"] for g in ok) if ok else None
p = lambda q: max(g["latency_us"][q] for g in ok if g.get("latency_us"))
closes = {}
failures = {}
for g in ok:
    for k, v in g["connections"]["closes"].items():
        closes[k] = closes.get(k, 0) + v
    for k, v in g["connections"]["failures"].items():
        failures[k] = failures.get(k, 0) + v
hold_s = $hold_s
herald_cpu = $w1_cpu - $w0_cpu
w0g, w1g = "$w0_gen".split(), "$w1_gen".split()
summary = {
    "total_target": $TOTAL, "herald_instances": $K, "generators": $L, "hold": "$HOLD",
    "generator_reports": len(ok), "generator_failures": $gen_fail,
    "established": est, "failed": failed, "failures": failures,
    "server_side_established_at_window_start": $established,
    "descriptors_per_instance": [int(x) for x in "${fds[*]}".split()],
    "all_connected_before_window": (connected_last is not None and window_first is not None
                                    and connected_last <= window_first),
    "unexpected_closes": unexpected, "closes_after_window": closes,
    "messages_expected": expected, "messages_received": received, "lost": lost, "duplicates": dup,
    "open_at_end": open_end, "connections_that_received_nothing": silent,
    "min_messages_per_connection": min_msgs, "longest_silence_at_end_s": max_silence,
    "latency_ms_worst_generator": {q: round(p(q) / 1000, 2) for q in ("p50", "p99", "p999", "max")} if ok else None,
    "herald_rss_kb_baseline": $base_rss, "herald_rss_kb_hold": $w0_rss, "herald_rss_kb_end": $w1_rss,
    "herald_rss_per_conn_bytes": round(($w0_rss - $base_rss) * 1024 / max(est, 1)),
    "herald_cpu_seconds_hold": round(herald_cpu, 2),
    "herald_cores_busy_hold": round(herald_cpu / hold_s, 3),
    "redis_cpu_seconds_hold": round($redis_w1 - $redis_w0, 2),
    # the generators' own accounting of the window (getrusage), summed
    "generators_cpu_seconds_hold": round(s(lambda g: g["generator"]["cpu_seconds"] or 0), 2),
    "generators_rss_kb_sum": int(w1g[1]),
    "total_cpu_seconds_hold": round(herald_cpu + ($redis_w1 - $redis_w0)
                                    + s(lambda g: g["generator"]["cpu_seconds"] or 0), 2),
    "loadavg": {"start": "$la_start", "window_start": "$la_window", "end": "$la_end"},
}
summary["pass"] = (est >= $TOTAL and unexpected == 0 and lost == 0 and silent == 0
                   and len(ok) == $L and summary["all_connected_before_window"])
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
rows = [
    ("established (generators)", f"{est:,} / {$TOTAL:,} ({failed} failed)"),
    ("server-side established sockets at window start", f"{$established:,}"),
    ("descriptors per herald instance", ", ".join(str(x) for x in summary["descriptors_per_instance"])),
    ("all connected before the shared window", summary["all_connected_before_window"]),
    ("hold", "$HOLD"),
    ("unexpected closes", unexpected),
    ("messages expected / received / lost / duplicates", f"{expected:,} / {received:,} / {lost} / {dup}"),
    ("connections open at the end / that received nothing", f"{open_end:,} / {silent}"),
    ("fewest messages on one connection / longest silence at the end", f"{min_msgs} / {max_silence} s"),
    ("latency p50 / p99 / p99.9 / max (ms, worst generator)",
     " / ".join(str(v) for v in (summary["latency_ms_worst_generator"] or {}).values())),
    ("herald RSS per connection (sum over instances)", f"{summary['herald_rss_per_conn_bytes']} B "
     f"({$base_rss/1024:.0f} -> {$w0_rss/1024:.0f} MiB)"),
    ("herald CPU during the hold", f"{summary['herald_cpu_seconds_hold']} s ({summary['herald_cores_busy_hold']} cores)"),
    ("redis / generators CPU during the hold", f"{summary['redis_cpu_seconds_hold']} s / {summary['generators_cpu_seconds_hold']} s"),
    ("total CPU during the hold (herald + redis + generators)", f"{summary['total_cpu_seconds_hold']} s"),
    ("load average start / window / end", f"{'$la_start'} / {'$la_window'} / {'$la_end'}"),
    ("**pass**", summary["pass"]),
]
md = ["### 100k concurrent connections — $STAMP", "",
      f"$K herald instances (1 thread each, one port, Redis), $L herald-load processes, unicast via Redis, "
      f"$MSGS_PER_USER messages per user over the hold", "", "| | |", "|---|---|"]
md += [f"| {k} | {v} |" for k, v in rows]
open(f"{out}/summary.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
sys.exit(0 if summary["pass"] else 1)
EOF
