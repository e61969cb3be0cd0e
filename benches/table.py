#!/usr/bin/env python3
"""Markdown table of one compare.sh run: herald vs Nchan vs the ceiling.

    python3 benches/table.py benches/results/<timestamp>

Reads the herald-load reports <scenario>-<server>.json of that directory; ratios are
herald/Nchan and herald/ceiling of the same run; "goal" is the performance issue's bound on
the ratio (checked: ok / MISS). ceiling/Nchan shows how far below Nchan the floor itself
is: a herald/Nchan bound under it cannot be met on this machine.
"""
import json
import os
import sys

out = sys.argv[1]
SERVERS = ["herald", "nchan", "ceiling"]


def load(scenario, server):
    try:
        with open(os.path.join(out, f"{scenario}-{server}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


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
    if a is None or b is None or b == 0:
        return None
    return a / b


def check(r, goal):
    if r is None or goal is None:
        return ""
    op, bound = goal
    ok = r <= bound if op == "<=" else r >= bound
    return f" {'ok' if ok else 'MISS'}"


meta = {}
try:
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
except (OSError, ValueError):
    pass

rate_high = meta.get("bcast_rate_high", "?")
rows = []  # (label, scenario, path, scale, goal vs nchan, goal vs ceiling)
rows += [
    ("**a. connect** N conns, max rate: connects/s", "connect", "connections.connect_rate_achieved", 1, (">=", 1), None),
    ("a. server RSS per connection (B)", "connect", "server.rss_per_conn_bytes", 1, ("<=", 0.5), None),
    ("a. server CPU per connection (µs)", "connect", "server.cpu_us_per_conn", 1, ("<=", 0.5), None),
    ("a. established / failed", "connect", "@conns", 1, None, None),
]
for scen, label in [
    ("bcast-low", f"**b1. broadcast** {get(load('bcast-low', 'herald') or {}, 'config.rate') or '?'} msg/s"),
    ("bcast-max", "**b2. broadcast** closed loop (max)"),
    ("bcast-high", f"**b3. broadcast** {rate_high} msg/s"),
    ("unicast", f"**c1. unicast** HTTP {get(load('unicast', 'herald') or {}, 'config.rate') or '?'} msg/s"),
    ("unicast-max", "**c2. unicast** HTTP closed loop (max)"),
]:
    short = label.split("**")[1]
    rows.append((f"{label}: deliveries/s", scen, "deliveries_per_sec", 1, (">=", 1), None))
    rows.append((f"{short} server CPU per delivery (µs)", scen, "server.cpu_us_per_delivery", 1, ("<=", 0.5),
                 ("<=", 1.4) if scen.startswith("bcast") else None))
    rows.append((f"{short} server cores busy", scen, "server.cpu_cores_busy", 1, None, None))
    if not scen.endswith("max"):
        for p, name in [("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")]:
            rows.append((f"{short} latency {name} (ms)", scen, f"latency_us.{p}", 0.001, None, None))
    rows.append((f"{short} lost / duplicates / unexpected closes", scen, "@loss", 1, None, None))
    rows.append((f"{short} generator CPU per delivery (µs)", scen, "generator.cpu_us_per_delivery", 1, None, None))


def value(doc, path, scale):
    if doc is None:
        return None
    if path == "@conns":
        return f"{get(doc, 'connections.established')} / {get(doc, 'connections.failed')}"
    if path == "@loss":
        return (f"{get(doc, 'deliveries.lost')} / {get(doc, 'deliveries.duplicates')} / "
                f"{get(doc, 'connections.unexpected_closes')}")
    v = get(doc, path)
    return None if v is None else v * scale


print(f"### herald vs nginx+Nchan vs ceiling — {meta.get('started', os.path.basename(out))}\n")
print(f"{meta.get('connections', '?')} connections, {meta.get('server_threads', '?')} server threads / "
      f"2 nginx workers, payload {meta.get('payload_bytes', '?')} B, window {meta.get('duration', '?')}, "
      f"generator threads {meta.get('generator_threads', '?')}, herald {meta.get('herald_commit', '?')}, "
      f"nginx {meta.get('nginx', '?')}\n")
print("| metric | herald | Nchan | ceiling | herald/Nchan | herald/ceiling | ceiling/Nchan |")
print("|---|---:|---:|---:|---:|---:|---:|")
for label, scen, path, scale, goal_n, goal_c in rows:
    vals = [value(load(scen, s), path, scale) for s in SERVERS]
    if all(v is None for v in vals):
        continue
    h, n, c = vals
    num = all(isinstance(v, (int, float)) or v is None for v in vals)
    rn = ratio(h, n) if num else None
    rc = ratio(h, c) if num else None
    cn = ratio(c, n) if num else None
    gn = f" (goal {goal_n[0]} {goal_n[1]})" if goal_n and rn is not None else ""
    gc = f" (goal {goal_c[0]} {goal_c[1]})" if goal_c and rc is not None else ""
    print(f"| {label} | {fmt(h)} | {fmt(n)} | {fmt(c)} | "
          f"{fmt(rn, 2) if rn is not None else '–'}{gn}{check(rn, goal_n)} | "
          f"{fmt(rc, 2) if rc is not None else '–'}{gc}{check(rc, goal_c)} | "
          f"{fmt(cn, 2) if cn is not None else '–'} |")

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
