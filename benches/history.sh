#!/usr/bin/env bash
# What history (HERALD_HISTORY_SIZE) costs, embedded and with Redis:
#
#   benches/history.sh                         # builds release binaries, ~6 minutes
#   ROUNDS=1 DURATION=5s SKIP_BUILD=1 benches/history.sh
#
# 1. Unicast delivery, history off vs on (HISTORY_SIZE per user), per broker mode:
#    N users, one connection each, published through herald's POST /publish (the only way in
#    embedded mode; with Redis herald then PUBLISHes, or with history calls FCALL
#    herald_publish). Two runs each: a fixed RATE (server CPU per delivery) and --rate max
#    (deliveries/s; closed loop over PUBLISH_CONNS keep-alive connections). Off and on
#    alternate, ROUNDS times; the table shows medians. Redis CPU over the same window is
#    measured separately (the generators share a window set with --start-at).
# 2. Memory per stored notification: MEM_NOTIFICATIONS notifications of PAYLOAD bytes
#    spread over MEM_USERS users (POST /publish/batch, no one connected). Redis: INFO memory
#    used_memory after - before, per notification. Embedded: herald's RSS growth.
# 3. Replay speed: REPLAY_SIZE notifications for one user (HERALD_HISTORY_SIZE=REPLAY_SIZE),
#    then `herald-load replay` connects with since=0 REPLAY_REPEATS times in a row and times
#    each from the upgrade request to `resumed`.
#
# Output: benches/results/history-<UTC>/*.json (herald-load reports and the script's own
# measurements), meta.json, table.md (printed).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
ROOT=$PWD

MODES=${MODES:-"embedded redis"}
N=${N:-10000}
RATE=${RATE:-5000}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
ROUNDS=${ROUNDS:-2}
PAYLOAD=${PAYLOAD:-128}
PUBLISH_CONNS=${PUBLISH_CONNS:-8}
HISTORY_SIZE=${HISTORY_SIZE:-100}
SERVER_THREADS=${SERVER_THREADS:-2}
CONNECT_BUDGET=${CONNECT_BUDGET:-8}  # seconds from start to the first publish
MEM_USERS=${MEM_USERS:-1000}
MEM_NOTIFICATIONS=${MEM_NOTIFICATIONS:-100000}
REPLAY_SIZE=${REPLAY_SIZE:-100000}
REPLAY_REPEATS=${REPLAY_REPEATS:-5}
PORT=${PORT:-18960}
REDIS_PORT=${REDIS_PORT:-16960}
SECRET=history-bench-secret
API_KEY=history-bench-key

if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release --quiet -p herald -p herald-load
fi
HERALD=$ROOT/target/release/herald
LOAD=$ROOT/target/release/herald-load
[[ -x $HERALD && -x $LOAD ]] || { echo "history.sh: build herald and herald-load first" >&2; exit 2; }
for tool in redis-server redis-cli python3; do
    command -v "$tool" >/dev/null || { echo "history.sh: needs $tool" >&2; exit 2; }
done
seconds() { python3 -c "import re; m=re.fullmatch(r'(\d+(?:\.\d+)?)(ms|s|m)?','$1'); print(float(m[1])*{'ms':0.001,'s':1,'m':60,None:1}[m[2]])"; }
duration_s=$(seconds "$DURATION")
warmup_s=$(seconds "$WARMUP")

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$ROOT/benches/results/history-$STAMP}
mkdir -p "$OUT"
RUNLOG=$OUT/runs.log

PIDS=()
stop_all() {
    local i
    # Newest first: herald goes before the Redis it uses (no reconnect warnings in its log).
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
    PIDS=()
}
trap 'set +e; stop_all' EXIT
trap 'exit 130' INT TERM

sleep_until() { python3 -c "import time; time.sleep(max(0, $1 - time.time()))"; }
cpu_of() { python3 -c "import os,sys; s=open('/proc/$1/stat').read(); f=s[s.rfind(')')+2:].split(); print((int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK'))"; }
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }
used_memory() { redis-cli -p "$REDIS_PORT" info memory | tr -d '\r' | awk -F: '/^used_memory:/{print $2}'; }

