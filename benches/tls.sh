#!/usr/bin/env bash
# herald with TLS (wss://, https://) vs without (ws://, http://): same binary, same generator,
# same machine, same run, each scenario on a fresh herald.
#
#   benches/tls.sh                       # builds release binaries; about 8 minutes
#   SKIP_BUILD=1 REPEAT=1 N=10000 benches/tls.sh
#
# Scenarios, each REPEAT times, plain and TLS alternating (the table shows the median and,
# for CPU and memory, the range over the runs):
#   connect:   N connections at max rate (--connect-rate 0), held HOLD
#              -> handshakes/s (connect phase), server and generator CPU per connection,
#                 herald's PSS growth per held connection (/proc/PID/smaps_rollup, after a
#                 100-connection warmup so what all connections share is counted out)
#   broadcast: N connections of one user, BCAST_RATE msgs/s       -> server CPU per delivery
#   unicast:   N users, one connection each, UNICAST_RATE msgs/s   -> server CPU per delivery
# Publishing is HTTP to herald's embedded broker: POST /publish over https:// to the TLS
# herald (its one port speaks only TLS), over http:// to the plain one. So unicast's TLS cost
# includes one HTTPS request per delivery; broadcast's spreads it over N deliveries.
#
# The certificate is a throwaway self-signed ECDSA P-256 one for localhost, made in a
# temporary directory for this run (openssl CLI, or herald-load's gen_cert example) and
# deleted with it. herald-load trusts it with --ca.
#
# Output: benches/results/tls-<UTC stamp>/<scenario>-<plain|tls>-<i>.json (herald-load
# reports), memory-<plain|tls>-<i>.json (PSS samples), meta.json, runs.log, table.md (printed).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
ROOT=$PWD

N=${N:-10000}
REPEAT=${REPEAT:-3}
HOLD=${HOLD:-12s}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
BCAST_RATE=${BCAST_RATE:-5}
UNICAST_RATE=${UNICAST_RATE:-2000}
PAYLOAD=${PAYLOAD:-128}
SERVER_THREADS=${SERVER_THREADS:-2}
GEN_THREADS=${GEN_THREADS:-1}
SECRET=tls-bench-secret-0123456789abcdef0123
API_KEY=tls-bench-api-key

if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release --quiet -p herald -p herald-load
fi
HERALD=$ROOT/target/release/herald
LOAD=$ROOT/target/release/herald-load
[[ -x $HERALD && -x $LOAD ]] || { echo "tls.sh: build herald and herald-load first" >&2; exit 2; }
for tool in python3 curl; do
    command -v $tool >/dev/null || { echo "tls.sh: needs $tool" >&2; exit 2; }
done

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$ROOT/benches/results/tls-$STAMP}
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/herald-tls-bench.XXXXXX)

# ---- processes we start, stopped on any exit -------------------------------------------
PIDS=()
cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- the throwaway certificate ----------------------------------------------------------
if command -v openssl >/dev/null; then
    cat >"$TMP/req.cnf" <<'EOF'
[req]
distinguished_name = dn
x509_extensions = leaf
prompt = no
[dn]
CN = localhost
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
EOF
    (umask 077; openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -config "$TMP/req.cnf" -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null)
    CERT_TOOL=openssl
else
    cargo run --release --quiet -p herald-load --example gen_cert -- "$TMP"
    CERT_TOOL=gen_cert
fi
CA=$TMP/cert.pem

PLAIN_PORT=${PLAIN_PORT:-$(free_port)}
TLS_PORT=${TLS_PORT:-$(free_port)}
while [[ $TLS_PORT == "$PLAIN_PORT" ]]; do TLS_PORT=$(free_port); done

