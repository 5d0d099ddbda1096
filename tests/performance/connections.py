"""10,000 concurrent idle SSE connections to one server process.

    python tests/performance/connections.py [--connections 10000] [--runs 3]
        [--quick | --smoke] [--json FILE]

For each stack (our Starlette adapter, sse-starlette + encode/broadcaster, and
the bare ASGI app as the floor, all on plain uvicorn h11 with the asyncio loop)
a server subprocess is started and warmed up (one stream opened, one event
delivered, the stream closed), its RSS is read (baseline), then N SSE clients
connect from 4 client processes (raw sockets) and subscribe to one session.
Reported:

- RSS per connection, added: (RSS with N idle streams - baseline) / N;
- RSS per connection, server included: RSS with N idle streams / N (the
  figure to compare with Centrifuge's ~30 KB per connection for its Go server);
- the time to deliver one event to all N: from the publish request until the
  last client has it;
- the server's CPU while the N streams sit idle (10 s, in % of one core):
  the cost of keep-alive timers and the like.

RLIMIT_NOFILE is raised to its hard limit in every process (the server's and
the clients').
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Clients,
    Server,
    available,
    median,
    progress,
    raise_nofile,
    save_results,
    stamp,
    table,
)

STACKS = ["ours", "sse-starlette", "bare"]
TARGET_KB = 30.0


def measure(kind: str, n: int, settle: float = 1.0, idle: float = 10.0) -> dict[str, Any]:
    with Server(kind) as server:
        warm = Clients(server.port, ["/events/warm"], expect=1, procs=1)
        warm.wait_ready()
        server.wait_subscribers(1)
        warm.go(10)
        server.publish(["warm"], 1)
        warm.results()
        time.sleep(settle / 2)
        baseline = server.rss()
        t_connect = time.perf_counter()
        group = Clients(server.port, ["/events/idle"] * n, expect=1, procs=4)
        try:
            group.wait_ready(timeout=300)
            server.wait_subscribers(n, timeout=300)
            connect_s = time.perf_counter() - t_connect
            time.sleep(settle)
            loaded = server.rss()
            # Idle CPU: what keep-alive timers and the like cost with N open streams.
            cpu0, wall0 = server.cpu(), time.perf_counter()
            time.sleep(idle)
            idle_cpu = (server.cpu() - cpu0) / (time.perf_counter() - wall0)
            group.go(60)
            t0 = time.time()
            server.publish(["idle"], 1)
            out = group.results()
        finally:
            group.kill()
    return {
        "baseline_mb": baseline / 2**20,
        "loaded_mb": loaded / 2**20,
        "added_kb_per_conn": (loaded - baseline) / n / 1024,
        "total_kb_per_conn": loaded / n / 1024,
        "deliver_all_s": (out["last"] or float("nan")) - t0,
        "delivered": out["done"],
        "connect_s": connect_s,
        "idle_cpu": idle_cpu,
    }


def markdown(result: dict[str, Any]) -> str:
    n = result["connections"]
    rows = []
    for kind, r in result["stacks"].items():
        rows.append(
            [
                kind,
                f"{r['baseline_mb']:.1f}",
                f"{r['loaded_mb']:.1f}",
                f"{r['added_kb_per_conn']:.1f}",
                f"{r['total_kb_per_conn']:.1f}",
                f"{r['deliver_all_s'] * 1000:.0f} ms ({r['delivered']}/{n})",
                f"{r['connect_s']:.1f} s",
                f"{r['idle_cpu'] * 100:.1f} %",
            ]
        )
    header = [
        f"stack ({n} idle streams)",
        "RSS before (MB)",
        "RSS with streams (MB)",
        "KB per stream, added",
        "KB per stream, server included",
        "one event to all",
        "time to connect all",
        "server CPU while idle",
    ]
    return table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stacks", default=",".join(STACKS))
    parser.add_argument("--quick", action="store_true", help="one run")
    parser.add_argument("--smoke", action="store_true", help="50 connections, for the tests")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.smoke:
        args.connections, args.runs, args.no_progress = 50, 1, True
        args.stacks = "ours,sse-starlette"
    elif args.quick:
        args.runs = 1
    raise_nofile()
    stacks = [k for k in args.stacks.split(",") if available(k)]
    missing = [k for k in args.stacks.split(",") if k not in stacks]
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in stacks}
    with progress(args.runs * len(stacks), "connections", not args.no_progress) as bar:
        for r in range(args.runs):
            for kind in stacks if r % 2 == 0 else stacks[::-1]:
                bar.set_postfix_str(kind)
                samples[kind].append(
                    measure(kind, args.connections, *((0.2, 0.5) if args.smoke else (1.0, 10.0)))
                )
                bar.update()
    result: dict[str, Any] = {
        "connections": args.connections,
        "target_kb": TARGET_KB,
        "missing": missing,
    }
    result["stacks"] = {
        kind: {
            key: median([s[key] for s in runs]) if key != "delivered" else min(s[key] for s in runs)
            for key in runs[0]
        }
        for kind, runs in samples.items()
    }
    result["samples"] = samples
    stamp(result, "connections.py")
    save_results("connections", result, markdown(result), smoke=args.smoke, json_path=args.json)


if __name__ == "__main__":
    main()
