"""In-process fan-out: deliveries per second until every subscriber has every event.

One session, S subscribers each consuming with ``async for``, E events published
by one task that yields to the loop every --batch events (so that bounded
queues are not overrun; every implementation gets the same publisher loop).
Measured side by side, alternately, in fresh processes:

- ``ours``: sse_broadcaster.EventBroadcaster with the default config
  (history 500 per session, TTLs, queues bounded by count and bytes);
- ``encode``: encode/broadcaster's ``Broadcast("memory://")`` (``bench`` extra);
- ``queue``: a plain asyncio.Queue per subscriber, the publisher putting into each.

Also reports tracemalloc bytes per idle subscription for 100,000 subscriptions.

    python tests/performance/bench_fanout.py [--runs 3] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import Any

CASES = [(1, 100_000), (100, 10_000), (1000, 1000), (10_000, 100)]
QUICK_CASES = [(1, 10_000), (100, 1000), (1000, 100), (10_000, 10)]
IMPLS = ["ours", "encode", "queue"]
PAYLOAD = "x" * 100


async def _timed(
    publish: Any, events: int, batch: int, done: asyncio.Event, tasks: list[Any]
) -> float:
    """The measured part, the same for every broadcaster: publish, then wait for all."""
    start = time.perf_counter()
    for i in range(events):
        await publish("bench", PAYLOAD)
        if i % batch == batch - 1:
            await asyncio.sleep(0)
    await done.wait()
    elapsed = time.perf_counter() - start
    await asyncio.gather(*tasks)
    return elapsed


async def run_ours(subscribers: int, events: int, batch: int) -> float:
    from sse_broadcaster import EventBroadcaster

    async with EventBroadcaster() as broadcaster:
        done = asyncio.Event()
        remaining = subscribers

        async def consume(sub: Any) -> None:
            nonlocal remaining
            n = 0
            async with sub:
                async for _ in sub:
                    n += 1
                    if n == events:
                        break
            remaining -= 1
            if remaining == 0:
                done.set()

        subs = [broadcaster.subscribe("bench") for _ in range(subscribers)]
        tasks = []
        for sub in subs:
            tasks.append(asyncio.ensure_future(consume(sub)))
        await asyncio.sleep(0.05)  # every subscriber entered and parked
        return await _timed(broadcaster.publish, events, batch, done, tasks)


async def run_encode(subscribers: int, events: int, batch: int) -> float:
    from broadcaster import Broadcast

    async with Broadcast("memory://") as broadcast:
        done = asyncio.Event()
        ready = 0
        remaining = subscribers

        async def consume() -> None:
            nonlocal remaining, ready
            n = 0
            async with broadcast.subscribe("bench") as subscriber:
                ready += 1
                async for _ in subscriber:
                    n += 1
                    if n == events:
                        break
            remaining -= 1
            if remaining == 0:
                done.set()

        tasks = [asyncio.ensure_future(consume()) for _ in range(subscribers)]
        while ready < subscribers:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return await _timed(broadcast.publish, events, batch, done, tasks)


async def run_queue(subscribers: int, events: int, batch: int) -> float:
    queues: list[asyncio.Queue[str]] = [asyncio.Queue() for _ in range(subscribers)]
    done = asyncio.Event()
    remaining = subscribers

    async def consume(queue: asyncio.Queue[str]) -> None:
        nonlocal remaining
        for _ in range(events):
            await queue.get()
        remaining -= 1
        if remaining == 0:
            done.set()

    tasks = [asyncio.ensure_future(consume(q)) for q in queues]
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    for i in range(events):
        for queue in queues:
            queue.put_nowait(PAYLOAD)
        if i % batch == batch - 1:
            await asyncio.sleep(0)
    await done.wait()
    elapsed = time.perf_counter() - start
    await asyncio.gather(*tasks)
    return elapsed


RUNNERS = {"ours": run_ours, "encode": run_encode, "queue": run_queue}


def idle_subscription_bytes(count: int) -> float:
    """tracemalloc bytes per entered, idle subscription."""
    from sse_broadcaster import BroadcasterConfig, EventBroadcaster

    async def main() -> float:
        config = BroadcasterConfig(max_subscribers_per_session=None)
        async with EventBroadcaster(config) as broadcaster:
            await broadcaster.publish("idle", "warm-up")
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            subs = [broadcaster.subscribe(f"idle-{i % 100}") for i in range(count)]
            for sub in subs:
                await sub.__aenter__()
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
            for sub in subs:
                await sub.aclose()
            return grown / count

    return asyncio.run(main())


def child(impl: str, subscribers: int, events: int, batch: int) -> None:
    elapsed = asyncio.run(RUNNERS[impl](subscribers, events, batch))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"elapsed": elapsed, "peak_rss_mb": peak_kb / 1024}))


def run_child(impl: str, subscribers: int, events: int, batch: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", impl, str(subscribers), str(events), str(batch)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("sse-broadcaster", "broadcaster", "anyio"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:  # pragma: no cover
            found[name] = "missing"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per implementation and case")
    parser.add_argument("--quick", action="store_true", help="10x fewer events (smoke mode)")
    parser.add_argument("--batch", type=int, default=100, help="publishes between yields")
    parser.add_argument("--idle", type=int, default=100_000, help="idle subscriptions measured")
    parser.add_argument("--json", help="write the results as JSON to this file")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, s, e, b = args.child
        child(impl, int(s), int(e), int(b))
        return

    cases = QUICK_CASES if args.quick else CASES
    rows = []
    for subscribers, events in cases:
        samples: dict[str, list[dict[str, float]]] = {impl: [] for impl in IMPLS}
        for run in range(args.runs):
            # Alternate the order so that drift in machine load hits everyone alike.
            order = IMPLS if run % 2 == 0 else IMPLS[::-1]
            for impl in order:
                samples[impl].append(run_child(impl, subscribers, events, args.batch))
        row: dict[str, Any] = {"subscribers": subscribers, "events": events}
        for impl in IMPLS:
            elapsed = statistics.median(s["elapsed"] for s in samples[impl])
            row[impl] = {
                "median_s": elapsed,
                "deliveries_per_s": subscribers * events / elapsed,
                "peak_rss_mb": max(s["peak_rss_mb"] for s in samples[impl]),
                "runs_s": [s["elapsed"] for s in samples[impl]],
            }
        row["vs_encode"] = row["ours"]["deliveries_per_s"] / row["encode"]["deliveries_per_s"]
        row["vs_queue"] = row["ours"]["deliveries_per_s"] / row["queue"]["deliveries_per_s"]
        rows.append(row)
        print(
            f"S={subscribers:>6} E={events:>7}  "
            + "  ".join(f"{impl} {row[impl]['deliveries_per_s'] / 1e6:6.2f}M/s" for impl in IMPLS)
            + f"  x{row['vs_encode']:.2f} encode  x{row['vs_queue']:.2f} queue",
            flush=True,
        )
    idle = idle_subscription_bytes(args.idle // (10 if args.quick else 1))

    print()
    print(f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, {versions()}")
    print(f"Median of {args.runs} runs each, alternating; deliveries/s (M = 10^6); peak RSS MB.")
    print()
    header = ["S x E", "ours", "encode/broadcaster", "asyncio.Queue fan-out"]
    print("| " + " | ".join([*header, "ours / encode", "ours / queue"]) + " |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = [
            f"{row[impl]['deliveries_per_s'] / 1e6:.2f}M ({row[impl]['peak_rss_mb']:.0f} MB)"
            for impl in IMPLS
        ]
        print(
            f"| {row['subscribers']} x {row['events']} | "
            + " | ".join(cells)
            + f" | {row['vs_encode']:.2f}x | {row['vs_queue']:.2f}x |"
        )
    print()
    print(
        f"tracemalloc bytes per idle subscription ({args.idle // (10 if args.quick else 1)}): "
        f"{idle:.0f} B"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"rows": rows, "idle_subscription_bytes": idle, "versions": versions()}, f, indent=2
            )


if __name__ == "__main__":
    main()
