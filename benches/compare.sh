#!/usr/bin/env bash
# herald vs nginx+Nchan vs the ceiling, same generator, same machine, same run.
#
#   benches/compare.sh                 # builds release binaries, ~15 minutes
#   N=10000 DURATION=10s UNICAST_RATE=10000 SKIP_BUILD=1 benches/compare.sh
#   SCENARIOS="unicast redis" SERVERS="herald nchan" benches/compare.sh   # a subset
#
# Scenarios (each server is started fresh for each run and killed after it; SCENARIOS picks
# groups, SERVERS picks servers; the ceiling only runs where it has an equivalent):
#   connect  a.  N connections at max rate, held HOLD       -> connects/s, RSS/conn, CPU/conn
#   bcast    b.  N connections of one user/channel           -> deliveries/s, CPU/delivery, latency
#        b1 fixed BCAST_RATE_LOW msgs/s (default 10): one message at a time
#        b2 closed loop (--rate max, BCAST_INFLIGHT_MSGS messages in flight): throughput
#        b3 fixed rate = BCAST_HIGH_FRACTION (0.9) x the lowest b2 rate of the three servers
#           ("the highest rate all three sustain"), unless BCAST_RATE_HIGH is given
#   unicast  c.  N users, one connection each, HTTP publish, embedded broker / memory store
#        c1 open loop UNICAST_RATE msgs/s (10000) over OPEN_PUBLISH_CONNS (8) connections
#        c2 closed loop (--rate max) over UNICAST_PUBLISHERS (4) connections
#        (PERF=1, the default when perf is installed: one more c2 run of herald alone under
#        `perf record -e cpu-clock -g`, kept out of the table -> perf.txt)
#   redis    d.  the same N users with a redis-server this script starts on a free port:
#                herald with HERALD_REDIS_URL, Nchan with its Redis store (NCHAN_REDIS_MODE)
#        d1 closed loop, HTTP publish, UNICAST_PUBLISHERS connections
#           (PERF=1: one more d1 run of herald alone under perf -> perf-redis.txt)
#        d2 the same with 1 publisher connection (pipelining: d1/d2 rates, PUBLISH per read)
#        d3 open loop REDIS_RATE msgs/s (10000) published by the backend: herald-load PUBLISHes
#           user_noti:<user> straight into Redis for herald; Nchan has no such entry point
#           (its Redis messages are its own msgpack format written by its Lua scripts), so
#           its d3 is its HTTP publisher at the same rate, through its Redis store
#        d4 herald only: open loop REDIS_RATE msgs/s over HTTP (like for like with Nchan's d3)
#   batch    e.  herald only: POST /publish/batch, BATCH (100) items a request, closed loop
#                on BATCH_CONNS (1) connection, N users connected
#        e1 every item to a user with no connection (the API path alone): accepted/s
#        e2 every item to a connected user: accepted/s and deliveries
#   memory   f.  idle memory: PSS growth (/proc/PID/smaps_rollup, summed over the server's
#                processes) per connection with IDLE_N (19000) idle connections held, as
#                benches/idle-memory.sh measures it
# Publishing is HTTP unless said otherwise: herald's POST /publish (API key), Nchan's
# POST /pub/<channel>, the ceiling's POST /pub/<anything>.
#
# Output: benches/results/<UTC timestamp>/<scenario>-<server>.json (herald-load reports),
# <scenario>-<server>.log (herald-load's progress and summary), redis-<scenario>-<server>.json
# (Redis command and read counts over the publishing phase), memory-<server>.json,
# meta.json (machine, load average, CPU taken by other processes), table.md (also printed).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
ROOT=$PWD

