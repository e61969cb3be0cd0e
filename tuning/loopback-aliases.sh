#!/usr/bin/env bash
# Load tests past ~28k connections per source address need more source addresses. On Linux
# all of 127.0.0.0/8 already routes to loopback, so this only checks it; on hosts where it
# does not, it adds the aliases. Usage: tuning/loopback-aliases.sh [COUNT]
set -euo pipefail
count=${1:-20}
for i in $(seq 1 "$count"); do
  addr=127.0.0.$i
  if ! ip route get "$addr" 2>/dev/null | grep -q ' dev lo'; then
    ip addr add "$addr/8" dev lo
  fi
done
echo "127.0.0.1-127.0.0.$count route to loopback: herald-load --source-ips 127.0.0.1-127.0.0.$count"
