#!/usr/bin/env bash
# Memory per idle connection: herald's PSS growth (from /proc/PID/smaps_rollup) while
# herald-load holds N authenticated WebSocket connections of N distinct users.
#
#   benches/idle-memory.sh            # N=19000 (one process holds at most ~19.9k sockets here)
#   N=10000 benches/idle-memory.sh
#
# Builds the release binaries unless SKIP_BUILD=1. Prints one line per sample (4 samples,
# 4 s apart, while held) and the PSS and RSS growth per connection.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-19000}
PORT=${PORT:-18181}
if [ "${SKIP_BUILD:-0}" != 1 ]; then cargo build --release -q -p herald -p herald-load; fi
HERALD=./target/release/herald
LOAD=./target/release/herald-load
HERALD_JWT_SECRET=s HERALD_LISTEN=127.0.0.1:$PORT HERALD_THREADS=2 HERALD_MAX_CONNECTIONS=$((N + 1000)) \
  HERALD_MAX_CONNECTIONS_PER_USER=0 HERALD_LOG=warn "$HERALD" >/dev/null 2>&1 &
HP=$!
trap 'kill $HP 2>/dev/null || true; kill ${LP:-} 2>/dev/null || true' EXIT
sleep 1
pss() { awk '/^Pss:/{print $2}' "/proc/$HP/smaps_rollup"; }
rss() { awk '/^VmRSS:/{print $2}' "/proc/$HP/status"; }
url="ws://127.0.0.1:$PORT/ws?token={token}"
# A few connections first, so what every connection shares (buffers, tables) is allocated.
"$LOAD" connect -n 100 --connect-rate 0 --hold 1s --secret s --url "$url" >/dev/null 2>&1
sleep 1
P0=$(pss); R0=$(rss)
"$LOAD" connect -n "$N" --connect-rate 0 --hold 20s --secret s --url "$url" >/dev/null 2>&1 &
LP=$!
for t in 4 8 12 16; do
  sleep 4
  held=$(curl -s "http://127.0.0.1:$PORT/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["websocket"]["active_connections"])')
  P=$(pss); R=$(rss)
  python3 -c "print('t=%2ds held=%d  PSS %d B/conn  RSS %d B/conn' % ($t, $held, ($P-$P0)*1024/max($held,1), ($R-$R0)*1024/max($held,1)))"
done
wait $LP