# start MODE HISTORY_SIZE [extra env...]: a fresh Redis (redis mode) and a fresh herald.
start() {
    local mode=$1 size=$2; shift 2
    stop_all
    local env=(HERALD_LISTEN=127.0.0.1:$PORT HERALD_JWT_SECRET=$SECRET HERALD_API_KEY=$API_KEY
        HERALD_THREADS=$SERVER_THREADS HERALD_MAX_CONNECTIONS=$((N + 1000)) HERALD_LOG=warn
        HERALD_HISTORY_SIZE=$size "$@")
    REDIS_PID=
    if [[ $mode == redis ]]; then
        redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
            --client-output-buffer-limit "pubsub 256mb 64mb 60" >>"$OUT/redis.log" 2>&1 &
        REDIS_PID=$!
        PIDS+=("$REDIS_PID")
        wait_port "$REDIS_PORT"
        env+=(HERALD_REDIS_URL=redis://127.0.0.1:$REDIS_PORT)
    fi
    env "${env[@]}" "$HERALD" >>"$OUT/herald.log" 2>&1 &
    HERALD_PID=$!
    PIDS+=("$HERALD_PID")
    wait_port "$PORT"
    # /ready: with Redis, the reader is subscribed and the function loaded.
    for _ in $(seq 100); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/ready" 2>/dev/null) == 200 ]] && return 0
        sleep 0.05
    done
    echo "history.sh: herald ($mode) not ready" >&2
    return 1
}

# publish_batch USERS PER_USER PREFIX: USERS x PER_USER notifications of PAYLOAD bytes through
# POST /publish/batch (1,000 a request), users interleaved.
publish_batch() {
    python3 - "$PORT" "$API_KEY" "$1" "$2" "$3" "$PAYLOAD" <<'EOF'
import http.client, json, sys
port, key, users, per_user, prefix, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
head = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
items, n = [], 0
def flush():
    global items
    if not items:
        return
    conn.request("POST", "/publish/batch", json.dumps({"items": items}), head)
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        sys.exit(f"publish/batch: {r.status} {body[:200]!r}")
    items = []
for i in range(per_user):
    for u in range(users):
        m = {"type": "n", "seq": i, "pad": ""}
        m["pad"] = "x" * max(0, payload - len(json.dumps(m)))
        items.append({"user_id": f"{prefix}{u}", "message": m})
        n += 1
        if len(items) == 1000:
            flush()
flush()
EOF
}

{
    echo "{\"started\":\"$STAMP\",\"host\":\"$(hostname)\",\"cpus\":$(nproc),\"kernel\":\"$(uname -r)\","
    echo "\"redis\":\"$(redis-server --version | grep -o 'v=[^ ]*' | cut -d= -f2)\","
    echo "\"herald_commit\":\"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)\","
    echo "\"connections\":$N,\"rate\":$RATE,\"duration\":\"$DURATION\",\"rounds\":$ROUNDS,\"payload_bytes\":$PAYLOAD,"
    echo "\"history_size\":$HISTORY_SIZE,\"server_threads\":$SERVER_THREADS,\"mem_users\":$MEM_USERS,"
    echo "\"mem_notifications\":$MEM_NOTIFICATIONS,\"replay_size\":$REPLAY_SIZE,\"replay_repeats\":$REPLAY_REPEATS,"
    echo "\"loadavg_start\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
} >"$OUT/meta.json"
echo "history.sh: results in $OUT" >&2

# ---- 1. unicast delivery ---------------------------------------------------------------
# unicast NAME MODE SIZE RATE: one herald-load run; Redis CPU over its window to NAME-redis.json.
unicast() {
    local name=$1 mode=$2 size=$3 rate=$4
    start "$mode" "$size"
    local start_at window_start window_end
    start_at=$(python3 -c "import time; print(round(time.time() + $CONNECT_BUDGET, 3))")
    window_start=$(python3 -c "print($start_at + $warmup_s)")
    window_end=$(python3 -c "print($window_start + $duration_s)")
    local la0; la0=$(cut -d' ' -f1-3 /proc/loadavg)
    echo "== $name: $mode, history $size, rate $rate (loadavg $la0)" | tee -a "$RUNLOG" >&2
    "$LOAD" unicast -n "$N" --user-prefix u --url "ws://127.0.0.1:$PORT/ws?token={token}" --secret "$SECRET" \
        --publish http --api-key "$API_KEY" --publish-conns "$PUBLISH_CONNS" --rate "$rate" \
        --duration "$DURATION" --warmup "$WARMUP" --drain 3s --start-at "$start_at" \
        --payload-bytes "$PAYLOAD" --server-pid "$HERALD_PID" --quiet --json-out "$OUT/$name.json" \
        >/dev/null 2>>"$RUNLOG" &
    local gen=$!
    if [[ -n $REDIS_PID ]]; then
        sleep_until "$window_start"
        local r0; r0=$(cpu_of "$REDIS_PID")
        sleep_until "$window_end"
        local r1; r1=$(cpu_of "$REDIS_PID")
        echo "{\"redis_cpu_seconds\":$(python3 -c "print(round($r1 - $r0, 3))")}" >"$OUT/$name-redis.json"
    fi
    wait "$gen" || echo "   herald-load failed" | tee -a "$RUNLOG" >&2
    echo "   loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$RUNLOG" >&2
    stop_all
    sleep 1
}
for round in $(seq "$ROUNDS"); do
    for mode in $MODES; do
        for h in off on; do
            size=0; [[ $h == on ]] && size=$HISTORY_SIZE
            unicast "unicast-$mode-$h-r$round" "$mode" "$size" "$RATE"
            unicast "unicast-max-$mode-$h-r$round" "$mode" "$size" max
        done
    done
done

# ---- 2. memory per stored notification ------------------------------------------------
per_user=$(( (MEM_NOTIFICATIONS + MEM_USERS - 1) / MEM_USERS ))
stored=$(( per_user * MEM_USERS ))
for mode in $MODES; do
    start "$mode" "$per_user" HERALD_HISTORY_MEMORY=1GiB
    sleep 0.5
    before_rss=$(rss_kb "$HERALD_PID")
    before_redis=0; [[ $mode == redis ]] && before_redis=$(used_memory)
    publish_batch "$MEM_USERS" "$per_user" m
    sleep 0.5
    after_rss=$(rss_kb "$HERALD_PID")
    after_redis=0; [[ $mode == redis ]] && after_redis=$(used_memory)
    keys=None; [[ $mode == redis ]] && keys=$(redis-cli -p "$REDIS_PORT" dbsize)
    python3 - "$OUT/memory-$mode.json" <<EOF
import json, sys
stored = $stored
out = {"mode": "$mode", "users": $MEM_USERS, "per_user": $per_user, "stored": stored, "payload_bytes": $PAYLOAD,
       "herald_rss_kb_before": $before_rss, "herald_rss_kb_after": $after_rss,
       "herald_rss_bytes_per_notification": round(($after_rss - $before_rss) * 1024 / stored, 1),
       "redis_keys": $keys}
if "$mode" == "redis":
    out.update({"redis_used_memory_before": $before_redis, "redis_used_memory_after": $after_redis,
                "redis_bytes_per_notification": round(($after_redis - $before_redis) / stored, 1)})
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps(out))
EOF
    stop_all