N=${N:-10000}
HOLD=${HOLD:-5s}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
BCAST_RATE_LOW=${BCAST_RATE_LOW:-10}
BCAST_INFLIGHT_MSGS=${BCAST_INFLIGHT_MSGS:-30}
BCAST_HIGH_FRACTION=${BCAST_HIGH_FRACTION:-0.9}
BCAST_RATE_HIGH=${BCAST_RATE_HIGH:-}
UNICAST_RATE=${UNICAST_RATE:-10000}
OPEN_PUBLISH_CONNS=${OPEN_PUBLISH_CONNS:-8}
UNICAST_PUBLISHERS=${UNICAST_PUBLISHERS:-4}
REDIS_RATE=${REDIS_RATE:-10000}
NCHAN_REDIS_MODE=${NCHAN_REDIS_MODE:-nostore}
BATCH=${BATCH:-100}
BATCH_CONNS=${BATCH_CONNS:-1}
IDLE_N=${IDLE_N:-19000}
PAYLOAD=${PAYLOAD:-128}
SERVER_THREADS=${SERVER_THREADS:-2}
GEN_THREADS=${GEN_THREADS:-1}
HERALD_PORT=${HERALD_PORT:-18081}
NCHAN_PORT=${NCHAN_PORT:-18082}
CEILING_PORT=${CEILING_PORT:-18083}
REDIS_PORT=${REDIS_PORT:-}
SERVERS=${SERVERS:-"herald nchan ceiling"}
SCENARIOS=${SCENARIOS:-"connect bcast unicast redis batch memory"}
PERF=${PERF:-$(command -v perf >/dev/null && echo 1 || echo 0)}
SECRET=compare-secret
API_KEY=compare-api-key

if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release --quiet -p herald -p herald-load
fi
HERALD=$ROOT/target/release/herald
LOAD=$ROOT/target/release/herald-load
NCHAN_MODULE=/usr/lib/nginx/modules/ngx_nchan_module.so
[[ -x $HERALD && -x $LOAD ]] || { echo "compare.sh: build herald and herald-load first" >&2; exit 2; }
command -v nginx >/dev/null && [[ -f $NCHAN_MODULE ]] || { echo "compare.sh: needs nginx and libnginx-mod-nchan" >&2; exit 2; }
command -v python3 >/dev/null || { echo "compare.sh: needs python3 for the table" >&2; exit 2; }
want() { [[ " $SCENARIOS " == *" $1 "* ]]; }
has_server() { [[ " $SERVERS " == *" $1 "* ]]; }
if want redis; then
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
        || { echo "compare.sh: the redis scenarios need redis-server and redis-cli" >&2; exit 2; }
fi

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$ROOT/benches/results/$STAMP}
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/herald-compare.XXXXXX)
chmod 755 "$TMP"   # nginx workers run as nobody

# ---- processes we start, killed on any exit -------------------------------------------
PIDS=()           # herald / ceiling / herald-load / redis pids
NGINX_MASTER=""
REDIS_PID=""
stop_nginx() {
    [[ -n $NGINX_MASTER ]] || return 0
    local workers
    workers=$(pgrep -P "$NGINX_MASTER" || true)
    stop_pid "$NGINX_MASTER"
    for w in $workers; do stop_pid "$w"; done
    NGINX_MASTER=""
}
cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    stop_nginx
    [[ -n $REDIS_PID ]] && stop_pid "$REDIS_PID"
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- Redis (d. scenarios) ---------------------------------------------------------------
# BROKER=redis while the d. scenarios run: start_herald and start_nchan then use Redis.
BROKER=embedded
start_redis() {
    REDIS_PORT=${REDIS_PORT:-$(free_port)}
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize no --logfile "$OUT/redis.log" &
    REDIS_PID=$!
    wait_port "$REDIS_PORT"
}
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }
# Redis's counters from `INFO all` as JSON: commands processed, reads, calls per command.
redis_counters() {
    rcli INFO all | python3 -c '
import json, sys
out = {"cmd": {}}
for line in sys.stdin:
    line = line.strip()
    if line.startswith("cmdstat_"):
        name, rest = line[8:].split(":", 1)
        fields = dict(kv.split("=") for kv in rest.split(","))
        out["cmd"][name] = int(fields["calls"])
    elif line.startswith(("total_commands_processed:", "total_reads_processed:", "total_writes_processed:")):
        k, v = line.split(":")
        out[k] = int(v)
print(json.dumps(out))'
}