port_of() { if [[ $1 == tls ]]; then echo "$TLS_PORT"; else echo "$PLAIN_PORT"; fi; }
# herald-load's URL and trust arguments for a kind.
client_args() {
    local port; port=$(port_of "$1")
    if [[ $1 == tls ]]; then
        echo "--url wss://localhost:$port/ws?token={token} --ca $CA --secret $SECRET"
    else
        echo "--url ws://127.0.0.1:$port/ws?token={token} --secret $SECRET"
    fi
}
health() {   # health KIND -> active WebSocket connections, or nothing
    local port; port=$(port_of "$1")
    if [[ $1 == tls ]]; then
        curl -s --max-time 2 --cacert "$CA" --resolve "localhost:$port:127.0.0.1" "https://localhost:$port/health"
    else
        curl -s --max-time 2 "http://127.0.0.1:$port/health"
    fi | python3 -c 'import json,sys; print(json.load(sys.stdin)["websocket"]["active_connections"])' 2>/dev/null || true
}

HP=""
start_herald() {   # start_herald KIND
    local kind=$1 port i
    port=$(port_of "$kind")
    local tls_env=()
    [[ $kind == tls ]] && tls_env=(HERALD_TLS_CERT="$CA" HERALD_TLS_KEY="$TMP/key.pem")
    env "${tls_env[@]}" HERALD_LISTEN=127.0.0.1:$port HERALD_JWT_SECRET=$SECRET HERALD_API_KEY=$API_KEY \
        HERALD_THREADS=$SERVER_THREADS HERALD_MAX_CONNECTIONS=$((N + 1000)) HERALD_MAX_CONNECTIONS_PER_USER=0 \
        HERALD_LOG=warn "$HERALD" >>"$OUT/herald-$kind.log" 2>&1 &
    HP=$!
    PIDS+=("$HP")
    for i in $(seq 100); do
        [[ -n $(health "$kind") ]] && return 0
        alive "$HP" || break
        sleep 0.1
    done
    echo "tls.sh: herald ($kind) did not come up; see $OUT/herald-$kind.log" >&2
    exit 1
}

pss() { awk '/^Pss:/{print $2}' "/proc/$HP/smaps_rollup"; }
cpu_stat() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8, $3}' /proc/stat; }   # total, nice

RUNLOG=$OUT/runs.log
load() {   # load NAME KIND herald-load-args...: runs herald-load against the current herald
    local name=$1 kind=$2; shift 2
    echo "== $name: herald-load $*" | tee -a "$RUNLOG" >&2
    # shellcheck disable=SC2046
    HERALD_API_KEY=$API_KEY "$LOAD" "$@" $(client_args "$kind") --server-pid "$HP" --threads "$GEN_THREADS" \
        --payload-bytes "$PAYLOAD" --quiet --json-out "$OUT/$name.json" >/dev/null 2>>"$RUNLOG" \
        || echo "   herald-load failed (exit $?)" | tee -a "$RUNLOG" >&2
}