done >>"$RUNLOG"

# ---- 3. replay speed --------------------------------------------------------------------
for mode in $MODES; do
    start "$mode" "$REPLAY_SIZE" HERALD_HISTORY_MEMORY=1GiB
    publish_batch 1 "$REPLAY_SIZE" replay-
    r0=0; [[ -n $REDIS_PID ]] && r0=$(cpu_of "$REDIS_PID")
    echo "== replay: $mode, $REPLAY_SIZE notifications x $REPLAY_REPEATS" | tee -a "$RUNLOG" >&2
    "$LOAD" replay --url "ws://127.0.0.1:$PORT/ws?token={token}&since=0" --secret "$SECRET" --user replay-0 \
        -n "$REPLAY_REPEATS" --connect-timeout 30s --server-pid "$HERALD_PID" --quiet \
        --json-out "$OUT/replay-$mode.json" >/dev/null 2>>"$RUNLOG" || echo "   replay failed" | tee -a "$RUNLOG" >&2
    if [[ -n $REDIS_PID ]]; then
        r1=$(cpu_of "$REDIS_PID")
        echo "{\"redis_cpu_seconds\":$(python3 -c "print(round($r1 - $r0, 3))")}" >"$OUT/replay-$mode-redis.json"
    fi
    stop_all
done

sed -i "s/}\$/,\"loadavg_end\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}/" "$OUT/meta.json"

# ---- table ------------------------------------------------------------------------------
python3 - "$OUT" "$MODES" "$ROUNDS" <<'EOF' | tee "$OUT/table.md"
import json, os, statistics, sys
out, modes, rounds = sys.argv[1], sys.argv[2].split(), int(sys.argv[3])
meta = json.load(open(f"{out}/meta.json"))
def load(name):
    try:
        return json.load(open(f"{out}/{name}.json"))
    except (OSError, ValueError):
        return None
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def fmt(x, d=0):
    return "n/a" if x is None else f"{x:,.{d}f}"