# ---- servers ------------------------------------------------------------------------------
# start_<server> sets SERVER_PIDS (comma list for --server-pid)
start_herald() {
    local redis_env=()
    [[ $BROKER == redis ]] && redis_env=(HERALD_REDIS_URL="redis://127.0.0.1:$REDIS_PORT")
    env "${redis_env[@]}" HERALD_LISTEN=127.0.0.1:$HERALD_PORT HERALD_JWT_SECRET=$SECRET HERALD_API_KEY=$API_KEY \
        HERALD_THREADS=$SERVER_THREADS HERALD_MAX_CONNECTIONS=30000 HERALD_MAX_CONNECTIONS_PER_USER=0 \
        HERALD_LOG=warn "$HERALD" >>"$OUT/herald.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$HERALD_PORT"
    if [[ $BROKER == redis ]]; then
        # Ready once its Redis links are up (/ready answers 200).
        for _ in $(seq 100); do
            curl -fs "http://127.0.0.1:$HERALD_PORT/ready" >/dev/null 2>&1 && break
            sleep 0.05
        done
    fi
    SERVER_PIDS=$pid
    CUR_PID=$pid
}
start_ceiling() {
    "$LOAD" ceiling-server --listen "127.0.0.1:$CEILING_PORT" --threads "$SERVER_THREADS" >>"$OUT/ceiling.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$CEILING_PORT"
    SERVER_PIDS=$pid
    CUR_PID=$pid
}
start_nchan() {
    local prefix=$TMP/nchan upstream="" pass=""
    rm -rf "$prefix"; mkdir -p "$prefix"; chmod 755 "$prefix"
    if [[ $BROKER == redis ]]; then
        upstream="upstream nchan_redis { nchan_redis_server redis://127.0.0.1:$REDIS_PORT; nchan_redis_storage_mode $NCHAN_REDIS_MODE; }"
        [[ $NCHAN_REDIS_MODE == nostore ]] && upstream="$upstream nchan_redis_nostore_fastpublish on;"
        pass="nchan_redis_pass nchan_redis;"
    fi
    sed -e "s#@PREFIX@#$prefix#g" -e "s#@PORT@#$NCHAN_PORT#g" -e "s#@REDIS_UPSTREAM@#$upstream#" \
        -e "s#@REDIS_PASS@#$pass#g" "$ROOT/benches/nchan/nginx.conf" >"$prefix/nginx.conf"
    nginx -p "$prefix" -c "$prefix/nginx.conf" 2>>"$OUT/nchan.log"
    for _ in $(seq 100); do [[ -s $prefix/nginx.pid ]] && break; sleep 0.05; done
    NGINX_MASTER=$(cat "$prefix/nginx.pid")
    wait_port "$NCHAN_PORT"
    local workers
    for _ in $(seq 100); do
        workers=$(pgrep -d, -P "$NGINX_MASTER" || true)
        [[ $(tr ',' '\n' <<<"$workers" | grep -c .) -ge 2 ]] && break
        sleep 0.05
    done
    SERVER_PIDS=$NGINX_MASTER,$workers
}
stop_server() {
    case $1 in
        nchan) cat "$TMP/nchan/error.log" >>"$OUT/nchan.log" 2>/dev/null || true; stop_nginx ;;
        *) stop_pid "$CUR_PID" ;;
    esac
}

# Per-server client arguments: URL, publish endpoint, body. HERALD_PUBLISH=redis: herald's
# messages are PUBLISHed straight into Redis (user_noti:<user>) instead of POSTed.
HERALD_PUBLISH=http
client_args() {
    case $1 in
        herald)
            if [[ $HERALD_PUBLISH == redis ]]; then
                echo "--url ws://127.0.0.1:$HERALD_PORT/ws?token={token} --secret $SECRET --publish redis --redis 127.0.0.1:$REDIS_PORT"
            else
                echo "--url ws://127.0.0.1:$HERALD_PORT/ws?token={token} --secret $SECRET --publish http"
            fi ;;
        nchan) echo "--url ws://127.0.0.1:$NCHAN_PORT/sub/{user} --publish http --publish-url http://127.0.0.1:$NCHAN_PORT/pub/{user} --publish-body {payload}" ;;
        ceiling) echo "--url ws://127.0.0.1:$CEILING_PORT/sub/{user} --publish http --publish-url http://127.0.0.1:$CEILING_PORT/pub/{user} --publish-body {payload}" ;;
    esac
}

