"""Memory soak: RSS over time under publishing, churn and slow subscribers.

    python tests/performance/benchmark_sse_memory.py [--quick | --full | --duration SECONDS]
        [--smoke] [--json FILE]

The reference document's memory benchmark, done properly. Duration: 60 s by
default and with --quick, 10 minutes with --full, anything with --duration
(3600 for the hour; a run longer than 10 minutes is saved as
``memory_soak-long`` next to the 10-minute one). Three child processes run
the same load side by side, at the same time: ``ours`` (EventBroadcaster),
``encode`` (encode/broadcaster's ``Broadcast("memory://")``) and ``harness``
(the same load with a broadcaster that does nothing: the growth of the
interpreter and of the load itself).
This process samples each child's RSS every second (psutil).

The load, in each child:

- 1,000 live sessions: a sliding window of session ids that moves by 20
  sessions a second, so sessions keep appearing and going idle;
- continuous publishing: 2,000 events/s of ~200 bytes of JSON into random
  sessions of the window;
- churn: 1,000 subscriber tasks, each subscribing to a random session,
  reading for 0.2-3 s, unsubscribing and starting again;
- 5 % of the subscriptions never read: they stay subscribed for 30 s (their
  queues fill) and then close; one in five of those is abandoned without
  being closed at all (as an async generator that is never finalised);
- ours runs with short TTLs so that the sweeps work hard: event_ttl 5 s,
  session_ttl 10 s, cleanup_interval 1 s, 50 events of history per session.

Reported per child: peak RSS, growth in MB/hour (least-squares slope of RSS
after the warm-up, the first 20 % of the run and at least 10 s; and, for
information, over the second half of the run), the cleanup
counters (ours) and what encode/broadcaster still holds at the end, and a PNG
of RSS over time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

from _common import (
    RESULTS,
    available,
    progress,
    save_results,
    stamp,
    table,
)

IMPLS = ["ours", "encode", "harness"]
LABELS = {
    "ours": "ours (EventBroadcaster)",
    "encode": "encode/broadcaster",
    "harness": "the load alone (no broadcaster)",
}
SESSIONS = 1000
SHIFT_PER_S = 20
RATE = 2000
SUBSCRIBERS = 1000
NEVER_READ = 0.05
ABANDON = 0.2  # of the never-readers
TARGET_GROWTH = 0.5
TARGET_PEAK = 60.0


# -- the load (child) ----------------------------------------------------------------


async def load(impl: str, duration: float, scale: float) -> dict[str, Any]:
    start = time.monotonic()
    stop_at = start + duration
    rng = random.Random(1)
    counters = {"published": 0, "received": 0, "subscriptions": 0, "never_read": 0, "abandoned": 0}
    abandoned: list[Any] = []  # released after a while, never closed
    if impl == "ours":
        from sse_broadcaster import BroadcasterConfig, EventBroadcaster

        config = BroadcasterConfig(
            event_ttl=5.0,
            session_ttl=10.0,
            cleanup_interval=1.0,
            max_history_per_session=50,
        )
        hub: Any = EventBroadcaster(config)

        async def publish(room: str, data: str) -> None:
            await hub.publish(room, data)

        def subscribe(room: str) -> Any:
            return hub.subscribe(room)

    elif impl == "harness":
        # The same tasks, timers and JSON without a broadcaster: what the load
        # itself costs the interpreter, to tell the libraries' growth from its.
        hub = _NullHub()

        async def publish(room: str, data: str) -> None:
            return None

        def subscribe(room: str) -> Any:
            return _NullSubscription()

    else:
        from broadcaster import Broadcast

        hub = Broadcast("memory://")

        async def publish(room: str, data: str) -> None:
            await hub.publish(room, data)

        def subscribe(room: str) -> Any:
            return hub.subscribe(room)

    def room() -> str:
        base = int((time.monotonic() - start) * SHIFT_PER_S)
        return f"s{base + rng.randrange(SESSIONS)}"

    async def publisher() -> None:
        tick = 0.05
        per_tick = max(1, int(RATE * scale * tick))
        n = 0
        while time.monotonic() < stop_at:
            for _ in range(per_tick):
                n += 1
                await publish(room(), json.dumps({"n": n, "text": "x" * 180}))
            counters["published"] = n
            await asyncio.sleep(tick)

    async def reader(sub: Any, hold: float) -> None:
        deadline = min(time.monotonic() + hold, stop_at)
        events = sub.__aiter__()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                with _suppress_timeout():
                    await asyncio.wait_for(events.__anext__(), left)
                    counters["received"] += 1
        except StopAsyncIteration:
            return
        except Exception:  # ours ends a subscription that overflows; not expected here
            return

    async def subscriber() -> None:
        await asyncio.sleep(rng.random() * min(2.0, duration / 4))
        while time.monotonic() < stop_at:
            counters["subscriptions"] += 1
            if rng.random() < NEVER_READ:
                counters["never_read"] += 1
                cm = subscribe(room())
                sub = await cm.__aenter__()
                if rng.random() < ABANDON:
                    counters["abandoned"] += 1
                    abandoned.append((cm, sub))
                    del cm, sub
                    await asyncio.sleep(min(30, max(0.0, stop_at - time.monotonic())))
                    abandoned.pop(0)  # drop the references without closing
                    continue
                await asyncio.sleep(min(30, max(0.0, stop_at - time.monotonic())))
                await cm.__aexit__(None, None, None)
                continue
            async with subscribe(room()) as sub:
                await reader(sub, 0.2 + rng.random() * 2.8)

    async with hub:
        tasks = [asyncio.ensure_future(publisher())]
        tasks += [asyncio.ensure_future(subscriber()) for _ in range(int(SUBSCRIBERS * scale))]
        await asyncio.gather(*tasks, return_exceptions=True)
        abandoned.clear()
        gc.collect()
        extra: dict[str, Any] = {}
        if impl == "ours":
            await hub.cleanup()
            metrics = hub.metrics()
            extra = {
                "expired_events_cleaned": metrics.expired_events_cleaned,
                "dead_queues_cleaned": metrics.dead_queues_cleaned,
                "sessions_expired": metrics.sessions_expired,
                "cleanup_count": metrics.cleanup_count,
                "stats": hub.stats(),
            }
        elif impl == "encode":
            subs = hub._subscribers
            extra = {
                "channels_left": len(subs),
                "queues_left": sum(len(q) for q in subs.values()),
                "events_left": sum(q.qsize() for qs in subs.values() for q in qs),
            }
    return {**counters, **extra}


class _NullHub:
    async def __aenter__(self) -> _NullHub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _NullSubscription:
    """Subscribes to nothing: iterating it waits until cancelled."""

    async def __aenter__(self) -> _NullSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __aiter__(self) -> _NullSubscription:
        return self

    async def __anext__(self) -> Any:
        await asyncio.get_running_loop().create_future()


class _suppress_timeout:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, TimeoutError)


def child(impl: str, duration: float, scale: float) -> None:
    print(json.dumps(asyncio.run(load(impl, duration, scale)), default=str), flush=True)


# -- the driver ----------------------------------------------------------------------


def slope_mb_per_hour(samples: list[tuple[float, float]], warmup: float) -> float:
    points = [(t, mb) for t, mb in samples if t >= warmup]
    if len(points) < 3:
        return float("nan")
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mm = sum(m for _, m in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    cov = sum((t - mt) * (m - mm) for t, m in points)
    return cov / var * 3600 if var else float("nan")


def run(duration: float, scale: float, show: bool) -> dict[str, Any]:
    import psutil

    impls = [impl for impl in IMPLS if available(impl)]
    procs = {
        impl: subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                impl,
                "--duration",
                str(duration),
                "--scale",
                str(scale),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for impl in impls
    }
    ps = {impl: psutil.Process(p.pid) for impl, p in procs.items()}
    samples: dict[str, list[tuple[float, float]]] = {impl: [] for impl in impls}
    t0 = time.monotonic()
    with progress(int(duration), "memory_soak (s)", show) as bar:
        done = 0
        while any(p.poll() is None for p in procs.values()):
            now = time.monotonic() - t0
            for impl, proc in ps.items():
                with contextlib.suppress(psutil.Error):
                    samples[impl].append((now, proc.memory_info().rss / 2**20))
            time.sleep(1.0)
            if done < int(duration):
                bar.update(1)
                done += 1
            if now > duration + 120:
                for p in procs.values():
                    p.kill()
    warmup = max(10.0, 0.2 * duration)
    result: dict[str, Any] = {
        "duration_s": duration,
        "warmup_s": warmup,
        "targets": {"growth_mb_per_hour": TARGET_GROWTH, "peak_mb": TARGET_PEAK},
        "impls": {},
        "missing": [impl for impl in IMPLS if impl not in impls],
    }
    for impl, proc in procs.items():
        out, _ = proc.communicate()
        counters = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        series = samples[impl]
        result["impls"][impl] = {
            "peak_mb": max(m for _, m in series) if series else float("nan"),
            "final_mb": series[-1][1] if series else float("nan"),
            "growth_mb_per_hour": slope_mb_per_hour(series, warmup),
            # Supplementary: the slope over the second half only, once the
            # allocator has settled (the target uses the one above).
            "growth_second_half_mb_per_hour": slope_mb_per_hour(series, duration / 2),
            "counters": counters,
            "rss": [(round(t, 2), round(m, 3)) for t, m in series],
        }
    return result


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for impl, r in result["impls"].items():
        c = r["counters"]
        if impl == "ours":
            cleanup = (
                f"expired events {c.get('expired_events_cleaned')}, dead queues "
                f"{c.get('dead_queues_cleaned')}, sessions expired {c.get('sessions_expired')}, "
                f"sweeps {c.get('cleanup_count')}"
            )
        elif impl == "encode":
            cleanup = (
                f"no sweeps; left at the end: {c.get('channels_left')} channels, "
                f"{c.get('queues_left')} queues, {c.get('events_left')} events"
            )
        else:
            cleanup = "nothing to clean"
        rows.append(
            [
                LABELS[impl],
                f"{r['peak_mb']:.1f}",
                f"{r['growth_mb_per_hour']:+.2f}",
                f"{r.get('growth_second_half_mb_per_hour', float('nan')):+.2f}",
                f"{c.get('published', 0):,} / {c.get('subscriptions', 0):,}",
                cleanup,
            ]
        )
    header = [
        f"{result['duration_s']:.0f} s soak",
        "peak RSS (MB)",
        "growth (MB/hour)",
        "growth, second half (MB/hour)",
        "events published / subscriptions",
        "cleanup",
    ]
    return table(header, rows)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for impl, r in result["impls"].items():
        ts = [t for t, _ in r["rss"]]
        ms = [m for _, m in r["rss"]]
        label = LABELS[impl]
        ax.plot(ts, ms, label=f"{label} ({r['growth_mb_per_hour']:+.1f} MB/h)")
    ax.axvline(result["warmup_s"], color="grey", linestyle=":", label="end of warm-up")
    ax.axhline(TARGET_PEAK, color="red", linestyle="--", linewidth=0.8, label="peak target")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("Memory soak: 1,000 sessions, 2,000 events/s, churn, 5 % never read")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, help="seconds (default 60)")
    parser.add_argument("--quick", action="store_true", help="60 s")
    parser.add_argument("--full", action="store_true", help="10 minutes")
    parser.add_argument("--smoke", action="store_true", help="5 s at a tenth of the load")
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    duration = args.duration or (600.0 if args.full else 60.0)
    if args.smoke:
        duration, args.scale, args.no_progress = args.duration or 5.0, 0.1, True
    if args.child:
        child(args.child, duration, args.scale)
        return
    result = run(duration, args.scale, not args.no_progress)
    stamp(result, "benchmark_sse_memory.py")
    # A run longer than --full (the hour) is kept next to the 10-minute one,
    # whose figures the targets use; run.py reports both.
    name = "memory_soak-long" if duration > 600 else "memory_soak"
    save_results(name, result, markdown(result), smoke=args.smoke, json_path=args.json)
    if not args.smoke:
        plot(result, RESULTS / f"perf-{name.replace('_', '-')}.png")


if __name__ == "__main__":
    main()