# connect: handshakes/s, CPU per connection, then PSS per held connection.
run_connect() {   # run_connect KIND I
    local kind=$1 i=$2 name=connect-$1-$2
    start_herald "$kind"
    # What every connection shares (buffers, tables, the TLS configuration) comes first.
    # shellcheck disable=SC2046
    "$LOAD" connect -n 100 --connect-rate 0 --hold 1s --quiet $(client_args "$kind") >/dev/null 2>>"$RUNLOG"
    sleep 1
    local p0 la0 c0; p0=$(pss); la0=$(cut -d' ' -f1-3 /proc/loadavg); c0=$(cpu_stat)
    load "$name" "$kind" connect -n "$N" --users "$N" --user-prefix u --connect-rate 0 --hold "$HOLD" &
    local lp=$! held=0 t
    for t in $(seq 600); do
        held=$(health "$kind"); held=${held:-0}
        [[ $held -ge $N ]] && break
        alive "$lp" || break
        sleep 0.1
    done
    sleep 2   # let the loops settle: every handshake's transient memory is back with malloc
    local samples=() s p
    for s in 1 2 3; do
        p=$(pss); held=$(health "$kind")
        samples+=("$p:${held:-0}")
        sleep 1
    done
    wait "$lp" || true
    local c1; c1=$(cpu_stat)
    local nice_share
    nice_share=$(awk -v a="$c0" -v b="$c1" 'BEGIN{split(a,x," ");split(b,y," ");d=y[1]-x[1];printf "%.2f", (d > 0 ? (y[2]-x[2])/d : 0)}')
    python3 - "$OUT/memory-$kind-$i.json" "$p0" "$la0" "$nice_share" "${samples[@]}" <<'EOF'
import json, statistics, sys
path, p0, la0, nice = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
samples = [tuple(int(v) for v in x.split(":")) for x in sys.argv[5:]]
per_conn = [(pss - p0) * 1024 / held for pss, held in samples if held > 0]
json.dump({"pss_before_kb": p0, "pss_held_kb": [s[0] for s in samples], "held": [s[1] for s in samples],
           "pss_per_conn_bytes": round(statistics.median(per_conn)) if per_conn else None,
           "loadavg_before": la0, "niced_cpu_share": nice}, open(path, "w"), indent=1)
EOF
    echo "   PSS $p0 -> ${samples[*]} (kB:held); loadavg $la0; niced CPU share $nice_share" | tee -a "$RUNLOG" >&2
    stop_pid "$HP"
    sleep 1
}

run_delivery() {   # run_delivery SCENARIO KIND I
    local scenario=$1 kind=$2 i=$3
    start_herald "$kind"
    local win=(--duration "$DURATION" --warmup "$WARMUP" --drain 3s --publish http)
    case $scenario in
        # One publish connection: at a few messages per second, more would sit idle past
        # herald's HERALD_HANDSHAKE_TIMEOUT and be closed with a 408 (a request racing that
        # close is lost, and would show up as lost deliveries that have nothing to do with TLS).
        broadcast) load "broadcast-$kind-$i" "$kind" broadcast -n "$N" --user room --rate "$BCAST_RATE" --publish-conns 1 "${win[@]}" ;;
        unicast) load "unicast-$kind-$i" "$kind" unicast -n "$N" --user-prefix u --rate "$UNICAST_RATE" "${win[@]}" ;;
    esac
    stop_pid "$HP"
    sleep 1
}

echo "tls.sh: results in $OUT (plain port $PLAIN_PORT, TLS port $TLS_PORT)" >&2
{
    echo "{\"started\":\"$STAMP\",\"host\":\"$(hostname)\",\"cpus\":$(nproc),\"kernel\":\"$(uname -r)\","
    echo "\"herald_commit\":\"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)\","
    echo "\"certificate\":\"self-signed ECDSA P-256 ($CERT_TOOL)\",\"connections\":$N,\"repeat\":$REPEAT,\"hold\":\"$HOLD\","
    echo "\"duration\":\"$DURATION\",\"broadcast_rate\":$BCAST_RATE,\"unicast_rate\":$UNICAST_RATE,\"payload_bytes\":$PAYLOAD,"
    echo "\"server_threads\":$SERVER_THREADS,\"generator_threads\":$GEN_THREADS,\"loadavg_start\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
} >"$OUT/meta.json"

for i in $(seq "$REPEAT"); do
    for kind in plain tls; do run_connect "$kind" "$i"; done
done
for scenario in broadcast unicast; do
    for i in $(seq "$REPEAT"); do
        for kind in plain tls; do run_delivery "$scenario" "$kind" "$i"; done
    done
done
sed -i "s/}\$/,\"loadavg_end\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}/" "$OUT/meta.json"

python3 - "$OUT" <<'EOF' | tee "$OUT/table.md"
import glob, json, os, statistics, sys
out = sys.argv[1]
meta = json.load(open(os.path.join(out, "meta.json")))

def runs(prefix, kind):
    docs = []
    for path in sorted(glob.glob(os.path.join(out, f"{prefix}-{kind}-*.json"))):
        try:
            docs.append(json.load(open(path)))
        except ValueError:
            pass
    return docs