# Until herald-load printed "connected:" (publishing, the warmup, starts next), or exited.
wait_connected() {
    local log=$1 pid=$2
    while alive "$pid"; do
        grep -q '^herald-load: connected:' "$log" 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

# Hooks run() calls: ON_CONNECTED once the clients are connected, AFTER_RUN when
# herald-load is done (both with NAME SERVER GENERATOR_PID), before the server stops.
ON_CONNECTED=""
AFTER_RUN=""
redis_mark() { redis_counters >"$TMP/redis-before.json"; }
redis_delta() {   # NAME SERVER: Redis's counters over the publishing phase (warmup..drain)
    redis_counters >"$TMP/redis-after.json"
    python3 - "$TMP/redis-before.json" "$TMP/redis-after.json" "$OUT/redis-$1-$2.json" <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
d = {k: b.get(k, 0) - a.get(k, 0) for k in ("total_commands_processed", "total_reads_processed", "total_writes_processed")}
d["cmd"] = {k: v - a["cmd"].get(k, 0) for k, v in b["cmd"].items() if v - a["cmd"].get(k, 0) > 0}
# INFO and its own read are the two snapshots' doing, not the server's.
d["cmd"].pop("info", None)
d["total_commands_processed"] -= 1
d["total_reads_processed"] -= 1
reads = d["total_reads_processed"]
d["publish_per_read"] = round(d["cmd"].get("publish", 0) / reads, 2) if reads > 0 else None
d["commands_per_read"] = round(d["total_commands_processed"] / reads, 2) if reads > 0 else None
json.dump(d, open(sys.argv[3], "w"))
EOF
}
PERF_DATA=""
perf_profile() {   # NAME SERVER GEN: cpu-clock samples of the server over the measured window
    local secs
    secs=$(python3 -c "import sys; s=sys.argv[1]; print(float(s[:-2])/1000 if s.endswith('ms') else float(s.rstrip('s')))" "$WARMUP")
    sleep "$secs"
    PERF_DATA=$TMP/perf-$1.data
    perf record -e cpu-clock -g -p "$CUR_PID" -o "$PERF_DATA" -- sleep "${DURATION%s}" >/dev/null 2>>"$OUT/perf.log" || true
}

perf_run() {   # NAME WHAT FILE herald-load-args...: one more run of herald alone, profiled
    local name=$1 what=$2 file=$3 hook=$ON_CONNECTED
    shift 3
    ON_CONNECTED=perf_profile
    run "$name" herald "$@"
    ON_CONNECTED=$hook
    perf_text "$what" "$file"
}

perf_text() {   # WHAT FILE: PERF_DATA as text: flat symbols, by object, by thread, call graphs
    [[ -s $PERF_DATA ]] || return 0
    # head closes the pipe early: with pipefail, perf's SIGPIPE would end the script.
    {
        echo "# herald during $1: perf record -e cpu-clock -g -p <herald> -- sleep ${DURATION%s}"
        echo "# 1. top symbols, flat: perf report --stdio --no-children --sort dso,sym -g none --percent-limit 0.4"
        perf report -i "$PERF_DATA" --stdio --no-children --sort dso,sym -g none --percent-limit 0.4 2>/dev/null | grep -v '^$' | head -90
        echo "# 2. by object (kernel vs herald vs libc): perf report --stdio --no-children --sort dso -g none"
        perf report -i "$PERF_DATA" --stdio --no-children --sort dso -g none 2>/dev/null | grep -v '^$' | head -30
        echo "# 3. by thread: perf report --stdio --no-children --sort comm -g none"
        perf report -i "$PERF_DATA" --stdio --no-children --sort comm -g none 2>/dev/null | grep -v '^$' | head -20
        echo "# 4. call graphs: perf report --stdio --no-children | head -80"
        perf report -i "$PERF_DATA" --stdio --no-children 2>/dev/null | head -80
    } >"$2" || true
    PERF_DATA=""
}
cpu_stat() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8, $3}' /proc/stat; }   # total, nice
RUNLOG=$OUT/runs.log
run() {   # run NAME SERVER herald-load-args...
    local name=$1 server=$2; shift 2
    local file=$OUT/$name-$server.json log=$OUT/$name-$server.log
    if [[ $BROKER == redis ]]; then rcli FLUSHALL >/dev/null; rcli CONFIG RESETSTAT >/dev/null; fi
    "start_$server"
    local aux=()
    [[ $BROKER == redis ]] && aux=(--aux-pid "$REDIS_PID")
    local la0; la0=$(cut -d' ' -f1-3 /proc/loadavg)
    local c0; c0=$(cpu_stat)
    echo "== $name / $server ($BROKER): herald-load $*" | tee -a "$RUNLOG" >&2
    # shellcheck disable=SC2046
    HERALD_API_KEY=$API_KEY "$LOAD" "$@" $(client_args "$server") --server-pid "$SERVER_PIDS" "${aux[@]}" \
        --threads "$GEN_THREADS" --payload-bytes "$PAYLOAD" --json-out "$file" >/dev/null 2>"$log" &
    local gen=$!
    PIDS+=("$gen")
    if [[ -n $ON_CONNECTED ]] && wait_connected "$log" "$gen"; then "$ON_CONNECTED" "$name" "$server" "$gen"; fi
    wait "$gen" || echo "   herald-load failed (exit $?)" | tee -a "$RUNLOG" >&2
    [[ -n $AFTER_RUN ]] && "$AFTER_RUN" "$name" "$server" "$gen"
    grep -v '^herald-load: ' "$log" >>"$RUNLOG" || true
    local c1; c1=$(cpu_stat)
    local la1; la1=$(cut -d' ' -f1-3 /proc/loadavg)
    # Share of the machine's CPU time spent in niced processes (another helper's fuzzing).
    local nice_share
    nice_share=$(awk -v a="$c0" -v b="$c1" 'BEGIN{split(a,x," ");split(b,y," ");d=y[1]-x[1];printf "%.2f", (d > 0 ? (y[2]-x[2])/d : 0)}')
    echo "   loadavg $la0 -> $la1; niced CPU share $nice_share" | tee -a "$RUNLOG" >&2
    echo "{\"run\":\"$name-$server\",\"loadavg_before\":\"$la0\",\"loadavg_after\":\"$la1\",\"niced_cpu_share\":$nice_share}" >>"$OUT/load.jsonl"
    stop_server "$server"
    sleep 1
}

