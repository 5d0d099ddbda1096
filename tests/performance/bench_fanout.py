"""In-process fan-out: deliveries per second until every subscriber has every event.

One session, S subscribers each consuming with ``async for``, E events published
by one task. Two modes (``--mode``):

- ``burst``: the publisher yields to the loop every --batch events (so that
  bounded queues are not overrun); subscribers drain many events per wake-up;
- ``paced``: the publisher waits until every subscriber has the event before
  publishing the next, so every subscriber parks and is woken once per event:
  the wake-up dominates.

Every implementation gets the same publisher loop. Measured side by side,
alternately, in fresh processes:

- ``ours``: sse_broadcaster.EventBroadcaster with the default config
  (history 500 per session, TTLs, queues bounded by count and bytes);
- ``encode``: encode/broadcaster's ``Broadcast("memory://")`` (``bench`` extra);
- ``queue``: a plain asyncio.Queue per subscriber, the publisher putting into each.

Also reports tracemalloc bytes per idle subscription for 100,000 subscriptions.

    python tests/performance/bench_fanout.py [--runs 3] [--quick] [--mode burst|paced|both]
        [--subscribers 100,1000] [--json FILE]
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
from collections import deque
from typing import Any

CASES = [(1, 100_000), (100, 10_000), (1000, 1000), (10_000, 100)]
QUICK_CASES = [(1, 10_000), (100, 1000), (1000, 100), (10_000, 10)]
# Paced: one wake-up per delivery, so 5x fewer deliveries per case.
PACED_CASES = [(1, 20_000), (100, 2000), (1000, 200), (10_000, 20)]
IMPLS = ["ours", "encode", "queue"]
NAMES = {
    "ours": "ours",
    "encode": "encode/broadcaster",
    "queue": "asyncio.Queue fan-out",
    "proto": "deque prototype",
}
PAYLOAD = "x" * 100
# --clock cpu: the process's CPU time, which other processes' load does not inflate
# (one thread, so it is the wall time of an idle machine).
CLOCK = time.perf_counter


class Pace:
    """Paced mode: the publisher waits until all ``subscribers`` have the event.

    ``batch == 0`` means paced; then every consumer calls `got` per event (not
    in burst mode, whose figures stay comparable with earlier ones).
    """

    __slots__ = ("count", "paced", "step", "subscribers")

    def __init__(self, subscribers: int, batch: int) -> None:
        self.subscribers = subscribers
        self.paced = batch == 0
        self.count = 0
        self.step = asyncio.Event()

    def got(self) -> None:
        self.count += 1
        if self.count == self.subscribers:
            self.count = 0
            if self.paced:
                self.step.set()


async def _timed(
    publish: Any, events: int, batch: int, done: asyncio.Event, tasks: list[Any], pace: Pace
) -> float:
    """The measured part, the same for every broadcaster: publish, then wait for all."""
    start = CLOCK()
    if pace.paced:
        step = pace.step
        for _ in range(events):
            step.clear()
            await publish("bench", PAYLOAD)
            await step.wait()
    else:
        for i in range(events):
            await publish("bench", PAYLOAD)
            if i % batch == batch - 1:
                await asyncio.sleep(0)
    await done.wait()
    elapsed = CLOCK() - start
    await asyncio.gather(*tasks)
    return elapsed


async def run_ours(subscribers: int, events: int, batch: int) -> float:
    from sse_broadcaster import EventBroadcaster

    async with EventBroadcaster() as broadcaster:
        done = asyncio.Event()
        remaining = subscribers
        pace = Pace(subscribers, batch)

        async def consume(sub: Any) -> None:
            nonlocal remaining
            n = 0
            got, paced = pace.got, pace.paced
            async with sub:
                async for _ in sub:
                    if paced:
                        got()
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
        return await _timed(broadcaster.publish, events, batch, done, tasks, pace)


async def run_encode(subscribers: int, events: int, batch: int) -> float:
    from broadcaster import Broadcast

    async with Broadcast("memory://") as broadcast:
        done = asyncio.Event()
        ready = 0
        remaining = subscribers
        pace = Pace(subscribers, batch)

        async def consume() -> None:
            nonlocal remaining, ready
            n = 0
            got, paced = pace.got, pace.paced
            async with broadcast.subscribe("bench") as subscriber:
                ready += 1
                async for _ in subscriber:
                    if paced:
                        got()
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
        return await _timed(broadcast.publish, events, batch, done, tasks, pace)


async def run_queue(subscribers: int, events: int, batch: int) -> float:
    queues: list[asyncio.Queue[str]] = [asyncio.Queue() for _ in range(subscribers)]
    done = asyncio.Event()
    remaining = subscribers
    pace = Pace(subscribers, batch)

    async def consume(queue: asyncio.Queue[str]) -> None:
        nonlocal remaining
        got, paced = pace.got, pace.paced
        for _ in range(events):
            await queue.get()
            if paced:
                got()
        remaining -= 1
        if remaining == 0:
            done.set()

    async def publish(_: str, data: str) -> None:
        for queue in queues:
            queue.put_nowait(data)

    tasks = [asyncio.ensure_future(consume(q)) for q in queues]
    await asyncio.sleep(0.05)
    return await _timed(publish, events, batch, done, tasks, pace)


class _ProtoSubscriber:
    """The deque prototype's subscriber: a bounded deque and a waiter future."""

    __slots__ = ("items", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.items: deque[Any] = deque()
        self.loop = loop
        self.waiter: asyncio.Future[None] | None = None

    def __aiter__(self) -> _ProtoSubscriber:
        return self

    async def __anext__(self) -> Any:
        items = self.items
        while not items:
            waiter = self.waiter = self.loop.create_future()
            await waiter
        return items.popleft()


async def run_proto(subscribers: int, events: int, batch: int) -> float:
    """The speed of light of the contract: the ~40-line deque prototype of #14
    (history of 500, count-bounded queues dropping the newest; no ids, TTLs, bytes)."""
    from sse_broadcaster._event import make_event

    loop = asyncio.get_running_loop()
    subs = [_ProtoSubscriber(loop) for _ in range(subscribers)]
    history: deque[Any] = deque(maxlen=500)
    seq = 0
    done = asyncio.Event()
    remaining = subscribers
    pace = Pace(subscribers, batch)

    async def publish(session_id: str, data: str) -> None:
        nonlocal seq
        seq += 1
        event = make_event(str(seq), session_id, data, None, None, 0.0)
        history.append(event)
        for sub in subs:
            items = sub.items
            if len(items) < 1000:
                items.append(event)
            waiter = sub.waiter
            if waiter is not None:
                sub.waiter = None
                if not waiter.done():
                    waiter.set_result(None)

    async def consume(sub: _ProtoSubscriber) -> None:
        nonlocal remaining
        n = 0
        got, paced = pace.got, pace.paced
        async for _ in sub:
            if paced:
                got()
            n += 1
            if n == events:
                break
        remaining -= 1
        if remaining == 0:
            done.set()

    tasks = [asyncio.ensure_future(consume(sub)) for sub in subs]
    await asyncio.sleep(0.05)
    return await _timed(publish, events, batch, done, tasks, pace)


RUNNERS = {"ours": run_ours, "encode": run_encode, "queue": run_queue, "proto": run_proto}


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


def child(impl: str, subscribers: int, events: int, batch: int, clock: str) -> None:
    global CLOCK
    CLOCK = time.process_time if clock == "cpu" else time.perf_counter
    elapsed = asyncio.run(RUNNERS[impl](subscribers, events, batch))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"elapsed": elapsed, "peak_rss_mb": peak_kb / 1024}))


