#!/usr/bin/env python3
"""Prints the benchmark table from bench/run.sh's JSON lines: the median of the runs of
each scenario on each server, and chat-sync / Nchan ratios (lower is better for chat-sync)."""
import json
import statistics
import sys
from collections import defaultdict

rows = defaultdict(list)
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        # Which server: chat-sync (this commit), chat-sync-base (BASELINE), nchan, ...
        server = r.get("server", {"ChatSync": "chat-sync", "Nchan": "nchan"}[r["target"]])
        rows[(r["label"], server)].append(r)


def med(runs, f):
    return statistics.median(f(r) for r in runs)


def ratio(a, b, f):
    """The median of `f` over runs `a` against runs `b`."""
    x, y = med(a, f), med(b, f)
    return f"{x / y:.3f}" if y else "–"


COLUMNS = [
    ("runs", lambda rs: len(rs), "{:.0f}"),
    ("connected", lambda rs: med(rs, lambda r: r["connected"]), "{:.0f}"),
    ("delivered/s", lambda rs: med(rs, lambda r: r["delivered_per_sec"]), "{:,.0f}"),
    ("lost", lambda rs: max(r["lost"] for r in rs), "{:.0f}"),
    ("dup", lambda rs: max(r["duplicates"] for r in rs), "{:.0f}"),
    ("msgs/event", lambda rs: med(rs, lambda r: r["avg_batch"]), "{:.1f}"),
    ("p50 ms", lambda rs: med(rs, lambda r: r["latency_ms"]["p50"]), "{:.1f}"),
    ("p99 ms", lambda rs: med(rs, lambda r: r["latency_ms"]["p99"]), "{:.1f}"),
    ("p99.9 ms", lambda rs: med(rs, lambda r: r["latency_ms"]["p999"]), "{:.1f}"),
    ("max ms", lambda rs: med(rs, lambda r: r["latency_ms"]["max"]), "{:.1f}"),
    ("server CPU µs/msg", lambda rs: med(rs, lambda r: r["server_cpu_us_per_delivery"]), "{:.3f}"),
    ("server CPU µs/event", lambda rs: med(rs, lambda r: r["server_cpu_secs"] * 1e6 / max(r["events"], 1)), "{:.2f}"),
    ("server % of a core", lambda rs: med(rs, lambda r: 100 * r["server_cpu_secs"] / r["window_secs"]), "{:.1f}"),
    ("server RSS KiB/conn", lambda rs: med(rs, lambda r: r["server_rss_kib_per_connection"]), "{:.2f}"),
    ("wire B/msg", lambda rs: med(rs, lambda r: r.get("wire_bytes_per_delivery", 0)), "{:.1f}"),
    ("loadgen CPU µs/msg", lambda rs: med(rs, lambda r: r["loadgen_cpu_us_per_delivery"]), "{:.3f}"),
]

print("| scenario | server | " + " | ".join(c[0] for c in COLUMNS) + " |")
print("|---|---|" + "---|" * len(COLUMNS))
scenarios = []
for (label, _) in rows:
    # A latency probe's row only says what its few viewers saw (see the gzip table).
    if label not in scenarios and not label.endswith("-probe"):
        scenarios.append(label)
for label in scenarios:
    for server in ("chat-sync", "chat-sync-gzip", "chat-sync-paced", "chat-sync-base", "chat-sync-nginx", "nchan"):
        rs = rows.get((label, server))
        if not rs:
            continue
        cells = [fmt.format(f(rs)) for _, f, fmt in COLUMNS]
        name = {"nchan": "nginx+Nchan", "chat-sync-base": "chat-sync (baseline)"}.get(server, server)
        print(f"| {label} | {name} | " + " | ".join(cells) + " |")

print()
print("| scenario | versus | CPU/msg ratio | RSS/conn ratio | p99 ratio |")
print("|---|---|---|---|---|")
for label in scenarios:
    a = rows.get((label, "chat-sync")) or rows.get((label, "chat-sync-nginx"))
    for other in ("chat-sync-base", "nchan"):
        if label.startswith("gzip-"):
            continue
        b = rows.get((label, other))
        if not a or not b:
            continue
        print(f"| {label} | {'Nchan' if other == 'nchan' else 'baseline'} | "
              f"{ratio(a, b, lambda r: r['server_cpu_us_per_delivery'])} | "
              f"{ratio(a, b, lambda r: r['server_rss_kib_per_connection'])} | "
              f"{ratio(a, b, lambda r: r['latency_ms']['p99'])} |")

idle = rows.get(("idle", "chat-sync"))
if idle:
    per = med(idle, lambda r: r["server_rss_kib_per_connection"])
    print()
    print(f"Idle projection (chat-sync, {per:.2f} KiB per connection): "
          f"100,000 connections ≈ {per * 100_000 / 1024:,.0f} MiB, "
          f"1,000,000 connections ≈ {per * 1_000_000 / 1024 / 1024:,.2f} GiB (plus the baseline).")
    nchan = rows.get(("idle", "nchan"))
    if nchan:
        n = med(nchan, lambda r: r["server_rss_kib_per_connection"])
        print(f"Idle projection (Nchan, {n:.2f} KiB per connection): "
              f"100,000 ≈ {n * 100_000 / 1024:,.0f} MiB, 1,000,000 ≈ {n * 1_000_000 / 1024 / 1024:,.2f} GiB.")

gzip = [label for label in scenarios if rows.get((label, "chat-sync-gzip")) and rows.get((label, "chat-sync"))]
if gzip:
    print()
    print("| scenario | gzip / plain: wire bytes per message | server CPU per message | RSS per connection | p99 | probe p99 ms, plain → gzip |")
    print("|---|---|---|---|---|---|")
    p99 = lambda r: r["latency_ms"]["p99"]
    for label in gzip:
        z, p = rows[(label, "chat-sync-gzip")], rows[(label, "chat-sync")]
        zp, pp = rows.get((label + "-probe", "chat-sync-gzip")), rows.get((label + "-probe", "chat-sync"))
        probe = f"{med(pp, p99):.1f} → {med(zp, p99):.1f}" if zp and pp else "-"
        print(f"| {label} | {ratio(z, p, lambda r: r.get('wire_bytes_per_delivery', 0))} | "
              f"{ratio(z, p, lambda r: r['server_cpu_us_per_delivery'])} | "
              f"{ratio(z, p, lambda r: r['server_rss_kib_per_connection'])} | "
              f"{ratio(z, p, p99)} | {probe} |")

paced = [label for label in scenarios if rows.get((label, "chat-sync-paced")) and rows.get((label, "chat-sync"))]
if paced:
    print()
    print("| scenario | paced / every tick: server CPU (% of a core) | server CPU per message | messages per event, every tick → paced | p50 ms, every tick → paced |")
    print("|---|---|---|---|---|")
    core = lambda r: r["server_cpu_secs"] / r["window_secs"]
    for label in paced:
        z, p = rows[(label, "chat-sync-paced")], rows[(label, "chat-sync")]
        print(f"| {label} | {ratio(z, p, core)} | {ratio(z, p, lambda r: r['server_cpu_us_per_delivery'])} | "
              f"{med(p, lambda r: r['avg_batch']):.1f} → {med(z, lambda r: r['avg_batch']):.1f} | "
              f"{med(p, lambda r: r['latency_ms']['p50']):.1f} → {med(z, lambda r: r['latency_ms']['p50']):.1f} |")