def get(doc, path):
    for key in path.split("."):
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc

def values(prefix, kind, path):
    return [v for v in (get(d, path) for d in runs(prefix, kind)) if isinstance(v, (int, float))]

def median(prefix, kind, path):
    vals = values(prefix, kind, path)
    return statistics.median(vals) if vals else None

def fmt(v, unit=""):
    if v is None:
        return "–"
    text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"
    return text + unit

def ratio(a, b):
    return f"{b / a:.2f}" if a and b is not None else "–"

rows = []
def row(label, prefix, path, unit="", spread=False):
    def cell(kind):
        text = fmt(median(prefix, kind, path), unit)
        vals = values(prefix, kind, path)
        if spread and len(vals) > 1:
            text += f" ({fmt(min(vals))}–{fmt(max(vals))})"
        return text
    a, b = median(prefix, "plain", path), median(prefix, "tls", path)
    rows.append(f"| {label} | {cell('plain')} | {cell('tls')} | {ratio(a, b)} |")

def pair(label, prefix, p1, p2, unit=""):
    cell = lambda k: f"{fmt(median(prefix, k, p1))} / {fmt(median(prefix, k, p2))}{unit}"
    rows.append(f"| {label} | {cell('plain')} | {cell('tls')} | |")

n, r = meta["connections"], meta["repeat"]
row(f"herald memory per idle connection (PSS growth ÷ {n:,} held)", "memory", "pss_per_conn_bytes", " B", True)
row("— RSS growth per connection (herald-load's figure)", "connect", "server.rss_per_conn_bytes", " B", True)
row("connects/s (TCP + TLS handshake + upgrade + JWT)", "connect", "connections.connect_rate_achieved", "", True)
row("— server CPU per connection", "connect", "server.cpu_us_per_conn", " µs", True)
row("— generator CPU per connection", "connect", "generator.cpu_us_per_conn", " µs", True)
row("— connect latency p50", "connect", "connections.connect_latency_us.p50", " µs")
b, u = meta["broadcast_rate"], meta["unicast_rate"]
row(f"broadcast {b} msg/s to {n:,}: server CPU per delivery", "broadcast", "server.cpu_us_per_delivery", " µs", True)
row("— deliveries/s", "broadcast", "deliveries_per_sec")
row("— generator CPU per delivery", "broadcast", "generator.cpu_us_per_delivery", " µs", True)
pair("— latency p50 / p99", "broadcast", "latency_us.p50", "latency_us.p99", " µs")
row(f"unicast {u:,} msg/s, HTTP(S) publish: server CPU per delivery", "unicast", "server.cpu_us_per_delivery", " µs", True)
row("— deliveries/s", "unicast", "deliveries_per_sec")
row("— generator CPU per delivery", "unicast", "generator.cpu_us_per_delivery", " µs", True)
pair("— latency p50 / p99", "unicast", "latency_us.p50", "latency_us.p99", " µs")
lost = sum((get(d, "deliveries.lost") or 0) for k in ("plain", "tls") for s in ("broadcast", "unicast") for d in runs(s, k))
failed = sum((get(d, "connections.failed") or 0) for k in ("plain", "tls") for s in ("connect", "broadcast", "unicast") for d in runs(s, k))
suite = next((get(d, "connections.tls") for d in runs("connect", "tls") if get(d, "connections.tls")), "?")

print(f"herald {meta['herald_commit']}, {meta['server_threads']} threads; {n:,} connections; median (min–max) of {r} runs each; "
      f"{meta['certificate']}, negotiated {suite}; {meta['cpus']} CPUs shared with the generator; "
      f"lost deliveries {lost}, failed connections {failed}\n")
print("| | ws:// (plain) | wss:// (TLS) | TLS/plain |")
print("|---|---:|---:|---:|")
print("\n".join(rows))
EOF
echo "tls.sh: JSON in $OUT" >&2
