#!/usr/bin/env bash
# A fleet: 3 herald instances x 10,000 connections (30,000 users, one connection each) over
# one Redis, unicast at a fixed rate through Redis, in three setups:
#
#   exact    one redis-server, HERALD_REDIS_SUBSCRIBE=exact (a channel per user held)
#   pattern  one redis-server, HERALD_REDIS_SUBSCRIBE=pattern (PSUBSCRIBE user_noti:*)
#   cluster  a 6-node Redis Cluster (3 masters), HERALD_REDIS_CLUSTER, sharded pub/sub
#
#   benches/fleet.sh                                  # all three, 9,000 msg/s, 20 s windows
#   MODES="exact pattern" RATE=15000 DURATION=30s benches/fleet.sh
#
# One herald-load process per instance (unicast -n 10000, its own users and source
# addresses, RATE/3 msg/s PUBLISHed to Redis round-robin over its users); the three share one
# measured window (--start-at). In cluster mode each generator's users carry a hash tag of
# one master (user ids `{tag}f<i>-<n>`) and it SPUBLISHes to that master: the generators
# split the traffic over the three masters (herald-load publishes on one connection).
#
# Measured over the window, per mode: deliveries/s, lost, latency; per instance, what Redis
# sent its reader (bytes: tcp_info bytes_received of its reader connections, from `ss`;
# messages: /metrics received_from_redis) and that as a share of all published messages; fleet CPU per delivery (the three instances' utime+stime ÷
# deliveries); Redis CPU per published message.
#
# Output: benches/results/fleet-<UTC>/<mode>-gen-<i>.json, <mode>.json, table.md (printed).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
ROOT=$PWD

MODES=${MODES:-"exact pattern cluster"}
INSTANCES=3
PER_INSTANCE=${PER_INSTANCE:-10000}
RATE=${RATE:-9000}                 # messages/s, all generators together
DURATION=${DURATION:-20s}
WARMUP=${WARMUP:-3s}
PAYLOAD=${PAYLOAD:-128}
CONNECT_RATE=${CONNECT_RATE:-3000} # per generator
CONNECT_BUDGET=${CONNECT_BUDGET:-25}
PORT=${PORT:-18700}                # herald i listens on PORT+i
REDIS_PORT=${REDIS_PORT:-16700}
CLUSTER_PORT=${CLUSTER_PORT:-16710} # nodes on CLUSTER_PORT+0..5, cluster bus on +100
SECRET=fleet-bench-secret

if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release --quiet -p herald -p herald-load
fi
HERALD=$ROOT/target/release/herald
LOAD=$ROOT/target/release/herald-load
for tool in redis-server redis-cli python3 curl; do
    command -v "$tool" >/dev/null || { echo "fleet.sh: needs $tool" >&2; exit 2; }
done
duration_s=$(python3 -c "import re; m=re.fullmatch(r'(\d+(?:\.\d+)?)(ms|s|m)?','$DURATION'); print(float(m[1])*{'ms':0.001,'s':1,'m':60,None:1}[m[2]])")
warmup_s=$(python3 -c "import re; m=re.fullmatch(r'(\d+(?:\.\d+)?)(ms|s|m)?','$WARMUP'); print(float(m[1])*{'ms':0.001,'s':1,'m':60,None:1}[m[2]])")

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$ROOT/benches/results/fleet-$STAMP}
mkdir -p "$OUT"

PIDS=()
stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    PIDS=()
}
trap 'set +e; stop_all' EXIT
trap 'exit 130' INT TERM

sleep_until() { python3 -c "import time; time.sleep(max(0, $1 - time.time()))"; }