def run_child(impl: str, subscribers: int, events: int, batch: int, clock: str) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            impl,
            str(subscribers),
            str(events),
            str(batch),
            clock,
        ],
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
    parser.add_argument("--batch", type=int, default=100, help="publishes between yields (burst)")
    parser.add_argument("--mode", choices=["burst", "paced", "both"], default="burst")
    parser.add_argument("--subscribers", help="only these S, comma-separated (default: every case)")
    parser.add_argument("--idle", type=int, default=100_000, help="idle subscriptions measured")
    parser.add_argument("--json", help="write the results as JSON to this file")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time the runs by wall clock or by the process's CPU time (robust on a busy machine)",
    )
    parser.add_argument(
        "--impls",
        default=",".join(IMPLS),
        help=f"comma-separated, ours first (of {', '.join(RUNNERS)})",
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, s, e, b, clock = args.child
        child(impl, int(s), int(e), int(b), clock)
        return

    impls = args.impls.split(",")
    if impls[0] != "ours" or not set(impls) <= set(RUNNERS):
        parser.error(f"--impls must start with ours and name only {', '.join(RUNNERS)}")
    modes = ["burst", "paced"] if args.mode == "both" else [args.mode]
    only = {int(n) for n in args.subscribers.split(",")} if args.subscribers else None
    rows = []
    for mode in modes:
        cases = PACED_CASES if mode == "paced" else CASES
        if args.quick:
            cases = [(s, max(1, e // 10)) for s, e in cases]
        batch = 0 if mode == "paced" else args.batch
        for subscribers, events in cases:
            if only is not None and subscribers not in only:
                continue
            rows.append(measure(impls, mode, subscribers, events, batch, args.runs, args.clock))
    idle_count = args.idle // (10 if args.quick else 1)
    idle = idle_subscription_bytes(idle_count) if idle_count else None

    print()
    print(f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, {versions()}")
    print(
        f"Median of {args.runs} runs each, alternating, {args.clock} clock; deliveries/s "
        "(M = 10^6); peak RSS MB; ratios: median of the per-run ratios (range)."
    )
    print()
    peers = impls[1:]
    header = ["mode", "S x E", *(NAMES[impl] for impl in impls), *(f"ours / {p}" for p in peers)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [
            f"{row[impl]['deliveries_per_s'] / 1e6:.2f}M ({row[impl]['peak_rss_mb']:.0f} MB)"
            for impl in impls
        ]
        ratios = [
            f"{row[key]:.2f}x ({min(row[key + '_runs']):.2f}-{max(row[key + '_runs']):.2f})"
            for key in (f"vs_{p}" for p in peers)
        ]
        print(
            f"| {row['mode']} | {row['subscribers']} x {row['events']} | "
            + " | ".join(cells + ratios)
            + " |"
        )
    if idle is not None:
        print()
        print(f"tracemalloc bytes per idle subscription ({idle_count}): {idle:.0f} B")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"rows": rows, "idle_subscription_bytes": idle, "versions": versions()}, f, indent=2
            )


def measure(
    impls: list[str], mode: str, subscribers: int, events: int, batch: int, runs: int, clock: str
) -> dict[str, Any]:
    """One case: every implementation `runs` times, alternating; medians and per-run ratios."""
    samples: dict[str, list[dict[str, float]]] = {impl: [] for impl in impls}
    for run in range(runs):
        # Alternate the order so that drift in machine load hits everyone alike.
        order = impls if run % 2 == 0 else impls[::-1]
        for impl in order:
            samples[impl].append(run_child(impl, subscribers, events, batch, clock))
    row: dict[str, Any] = {"mode": mode, "subscribers": subscribers, "events": events}
    for impl in impls:
        elapsed = statistics.median(s["elapsed"] for s in samples[impl])
        row[impl] = {
            "median_s": elapsed,
            "deliveries_per_s": subscribers * events / elapsed,
            "peak_rss_mb": max(s["peak_rss_mb"] for s in samples[impl]),
            "runs_s": [s["elapsed"] for s in samples[impl]],
        }
    ours = row["ours"]["runs_s"]
    for peer in impls[1:]:
        # Runs of one round ran back to back: their ratio cancels most of the load drift.
        per_run = [p / o for o, p in zip(ours, row[peer]["runs_s"], strict=True)]
        row[f"vs_{peer}_runs"] = per_run
        row[f"vs_{peer}"] = statistics.median(per_run)
    print(
        f"{mode:5} S={subscribers:>6} E={events:>7}  "
        + "  ".join(f"{impl} {row[impl]['deliveries_per_s'] / 1e6:6.2f}M/s" for impl in impls)
        + "".join(f"  x{row['vs_' + peer]:.2f} {peer}" for peer in impls[1:]),
        flush=True,
    )
    return row


if __name__ == "__main__":
    main()
