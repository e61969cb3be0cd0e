#!/usr/bin/env bash
# herald vs nginx+Nchan vs the ceiling, same generator, same machine, same run.
#
#   benches/compare.sh                 # builds release binaries, ~6 minutes
#   N=10000 DURATION=10s UNICAST_RATE=5000 SKIP_BUILD=1 benches/compare.sh
#
# Scenarios (each server is started fresh for each scenario and killed after it):
#   a. connect:   N connections at max rate, held HOLD     -> connects/s, RSS/conn, CPU/conn
#   b. broadcast: N connections of one user/channel         -> deliveries/s, CPU/delivery, latency
#        b1 fixed BCAST_RATE_LOW msgs/s (default 10)
#        b2 closed loop (--rate max, BCAST_INFLIGHT_MSGS messages in flight): throughput
#        b3 fixed rate = BCAST_HIGH_FRACTION (0.9) x the lowest b2 rate of the three servers
#           ("the highest rate all three sustain"), unless BCAST_RATE_HIGH is given
#   c. unicast:   N users, one connection each, HTTP publish (herald and Nchan only)
#        c1 fixed UNICAST_RATE msgs/s; c2 closed loop (--rate max)
# Publishing is HTTP for all three: herald's POST /publish (embedded broker, API key),
# Nchan's POST /pub/<channel>, the ceiling's POST /pub/<anything>.
#
# Output: benches/results/<UTC timestamp>/<scenario>-<server>.json (herald-load reports),
# meta.json (machine, load average, CPU taken by other processes), table.md (also printed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

N=${N:-10000}
HOLD=${HOLD:-5s}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
BCAST_RATE_LOW=${BCAST_RATE_LOW:-10}
BCAST_INFLIGHT_MSGS=${BCAST_INFLIGHT_MSGS:-30}
BCAST_HIGH_FRACTION=${BCAST_HIGH_FRACTION:-0.9}
BCAST_RATE_HIGH=${BCAST_RATE_HIGH:-}
UNICAST_RATE=${UNICAST_RATE:-5000}
PAYLOAD=${PAYLOAD:-128}
SERVER_THREADS=${SERVER_THREADS:-2}
GEN_THREADS=${GEN_THREADS:-1}
HERALD_PORT=${HERALD_PORT:-18081}
NCHAN_PORT=${NCHAN_PORT:-18082}
CEILING_PORT=${CEILING_PORT:-18083}
SERVERS=${SERVERS:-"herald nchan ceiling"}
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

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$ROOT/benches/results/$STAMP}
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/herald-compare.XXXXXX)
chmod 755 "$TMP"   # nginx workers run as nobody

# ---- processes we start, killed on any exit -------------------------------------------
PIDS=()           # herald / ceiling pids
NGINX_MASTER=""
alive() { [[ -r /proc/$1/stat ]] && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }
stop_pid() {
    local pid=$1 i
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do alive "$pid" || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}
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
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {
    local port=$1 i
    for i in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "compare.sh: nothing listens on port $port" >&2
    return 1
}

# start_<server> sets SERVER_PIDS (comma list for --server-pid)
start_herald() {
    HERALD_LISTEN=127.0.0.1:$HERALD_PORT HERALD_JWT_SECRET=$SECRET HERALD_API_KEY=$API_KEY \
        HERALD_THREADS=$SERVER_THREADS HERALD_MAX_CONNECTIONS=30000 HERALD_MAX_CONNECTIONS_PER_USER=0 \
        HERALD_LOG=warn "$HERALD" >>"$OUT/herald.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$HERALD_PORT"
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
    local prefix=$TMP/nchan
    rm -rf "$prefix"; mkdir -p "$prefix"; chmod 755 "$prefix"
    sed -e "s#@PREFIX@#$prefix#g" -e "s#@PORT@#$NCHAN_PORT#g" "$ROOT/benches/nchan/nginx.conf" >"$prefix/nginx.conf"
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

# Per-server client arguments: URL, publish endpoint, body.
client_args() {
    case $1 in
        herald) echo "--url ws://127.0.0.1:$HERALD_PORT/ws?token={token} --secret $SECRET --publish http" ;;
        nchan) echo "--url ws://127.0.0.1:$NCHAN_PORT/sub/{user} --publish http --publish-url http://127.0.0.1:$NCHAN_PORT/pub/{user} --publish-body {payload}" ;;
        ceiling) echo "--url ws://127.0.0.1:$CEILING_PORT/sub/{user} --publish http --publish-url http://127.0.0.1:$CEILING_PORT/pub/{user} --publish-body {payload}" ;;
    esac
}

cpu_stat() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8, $3}' /proc/stat; }   # total, nice
RUNLOG=$OUT/runs.log
run() {   # run NAME SERVER herald-load-args...
    local name=$1 server=$2; shift 2
    local file=$OUT/$name-$server.json
    "start_$server"
    local la0; la0=$(cut -d' ' -f1-3 /proc/loadavg)
    local c0; c0=$(cpu_stat)
    echo "== $name / $server: herald-load $*" | tee -a "$RUNLOG" >&2
    # shellcheck disable=SC2046
    HERALD_API_KEY=$API_KEY "$LOAD" "$@" $(client_args "$server") --server-pid "$SERVER_PIDS" \
        --threads "$GEN_THREADS" --payload-bytes "$PAYLOAD" --quiet --json-out "$file" >/dev/null 2>>"$RUNLOG" \
        || echo "   herald-load failed (exit $?)" | tee -a "$RUNLOG" >&2
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

common_win=(--duration "$DURATION" --warmup "$WARMUP" --drain 3s)

echo "compare.sh: results in $OUT" >&2
{
    echo "{\"started\":\"$STAMP\",\"host\":\"$(hostname)\",\"cpus\":$(nproc),"
    echo "\"kernel\":\"$(uname -r)\",\"nginx\":\"$(nginx -v 2>&1 | sed 's/.*\///')\","
    echo "\"herald_commit\":\"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)\","
    echo "\"connections\":$N,\"duration\":\"$DURATION\",\"payload_bytes\":$PAYLOAD,\"server_threads\":$SERVER_THREADS,\"generator_threads\":$GEN_THREADS,"
    echo "\"loadavg_start\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
} >"$OUT/meta.json"

# a. connection storm
for s in $SERVERS; do
    run connect "$s" connect -n "$N" --users "$N" --user-prefix u --connect-rate 0 --hold "$HOLD"
done
# b. broadcast
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
# c. unicast (the ceiling has no routing: herald and Nchan only)
for s in $SERVERS; do
    [[ $s == ceiling ]] && continue
    run unicast "$s" unicast -n "$N" --user-prefix u --rate "$UNICAST_RATE" "${common_win[@]}"
done
for s in $SERVERS; do
    [[ $s == ceiling ]] && continue
    run unicast-max "$s" unicast -n "$N" --user-prefix u --rate max --publish-conns 8 "${common_win[@]}"
done
sed -i "s/}\$/,\"loadavg_end\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"bcast_rate_high\":$BCAST_RATE_HIGH}/" "$OUT/meta.json"

python3 "$ROOT/benches/table.py" "$OUT" | tee "$OUT/table.md"
echo "compare.sh: JSON in $OUT" >&2