def spread(xs, d=0):
    """median (min–max): the machine is shared, the range says how much to trust the median."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return fmt(xs[0], d)
    return f"{fmt(statistics.median(xs), d)} ({fmt(min(xs), d)}–{fmt(max(xs), d)})"
print(f"History cost, {meta['connections']:,} users x 1 connection, payload {meta['payload_bytes']} B, "
      f"HERALD_HISTORY_SIZE={meta['history_size']}, {meta['server_threads']} server threads, "
      f"{meta['cpus']} CPUs, median of {rounds} round(s); herald {meta['herald_commit']}\n")
print(f"| mode | history | deliveries/s at --rate max | herald CPU µs/delivery at --rate max | "
      f"herald CPU µs/delivery at {meta['rate']:,}/s | Redis CPU µs/delivery at {meta['rate']:,}/s | "
      f"p99 latency ms at {meta['rate']:,}/s | lost |")
print("|---|---|---|---|---|---|---|---|")
cost = {}
for mode in modes:
    for h in ("off", "on"):
        fixed = [load(f"unicast-{mode}-{h}-r{r}") for r in range(1, rounds + 1)]
        mx = [load(f"unicast-max-{mode}-{h}-r{r}") for r in range(1, rounds + 1)]
        rcpu = [load(f"unicast-{mode}-{h}-r{r}-redis") for r in range(1, rounds + 1)]
        dps = [m["deliveries_per_sec"] for m in mx if m]
        cpu_max = [m["server"]["cpu_us_per_delivery"] for m in mx if m]
        cpu = [f["server"]["cpu_us_per_delivery"] for f in fixed if f]
        redis = []
        if mode == "redis":
            redis = [r["redis_cpu_seconds"] * 1e6 / f["deliveries"]["received"]
                     for r, f in zip(rcpu, fixed) if r and f and f["deliveries"]["received"]]
        p99 = [f["latency_us"]["p99"] / 1000 for f in fixed if f and f["latency_us"].get("p99") is not None]
        lost = sum((f["deliveries"]["lost"] for f in fixed if f), 0) + sum((m["deliveries"]["lost"] for m in mx if m), 0)
        cost[(mode, h)] = (med(cpu), med(redis), med(dps), med(cpu_max))
        print(f"| {mode} | {h} | {spread(dps)} | {spread(cpu_max, 1)} | {spread(cpu, 1)} | "
              f"{spread(redis, 1) if mode == 'redis' else '—'} | {spread(p99, 1)} | {lost} |")
print()
for mode in modes:
    off, on = cost.get((mode, "off")), cost.get((mode, "on"))
    if off and on and off[0] and on[0]:
        line = f"* {mode}: history on costs {100 * (on[0] / off[0] - 1):+.0f}% herald CPU per delivery at the fixed rate"
        if off[3] and on[3]:
            line += f" ({100 * (on[3] / off[3] - 1):+.0f}% at --rate max)"
        if off[2] and on[2]:
            line += f", {100 * (on[2] / off[2] - 1):+.0f}% deliveries/s at --rate max"
        if mode == "redis" and off[1] and on[1]:
            line += f"; herald + Redis CPU per delivery {100 * ((on[0] + on[1]) / (off[0] + off[1]) - 1):+.0f}%"
        if mode == "embedded":
            line += " (target: ≤ +25%)"
        print(line)
print()
print("| mode | memory per stored notification | replay (since=0) notifications/s, median (min–max) | server CPU µs per replayed notification |")
print("|---|---|---|---|")
for mode in modes:
    mem, rep, rrep = load(f"memory-{mode}"), load(f"replay-{mode}"), load(f"replay-{mode}-redis")
    if mem and mode == "redis":
        memtext = f"{fmt(mem['redis_bytes_per_notification'])} B Redis used_memory ({mem['stored']:,} for {mem['users']:,} users)"
    elif mem:
        memtext = f"{fmt(mem['herald_rss_bytes_per_notification'])} B herald RSS ({mem['stored']:,} for {mem['users']:,} users)"
    else:
        memtext = "n/a"
    if rep:
        cpu = rep["server"]["cpu_us_per_notification"]
        cputext = fmt(cpu, 2)
        if rrep and rep["notifications"]:
            cputext += f" herald + {rrep['redis_cpu_seconds'] * 1e6 / rep['notifications']:.2f} Redis"
        reptext = f"{spread([r['notifications_per_sec'] for r in rep['replays']])}, {len(rep['replays'])} x {rep['replays'][0]['notifications']:,}"
    else:
        reptext = cputext = "n/a"
    print(f"| {mode} | {memtext} | {reptext} | {cputext} |")
EOF
echo "history.sh: JSON in $OUT" >&2