# One JSON line: per herald pid its utime+stime, the bytes its Redis reader connections
# received (tcp_info bytes_received of the sockets Redis lists as name=herald-reader: what
# Redis sent the reader) and its received_from_redis; the Redis servers' utime+stime summed.
sample() {
    python3 - "$PORT" "${HERALD_PIDS[*]}" "${REDIS_PIDS[*]}" "${REDIS_PORTS[*]}" <<'EOF'
import json, os, re, subprocess, sys, urllib.request
port, heralds, redis, redis_ports = int(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
tck = os.sysconf("SC_CLK_TCK")
def cpu(path):
    stat = open(path).read()
    f = stat[stat.rfind(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / tck
def cli(rp, *args):
    return subprocess.run(["redis-cli", "-p", rp, *args], capture_output=True, text=True).stdout
# Masters only (a replica executes its master's SPUBLISHes again); asked first, so that the
# two counts below are read as close together as possible.
masters = [rp for rp in redis_ports if cli(rp, "role").split()[:1] == ["master"]]
published = 0
for rp in masters:
    published += sum(int(m[1]) for m in re.finditer(r"^cmdstat_s?publish:calls=(\d+)", cli(rp, "info", "commandstats"), re.M))
metrics = []
for i in range(len(heralds)):
    with urllib.request.urlopen(f"http://127.0.0.1:{port + i}/metrics", timeout=5) as r:
        metrics.append(json.load(r))
reader_ports = set()
for rp in redis_ports:
    for line in cli(rp, "client", "list").splitlines():
        if " name=herald-reader " in line:
            reader_ports.add(int(re.search(r"addr=[^ ]*:(\d+) ", line)[1]))
peers = " or ".join(f"dport = :{rp}" for rp in redis_ports)
ss = subprocess.run(["ss", "-tinpH", "state", "established", f"( {peers} )"], capture_output=True, text=True).stdout
received, current = {}, None
for line in ss.splitlines():
    if not line.startswith((" ", "\t")):
        local = line.split()[2]
        pid = re.search(r"pid=(\d+)", line)
        current = (int(local.rsplit(":", 1)[1]), pid[1] if pid else None)
    elif current and current[0] in reader_ports:
        got = re.search(r"bytes_received:(\d+)", line)
        if got:
            received[current[1]] = received.get(current[1], 0) + int(got[1])
out = {"heralds": [], "redis_cpu": sum(cpu(f"/proc/{p}/stat") for p in redis), "published": published}
for pid, m in zip(heralds, metrics):
    out["heralds"].append({"cpu": cpu(f"/proc/{pid}/stat"), "reader_bytes": received.get(pid, 0),
                           "from_redis": m["messages"]["received_from_redis"],
                           "subscriptions": m["redis"]["subscriptions"]})
print(json.dumps(out))
EOF
}

start_redis() {
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --client-output-buffer-limit "pubsub 256mb 64mb 60" >"$OUT/$1-redis.log" 2>&1 &
    PIDS+=("$!")
    REDIS_PIDS=("$!")
    REDIS_PORTS=("$REDIS_PORT")
    wait_port "$REDIS_PORT"
}

# Six nodes, three masters with a replica each: the commands of README's "Redis Cluster".
start_cluster() {
    local i port nodes=() dir="$OUT/cluster"
    rm -rf "$dir"; mkdir -p "$dir"
    REDIS_PIDS=()
    REDIS_PORTS=()
    for i in 0 1 2 3 4 5; do
        port=$((CLUSTER_PORT + i))
        redis-server --port "$port" --cluster-port $((port + 100)) --cluster-enabled yes \
            --cluster-config-file "nodes-$port.conf" --cluster-node-timeout 2000 --dir "$dir" \
            --bind 127.0.0.1 --save '' --appendonly no \
            --client-output-buffer-limit "pubsub 256mb 64mb 60" >"$OUT/$1-redis-$port.log" 2>&1 &
        PIDS+=("$!")
        REDIS_PIDS+=("$!")
        REDIS_PORTS+=("$port")
        nodes+=("127.0.0.1:$port")
    done
    for i in 0 1 2 3 4 5; do wait_port $((CLUSTER_PORT + i)); done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$OUT/$1-cluster-create.log"
    for i in $(seq 100); do
        if redis-cli -p "$CLUSTER_PORT" cluster info | grep -q '^cluster_state:ok'; then return 0; fi
        sleep 0.1
    done
    echo "fleet.sh: the cluster did not come up" >&2
    return 1
}

# For each master, a hash tag whose slot it serves: "port tag" lines.
cluster_tags() {
    python3 - "$CLUSTER_PORT" <<'EOF'
import subprocess, sys
port = sys.argv[1]
def cli(*args):
    return subprocess.run(["redis-cli", "-p", port, *args], capture_output=True, text=True, check=True).stdout
masters = []
for line in cli("cluster", "nodes").splitlines():
    f = line.split()
    if "master" in f[2] and len(f) > 8:
        ranges = [tuple(map(int, r.split("-"))) if "-" in r else (int(r), int(r)) for r in f[8:] if not r.startswith("[")]
        masters.append((int(f[1].split("@")[0].rsplit(":", 1)[1]), ranges))
masters.sort()
for mport, ranges in masters:
    for n in range(1000):
        slot = int(cli("cluster", "keyslot", f"t{n}"))
        if any(a <= slot <= b for a, b in ranges):
            print(mport, f"t{n}")
            break
EOF
}

run_mode() {
    local mode=$1 i backend=() tags=() redis_of=() prefix
    echo "fleet.sh: $mode: $INSTANCES x $PER_INSTANCE connections, $RATE msg/s for $DURATION" >&2
    if [[ $mode == cluster ]]; then
        start_cluster "$mode"
        local seeds=""
        for i in 0 1 2 3 4 5; do seeds+="${seeds:+,}redis://127.0.0.1:$((CLUSTER_PORT + i))"; done
        backend=(HERALD_REDIS_CLUSTER="$seeds")
        while read -r mport tag; do tags+=("$tag"); redis_of+=("127.0.0.1:$mport"); done < <(cluster_tags)
    else
        start_redis "$mode"
        backend=(HERALD_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" HERALD_REDIS_SUBSCRIBE="$mode")
    fi
    HERALD_PIDS=()
    for i in $(seq 0 $((INSTANCES - 1))); do
        env "${backend[@]}" HERALD_LISTEN="127.0.0.1:$((PORT + i))" HERALD_JWT_SECRET=$SECRET \
            HERALD_THREADS=1 HERALD_MAX_CONNECTIONS=$((PER_INSTANCE + 1000)) HERALD_LOG=warn \
            "$HERALD" >"$OUT/$mode-herald-$i.log" 2>&1 &
        PIDS+=("$!")
        HERALD_PIDS+=("$!")
    done
    for i in $(seq 0 $((INSTANCES - 1))); do
        wait_port $((PORT + i))
        for _ in $(seq 100); do
            [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$((PORT + i))/health") == 200 ]] && break
            sleep 0.1
        done
    done
    local start_at window_start window_end gens=()
    start_at=$(python3 -c "import time; print(f'{time.time() + $CONNECT_BUDGET:.3f}')")
    for i in $(seq 0 $((INSTANCES - 1))); do
        local redis=127.0.0.1:$REDIS_PORT command=PUBLISH
        prefix="f$i-"
        if [[ $mode == cluster ]]; then
            redis=${redis_of[$i]}; command=SPUBLISH; prefix="{${tags[$i]}}f$i-"
        fi
        "$LOAD" unicast -n "$PER_INSTANCE" --user-prefix "$prefix" --secret "$SECRET" \
            --url "ws://127.0.0.1:$((PORT + i))/ws?token={token}" --redis "$redis" --redis-command "$command" \
            --source-ips "127.0.0.$((10 * i + 1))-127.0.0.$((10 * i + 10))" --connect-rate "$CONNECT_RATE" \
            --rate "$(python3 -c "print($RATE / $INSTANCES)")" --start-at "$start_at" --warmup "$WARMUP" \
            --duration "$DURATION" --drain 3s --payload-bytes "$PAYLOAD" \
            --json-out "$OUT/$mode-gen-$i.json" >/dev/null 2>"$OUT/$mode-gen-$i.log" &
        gens+=("$!")
    done
    window_start=$(python3 -c "print($start_at + $warmup_s)")
    window_end=$(python3 -c "print($window_start + $duration_s)")
    sleep_until "$window_start"
    local before after la
    before=$(sample)
    sleep_until "$window_end"
    after=$(sample)
    la=$(cut -d' ' -f1-3 /proc/loadavg)
    for pid in "${gens[@]}"; do wait "$pid" || echo "fleet.sh: a generator failed; see $OUT/$mode-gen-*.log" >&2; done
    python3 - "$OUT" "$mode" "$duration_s" "$la" "$before" "$after" <<'EOF'
import json, sys
out, mode, duration, la = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
before, after = json.loads(sys.argv[5]), json.loads(sys.argv[6])
gens = [json.load(open(f"{out}/{mode}-gen-{i}.json")) for i in range(len(before["heralds"]))]
received = sum(g["deliveries"]["received"] for g in gens)
published = sum(g["publish"]["sent_in_window"] for g in gens)
lost = sum(g["deliveries"]["lost"] for g in gens)
established = sum(g["connections"]["established"] for g in gens)
p50 = max(g["latency_us"]["p50"] for g in gens) if all("latency_us" in g for g in gens) else None
p99 = max(g["latency_us"]["p99"] for g in gens) if all("latency_us" in g for g in gens) else None
# Published between the two samples, as Redis counted it (same clock as the readers' counts).
between = after["published"] - before["published"]
instances = []
for b, a in zip(before["heralds"], after["heralds"]):
    rbytes = a["reader_bytes"] - b["reader_bytes"]
    msgs = a["from_redis"] - b["from_redis"]
    instances.append({"reader_bytes": rbytes, "from_redis": msgs,
                      "share_of_published": round(msgs / between, 3) if between else None,
                      "bytes_per_published": round(rbytes / between, 1) if between else None,
                      "subscriptions": b["subscriptions"], "cpu_s": round(a["cpu"] - b["cpu"], 2)})
fleet_cpu = sum(i["cpu_s"] for i in instances)
redis_cpu = after["redis_cpu"] - before["redis_cpu"]
row = {"mode": mode, "established": established, "published": published, "received": received, "lost": lost,
       "deliveries_per_s": round(received / duration), "latency_p50_us": p50, "latency_p99_us": p99,
       "instances": instances, "fleet_cpu_s": round(fleet_cpu, 2),
       "fleet_cpu_us_per_delivery": round(fleet_cpu * 1e6 / received, 2) if received else None,
       "redis_cpu_s": round(redis_cpu, 2),
       "redis_cpu_us_per_message": round(redis_cpu * 1e6 / published, 2) if published else None,
       "loadavg": la}
json.dump(row, open(f"{out}/{mode}.json", "w"), indent=1)
print(json.dumps(row), file=sys.stderr)
EOF
    stop_all
    rm -rf "$OUT/cluster"
}

for mode in $MODES; do
    case $mode in exact | pattern | cluster) ;; *) echo "fleet.sh: unknown mode $mode" >&2; exit 2 ;; esac
    run_mode "$mode"
done

python3 - "$OUT" $MODES <<'EOF' | tee "$OUT/table.md"
import json, sys
out, modes = sys.argv[1], sys.argv[2:]
rows = [json.load(open(f"{out}/{m}.json")) for m in modes]
label = {"exact": "one Redis, exact", "pattern": "one Redis, pattern", "cluster": "3-master cluster, sharded"}
print("| | " + " | ".join(label[r["mode"]] for r in rows) + " |")
print("|---|" + "---:|" * len(rows))
def line(name, f):
    print(f"| {name} | " + " | ".join(f(r) for r in rows) + " |")
line("connections established", lambda r: f"{r['established']:,}")
line("published (window)", lambda r: f"{r['published']:,}")
line("deliveries/s", lambda r: f"{r['deliveries_per_s']:,}")
line("lost", lambda r: f"{r['lost']:,}")
line("latency p50 / p99", lambda r: f"{r['latency_p50_us'] / 1000:.2f} / {r['latency_p99_us'] / 1000:.1f} ms" if r["latency_p50_us"] is not None else "–")
line("Redis → each reader: MB in the window", lambda r: " / ".join(f"{i['reader_bytes'] / 1e6:.1f}" for i in r["instances"]))
line("— bytes per published message", lambda r: " / ".join(f"{i['bytes_per_published']:.0f}" for i in r["instances"]))
line("messages each reader got, share of published", lambda r: " / ".join(f"{i['share_of_published']:.2f}" for i in r["instances"]))
line("fleet server CPU per delivery", lambda r: f"{r['fleet_cpu_us_per_delivery']} µs")
line("Redis CPU per published message", lambda r: f"{r['redis_cpu_us_per_message']} µs")
line("load average (1/5/15 min) at the end", lambda r: r["loadavg"])
EOF
echo "fleet.sh: results in $OUT" >&2
