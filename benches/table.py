#!/usr/bin/env python3
"""Markdown tables of one compare.sh run: herald vs Nchan vs the ceiling.

    python3 benches/table.py benches/results/<timestamp>

Reads the herald-load reports <scenario>-<server>.json of that directory (and
redis-<scenario>-<server>.json, memory-<server>.json). The first table is issue #9's
"Done when" list, each line with its target and ok / MISS; the second has every scenario's
figures, with the ratios herald/Nchan, herald/ceiling and ceiling/Nchan of the same run
(ceiling/Nchan shows how far below Nchan the floor itself is).
"""
import json
import os
import sys

out = sys.argv[1]
SERVERS = ["herald", "nchan", "ceiling"]


def read(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load(scenario, server):
    return read(f"{scenario}-{server}.json")


def get(doc, path):
    for key in path.split("."):
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def fmt(v, digits=None):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if digits is None:
        digits = 0 if abs(v) >= 100 else (1 if abs(v) >= 10 else 2)
    return f"{v:,.{digits}f}"


def ratio(a, b):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b == 0:
        return None
    return a / b


meta = read("meta.json") or {}


def value(scen, server, path, scale=1):
    doc = load(scen, server)
    if path.startswith("redis:"):
        doc = read(f"redis-{scen}-{server}.json")
        path = path[6:]
    if path.startswith("memory:"):
        doc = read(f"memory-{server}.json")
        path = path[7:]
    if doc is None:
        return None
    if path == "@conns":
        return f"{get(doc, 'connections.established')} / {get(doc, 'connections.failed')}"
    if path == "@loss":
        lost, dup, closes = (get(doc, 'deliveries.lost'), get(doc, 'deliveries.duplicates'),
                             get(doc, 'connections.unexpected_closes'))
        errors = get(doc, "publish.errors")
        s = f"{lost} / {dup} / {closes}"
        return s + (f" ({errors} publish errors)" if errors else "")
    v = get(doc, path)
    return None if v is None else v * scale


# ---- issue #9's "Done when" list -------------------------------------------------------
checks = []  # (item, figure, herald, nchan, ceiling, target text, ok or None)


def check(item, figure, h, n, c, target, ok):
    checks.append((item, figure, h, n, c, target, ok))


def le(a, b):
    return None if a is None or b is None else a <= b


def ge(a, b):
    return None if a is None or b is None else a >= b


pubs = meta.get("unicast_publishers", "?")
H = lambda s, p, k=1: value(s, "herald", p, k)  # noqa: E731
NC = lambda s, p, k=1: value(s, "nchan", p, k)  # noqa: E731
C = lambda s, p, k=1: value(s, "ceiling", p, k)  # noqa: E731

item = f"1. embedded unicast, HTTP, {pubs} closed-loop publishers (c2)"
check(item, "messages published (delivered) in the window", H("unicast-max", "publish.sent_in_window"),
      NC("unicast-max", "publish.sent_in_window"), None, "", None)
h, n = H("unicast-max", "deliveries_per_sec"), NC("unicast-max", "deliveries_per_sec")
check(item, "deliveries/s", h, n, None, "herald ≥ Nchan", ge(h, n))
h, n = H("unicast-max", "server.cpu_us_per_delivery"), NC("unicast-max", "server.cpu_us_per_delivery")
check(item, "server CPU per delivery (µs)", h, n, None, "herald ≤ Nchan", le(h, n))

item = f"2. Redis mode, HTTP publish, {pubs} closed-loop publishers (d1)"
h, n = H("redis-max", "server.cpu_us_per_delivery"), NC("redis-max", "server.cpu_us_per_delivery")
check(item, "server CPU per delivery (µs)", h, n, None, "herald ≤ 40 µs", le(h, 40))
check(item, "redis-server CPU per delivery (µs)", H("redis-max", "aux.cpu_us_per_delivery"),
      NC("redis-max", "aux.cpu_us_per_delivery"), None, "", None)
check(item, "deliveries/s", H("redis-max", "deliveries_per_sec"), NC("redis-max", "deliveries_per_sec"), None, "", None)
check(item, "deliveries/s with 1 publisher (d2)", H("redis-max1", "deliveries_per_sec"),
      NC("redis-max1", "deliveries_per_sec"), None, "", None)
h = ratio(H("redis-max", "deliveries_per_sec"), H("redis-max1", "deliveries_per_sec"))
n = ratio(NC("redis-max", "deliveries_per_sec"), NC("redis-max1", "deliveries_per_sec"))
check(item, f"rate with {pubs} publishers ÷ rate with 1", h, n, None, "", None)
h1, h4 = H("redis-max1", "redis:publish_per_read"), H("redis-max", "redis:publish_per_read")
check(item, "PUBLISH commands per Redis read, 1 publisher (d2)", h1, None, None, "", None)
check(item, f"PUBLISH commands per Redis read, {pubs} publishers (d1)", h4, None, None,
      "> 1.05 (several PUBLISHes a write)", None if h4 is None else h4 > 1.05)
check(item, "Redis commands per read (d1)", H("redis-max", "redis:commands_per_read"),
      NC("redis-max", "redis:commands_per_read"), None, "", None)

rate = meta.get("redis_rate", "?")
# Nchan has no backend entry point like herald's PUBLISH user_noti:<user> (its Redis messages
# are its own format written by its Lua scripts), so its d3 run is HTTP through its Redis
# store: not like for like. The target compares with Nchan's memory-store open loop at the
# same rate (c1) instead; Nchan's d3 figures are shown beside it.
item = f"3. Redis mode, backend PUBLISH, open loop {rate}/s (d3); Nchan: its memory store, HTTP, same rate (c1)"
h, n = H("redis-pub", "latency_us.p50", 0.001), NC("unicast", "latency_us.p50", 0.001)
check(item, "latency p50 (ms)", h, n, None, "herald ≤ Nchan", le(h, n))
h = H("redis-pub", "latency_us.p99", 0.001)
check(item, "latency p99 (ms)", h, NC("unicast", "latency_us.p99", 0.001), None, "herald ≤ 1 ms", le(h, 1.0))
check(item, "Nchan through its Redis store (HTTP publish, d3): p50 / p99 (ms)", None,
      None if NC("redis-pub", "latency_us.p50") is None else
      f"{fmt(NC('redis-pub', 'latency_us.p50', 0.001))} / {fmt(NC('redis-pub', 'latency_us.p99', 0.001))}",
      None, "", None)
check(item, "server CPU per delivery (µs)", H("redis-pub", "server.cpu_us_per_delivery"),
      NC("redis-pub", "server.cpu_us_per_delivery"), None, "", None)
check(item, "herald, HTTP publish at the same rate (d4): p50 / p99 (ms)",
      None if H("redis-http", "latency_us.p50") is None else
      f"{fmt(H('redis-http', 'latency_us.p50', 0.001))} / {fmt(H('redis-http', 'latency_us.p99', 0.001))}",
      None, None, "", None)

rate = meta.get("unicast_rate", "?")
item = f"4. embedded unicast, HTTP, open loop {rate}/s (c1)"
h, n = H("unicast", "latency_us.p50", 0.001), NC("unicast", "latency_us.p50", 0.001)
check(item, "latency p50 (ms)", h, n, None, "herald ≤ 0.75 × Nchan", le(ratio(h, n), 0.75))
h, n = H("unicast", "latency_us.p99", 0.001), NC("unicast", "latency_us.p99", 0.001)
check(item, "latency p99 (ms)", h, n, None, "herald ≤ Nchan", le(h, n))

item = f"5. broadcast to {meta.get('connections', '?')}, one message at a time (b1)"
h, n, c = (value("bcast-low", s, "server.cpu_us_per_delivery") for s in SERVERS)
check(item, "server CPU per delivery (µs)", h, n, c, "herald ≤ 0.75 × Nchan", le(ratio(h, n), 0.75))
check(item, "server CPU per delivery (µs)", h, n, c, "herald ≤ 1.15 × ceiling", le(ratio(h, c), 1.15))

item = f"6. idle memory, {meta.get('idle_connections', '?')} connections (PSS growth)"
h, n = H("", "memory:pss_per_conn_bytes"), NC("", "memory:pss_per_conn_bytes")
check(item, "bytes per connection", h, n, None, "herald ≤ 300 B", le(h, 300))

batch = meta.get("batch", "?")
item = f"7. POST /publish/batch, {batch} items a request, {meta.get('batch_conns', '?')} connection (e)"
h = H("batch-absent", "publish.rate_achieved")
check(item, "users not connected (e1): notifications accepted/s", h, None, None, "≥ 150,000/s", ge(h, 150_000))
check(item, "users not connected (e1): server CPU per notification (µs)",
      H("batch-absent", "server.cpu_us_per_message"), None, None, "", None)
check(item, "users connected (e2): notifications accepted/s", H("batch-connected", "publish.rate_achieved"),
      None, None, "", None)
check(item, "users connected (e2): deliveries/s", H("batch-connected", "deliveries_per_sec"), None, None, "", None)
check(item, "users connected (e2): server CPU per delivery (µs)", H("batch-connected", "server.cpu_us_per_delivery"),
      None, None, "", None)

# Overall: nothing lost or duplicated in any of herald's runs (the target); the other
# servers' losses are shown beside it.
totals = {srv: [0, 0, 0] for srv in SERVERS}  # lost, duplicated, runs
bad = []
for name in sorted(os.listdir(out)):
    # Redis counters (redis-<scenario>-<server>.json) and memory files have no "deliveries".
    if not name.endswith(".json"):
        continue
    doc = read(name)
    srv = name[:-5].rsplit("-", 1)[-1]
    if not doc or "deliveries" not in doc or srv not in totals:
        continue
    l, d = get(doc, "deliveries.lost") or 0, get(doc, "deliveries.duplicates") or 0
    t = totals[srv]
    t[0], t[1], t[2] = t[0] + l, t[1] + d, t[2] + 1
    if l or d:
        bad.append(f"{name[:-5]} {l}/{d}")
shown = [f"{totals[srv][0]} / {totals[srv][1]} ({totals[srv][2]} runs)" if totals[srv][2] else None for srv in SERVERS]
check("8. overall", "lost / duplicated deliveries, all runs", *shown, "herald 0 / 0",
      totals["herald"][2] > 0 and totals["herald"][0] == 0 and totals["herald"][1] == 0)


def cell(v):
    return fmt(v) if not isinstance(v, str) else v


print(f"### issue #9, Done when — {meta.get('started', os.path.basename(out))}\n")
print(f"{meta.get('connections', '?')} connections of as many users unless said otherwise, "
      f"{meta.get('server_threads', '?')} server threads / 2 nginx workers, payload {meta.get('payload_bytes', '?')} B, "
      f"window {meta.get('duration', '?')}, herald {meta.get('herald_commit', '?')}, nginx {meta.get('nginx', '?')} + Nchan, "
      f"Nchan Redis store {meta.get('nchan_redis_mode', '?')}, Redis {meta.get('redis', '?')}\n")
print("| item | figure | herald | Nchan | ceiling | target | |")
print("|---|---|---:|---:|---:|---|---|")
last = None
for item, figure, h, n, c, target, ok in checks:
    shown = item if item != last else ""
    last = item
    verdict = "" if ok is None or target == "" else ("ok" if ok else "**MISS**")
    print(f"| {shown} | {figure} | {cell(h)} | {cell(n)} | {cell(c)} | {target} | {verdict} |")
if bad:
    print(f"\nRuns with loss or duplicates (lost/dup): {', '.join(bad)}")

# ---- every scenario ------------------------------------------------------------------------
rows = []  # (label, scenario, path, scale)
rows += [
    ("**a. connect** N conns, max rate: connects/s", "connect", "connections.connect_rate_achieved", 1),
    ("a. server RSS per connection (B)", "connect", "server.rss_per_conn_bytes", 1),
    ("a. server CPU per connection (µs)", "connect", "server.cpu_us_per_conn", 1),
    ("a. established / failed", "connect", "@conns", 1),
]
scenarios = [
    ("bcast-low", f"**b1. broadcast** {get(load('bcast-low', 'herald') or {}, 'config.rate') or '?'} msg/s"),
    ("bcast-max", "**b2. broadcast** closed loop (max)"),
    ("bcast-high", f"**b3. broadcast** {meta.get('bcast_rate_high', '?')} msg/s"),
    ("unicast", f"**c1. unicast** HTTP {meta.get('unicast_rate', '?')} msg/s"),
    ("unicast-max", f"**c2. unicast** HTTP closed loop, {pubs} publishers"),
    ("redis-max", f"**d1. Redis mode** HTTP closed loop, {pubs} publishers"),
    ("redis-max1", "**d2. Redis mode** HTTP closed loop, 1 publisher"),
    ("redis-pub", f"**d3. Redis mode** {meta.get('redis_rate', '?')} msg/s, herald: PUBLISH, Nchan: HTTP"),
    ("redis-http", f"**d4. Redis mode** HTTP {meta.get('redis_rate', '?')} msg/s"),
    ("batch-absent", f"**e1. batch** of {batch}, users not connected"),
    ("batch-connected", f"**e2. batch** of {batch}, users connected"),
]
for scen, label in scenarios:
    short = label.split("**")[1]
    closed = scen.endswith(("max", "max1")) or scen.startswith("batch")
    if scen.startswith("batch"):
        rows.append((f"{label}: notifications accepted/s", scen, "publish.rate_achieved", 1))
        rows.append((f"{short} server CPU per notification (µs)", scen, "server.cpu_us_per_message", 1))
    rows.append((f"{label}: deliveries/s" if not scen.startswith("batch") else f"{short} deliveries/s",
                 scen, "deliveries_per_sec", 1))
    rows.append((f"{short} server CPU per delivery (µs)", scen, "server.cpu_us_per_delivery", 1))
    rows.append((f"{short} server cores busy", scen, "server.cpu_cores_busy", 1))
    if scen.startswith("redis"):
        rows.append((f"{short} redis-server CPU per delivery (µs)", scen, "aux.cpu_us_per_delivery", 1))
        rows.append((f"{short} Redis commands / reads", scen, "@redis", 1))
    if not closed:
        for p, name in [("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")]:
            rows.append((f"{short} latency {name} (ms)", scen, f"latency_us.{p}", 0.001))
    rows.append((f"{short} lost / duplicates / unexpected closes", scen, "@loss", 1))
    rows.append((f"{short} generator CPU per delivery (µs)", scen, "generator.cpu_us_per_delivery", 1))
rows += [
    (f"**f. idle memory** {meta.get('idle_connections', '?')} conns: PSS per connection (B)", "", "memory:pss_per_conn_bytes", 1),
    ("f. connections held", "", "memory:held", 1),
]


def row_value(scen, server, path, scale):
    if path == "@redis":
        doc = read(f"redis-{scen}-{server}.json")
        if not doc:
            return None
        return f"{doc.get('total_commands_processed')} / {doc.get('total_reads_processed')}"
    return value(scen, server, path, scale)


print(f"\n### every scenario — herald vs nginx+Nchan vs ceiling\n")
print(f"generator threads {meta.get('generator_threads', '?')}; open-loop HTTP publishing on "
      f"{meta.get('open_publish_conns', '?')} connections; b3 rate {meta.get('bcast_rate_high', '?')} msg/s\n")
print("| metric | herald | Nchan | ceiling | herald/Nchan | herald/ceiling | ceiling/Nchan |")
print("|---|---:|---:|---:|---:|---:|---:|")
for label, scen, path, scale in rows:
    vals = [row_value(scen, s, path, scale) for s in SERVERS]
    if all(v is None for v in vals):
        continue
    h, n, c = vals
    rs = [ratio(h, n), ratio(h, c), ratio(c, n)]
    print(f"| {label} | {fmt(h)} | {fmt(n)} | {fmt(c)} | " + " | ".join(fmt(r, 2) for r in rs) + " |")

loads = []
try:
    with open(os.path.join(out, "load.jsonl")) as f:
        loads = [json.loads(line) for line in f if line.strip()]
except (OSError, ValueError):
    pass
if loads:
    worst = max(loads, key=lambda r: r.get("niced_cpu_share", 0))
    la = [float(r["loadavg_after"].split()[0]) for r in loads]
    print(f"\nMachine load during the runs: 1-min load average {min(la):.2f}–{max(la):.2f}; "
          f"CPU share taken by niced (other) processes up to {worst['niced_cpu_share']:.0%} "
          f"({worst['run']}). Per run: load.jsonl.")