# Idle memory: PSS growth per connection of the server's processes with IDLE_N connections
# held (benches/idle-memory.sh's method: 100 connections first, so what every connection
# shares is allocated, then the baseline, then IDLE_N, sampled 4, 8 and 12 s after they
# are all up).
pss_kb() { local t=0 p; for p in ${1//,/ }; do t=$((t + $(awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup"))); done; echo "$t"; }
idle_memory() {   # SERVER
    local server=$1 log=$OUT/memory-$1.log
    "start_$server"
    echo "== memory / $server: herald-load connect -n $IDLE_N, PSS of $SERVER_PIDS" | tee -a "$RUNLOG" >&2
    # shellcheck disable=SC2046
    "$LOAD" connect -n 100 --user-prefix w --connect-rate 0 --hold 1s $(client_args "$server") --quiet >/dev/null 2>&1 || true
    sleep 1
    local p0 samples=() gen
    p0=$(pss_kb "$SERVER_PIDS")
    # shellcheck disable=SC2046
    "$LOAD" connect -n "$IDLE_N" --user-prefix u --connect-rate 0 --hold 16s $(client_args "$server") \
        --server-pid "$SERVER_PIDS" --json-out "$OUT/memory-$server-connect.json" >/dev/null 2>"$log" &
    gen=$!
    PIDS+=("$gen")
    if wait_connected "$log" "$gen"; then
        for _ in 1 2 3; do sleep 4; samples+=("$(pss_kb "$SERVER_PIDS")"); done
    fi
    wait "$gen" || echo "   herald-load failed (exit $?)" | tee -a "$RUNLOG" >&2
    grep -v '^herald-load: ' "$log" >>"$RUNLOG" || true
    python3 - "$OUT/memory-$server-connect.json" "$OUT/memory-$server.json" "$p0" "${samples[@]}" <<'EOF'
import json, sys
conn = json.load(open(sys.argv[1]))["connections"]
held = conn["established"] - conn["unexpected_closes"]
p0, samples = int(sys.argv[3]), [int(x) for x in sys.argv[4:]]
per = [round((s - p0) * 1024 / held) for s in samples] if held > 0 else []
json.dump({"held": held, "failed": conn["failed"], "pss_baseline_kb": p0, "pss_samples_kb": samples,
           "pss_per_conn_samples_bytes": per, "pss_per_conn_bytes": per[-1] if per else None},
          open(sys.argv[2], "w"))
print(f"   held {held}: PSS per connection {per} B", file=sys.stderr)
EOF
    stop_server "$server"
    sleep 1
}

common_win=(--duration "$DURATION" --warmup "$WARMUP" --drain 3s)

echo "compare.sh: results in $OUT" >&2
{
    echo "{\"started\":\"$STAMP\",\"host\":\"$(hostname)\",\"cpus\":$(nproc),"
    echo "\"kernel\":\"$(uname -r)\",\"nginx\":\"$(nginx -v 2>&1 | sed 's/.*\///')\","
    echo "\"redis\":\"$(redis-server --version 2>/dev/null | sed -n 's/.*v=\([^ ]*\).*/\1/p')\",\"nchan_redis_mode\":\"$NCHAN_REDIS_MODE\","
    echo "\"herald_commit\":\"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)\","
    echo "\"connections\":$N,\"duration\":\"$DURATION\",\"payload_bytes\":$PAYLOAD,\"server_threads\":$SERVER_THREADS,\"generator_threads\":$GEN_THREADS,"
    echo "\"unicast_rate\":$UNICAST_RATE,\"open_publish_conns\":$OPEN_PUBLISH_CONNS,\"unicast_publishers\":$UNICAST_PUBLISHERS,\"redis_rate\":$REDIS_RATE,"
    echo "\"batch\":$BATCH,\"batch_conns\":$BATCH_CONNS,\"idle_connections\":$IDLE_N,\"scenarios\":\"$SCENARIOS\","
    echo "\"loadavg_start\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
} >"$OUT/meta.json"

unicast_servers() { for s in $SERVERS; do [[ $s == ceiling ]] || echo "$s"; done; }

# a. connection storm
if want connect; then
    for s in $SERVERS; do
        run connect "$s" connect -n "$N" --users "$N" --user-prefix u --connect-rate 0 --hold "$HOLD"
    done
fi
# b. broadcast
if want bcast; then
    for s in $SERVERS; do
        run bcast-low "$s" broadcast -n "$N" --user room --rate "$BCAST_RATE_LOW" "${common_win[@]}"
    done
    for s in $SERVERS; do
        run bcast-max "$s" broadcast -n "$N" --user room --rate max --max-inflight $((BCAST_INFLIGHT_MSGS * N)) "${common_win[@]}"
    done
    if [[ -z $BCAST_RATE_HIGH ]]; then
        BCAST_RATE_HIGH=$(python3 - "$OUT" "$BCAST_HIGH_FRACTION" $SERVERS <<'EOF'
import json, sys, math
out, frac, servers = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
rates = []
for s in servers:
    try:
        rates.append(json.load(open(f"{out}/bcast-max-{s}.json"))["publish"]["rate_achieved"])
    except Exception:
        pass
print(max(1, math.floor(frac * min(rates))) if rates else 20)
EOF
)
    fi
    echo "compare.sh: high broadcast rate = $BCAST_RATE_HIGH msgs/s" | tee -a "$RUNLOG" >&2
    for s in $SERVERS; do
        run bcast-high "$s" broadcast -n "$N" --user room --rate "$BCAST_RATE_HIGH" "${common_win[@]}"
    done
fi
# c. unicast (the ceiling has no routing: herald and Nchan only)
if want unicast; then
    for s in $(unicast_servers); do
        run unicast "$s" unicast -n "$N" --user-prefix u --rate "$UNICAST_RATE" --publish-conns "$OPEN_PUBLISH_CONNS" "${common_win[@]}"
    done
    for s in $(unicast_servers); do
        run unicast-max "$s" unicast -n "$N" --user-prefix u --rate max --publish-conns "$UNICAST_PUBLISHERS" "${common_win[@]}"
    done
    if [[ $PERF == 1 ]] && has_server herald; then
        perf_run unicast-max-perf "c2 (unicast-max-perf-herald.json)" "$OUT/perf.txt" \
            unicast -n "$N" --user-prefix u --rate max --publish-conns "$UNICAST_PUBLISHERS" "${common_win[@]}"
    fi
fi
# d. Redis mode
if want redis; then
    start_redis
    BROKER=redis
    ON_CONNECTED=redis_mark
    AFTER_RUN=redis_delta
    for s in $(unicast_servers); do
        run redis-max "$s" unicast -n "$N" --user-prefix u --rate max --publish-conns "$UNICAST_PUBLISHERS" "${common_win[@]}"
    done
    if [[ $PERF == 1 ]] && has_server herald; then
        perf_run redis-max-perf "d1 (redis-max-perf-herald.json)" "$OUT/perf-redis.txt" \
            unicast -n "$N" --user-prefix u --rate max --publish-conns "$UNICAST_PUBLISHERS" "${common_win[@]}"
    fi
    for s in $(unicast_servers); do
        run redis-max1 "$s" unicast -n "$N" --user-prefix u --rate max --publish-conns 1 "${common_win[@]}"
    done
    for s in $(unicast_servers); do
        if [[ $s == herald ]]; then
            HERALD_PUBLISH=redis
            run redis-pub "$s" unicast -n "$N" --user-prefix u --rate "$REDIS_RATE" "${common_win[@]}"
            HERALD_PUBLISH=http
        else
            run redis-pub "$s" unicast -n "$N" --user-prefix u --rate "$REDIS_RATE" --publish-conns "$OPEN_PUBLISH_CONNS" "${common_win[@]}"
        fi
    done
    if has_server herald; then
        run redis-http herald unicast -n "$N" --user-prefix u --rate "$REDIS_RATE" --publish-conns "$OPEN_PUBLISH_CONNS" "${common_win[@]}"
    fi
    ON_CONNECTED=""
    AFTER_RUN=""
    BROKER=embedded
    stop_pid "$REDIS_PID"
    REDIS_PID=""
fi
# e. POST /publish/batch (herald only)
if want batch && has_server herald; then
    run batch-absent herald unicast -n "$N" --user-prefix u --absent-users "$N" --batch "$BATCH" \
        --publish-conns "$BATCH_CONNS" --rate max "${common_win[@]}"
    run batch-connected herald unicast -n "$N" --user-prefix u --batch "$BATCH" \
        --publish-conns "$BATCH_CONNS" --rate max "${common_win[@]}"
fi
# f. idle memory
if want memory; then
    for s in $(unicast_servers); do idle_memory "$s"; done
fi
sed -i "s/}\$/,\"loadavg_end\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"bcast_rate_high\":\"${BCAST_RATE_HIGH:-}\"}/" "$OUT/meta.json"

python3 "$ROOT/benches/table.py" "$OUT" | tee "$OUT/table.md"
echo "compare.sh: JSON in $OUT" >&2
