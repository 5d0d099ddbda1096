"""Fan-out through Redis across processes: ours against encode/broadcaster.

This process publishes; two subscriber processes each hold S/2 subscribers of
one session (channel). Per case and implementation, alternately, in fresh
subscriber processes:

1. warm-up: publish until every subscriber has received an event;
2. burst: publish E events from 8 concurrent tasks (``--concurrency``) as fast
   as Redis answers; the figure is deliveries per second (E x S / time from the
   first publish to the last delivery);
3. paced: publish P events at a fixed interval and measure publish-to-receive
   latency (wall clock, same host) at 5 sampled subscribers per process.

- ``ours``: EventBroadcaster + sse_broadcaster.redis.RedisBackend with the
  default config (history on: a stream per session, 500 events, TTLs); the
  queue bounds are raised so that a burst does not disconnect subscribers;
- ``encode``: encode/broadcaster's ``Broadcast("redis://...")`` (Pub/Sub only,
  no history), the ``bench`` extra. Two races of broadcaster 0.3.1 are worked
  around in the subscriber processes (see ``subscriber_main``); its per-message
  path is untouched.

Starts a private redis-server from PATH unless REDIS_URL is set.

    python tests/performance/bench_redis_fanout.py [--runs 3] [--quick] [--concurrency 8]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

IMPLS = ["ours", "encode"]
# (subscribers, burst events, paced events, paced interval in seconds)
CASES = [(100, 3000, 200, 0.005), (1000, 500, 100, 0.01)]
QUICK_CASES = [(100, 500, 50, 0.005), (1000, 100, 30, 0.01)]
PAD = "x" * 80
SAMPLED = 5
CONCURRENCY = 8


# -- subscriber process ---------------------------------------------------------------------


async def subscriber_main(options: dict[str, Any]) -> None:
    impl, url, name = options["impl"], options["url"], options["name"]
    count, burst, paced = options["subscribers"], options["burst"], options["paced"]
    ready = 0
    ready_event = asyncio.Event()
    burst_ends: list[float] = []
    burst_counts: list[int] = []
    latencies: list[float] = []
    finished = 0
    all_done = asyncio.Event()

    # The burst events take the short path inline in each consumer loop (count,
    # compare), the same code for both implementations; the rest comes here.
    def other(index: int, state: list[int], data: str) -> bool:
        nonlocal ready, finished
        if data[0] == "w":
            if not state[0]:
                state[0] = 1
                ready += 1
                if ready == count:
                    ready_event.set()
            return False
        if index < SAMPLED:
            latencies.append(time.time() - float(data.split("|", 2)[1]))
        state[1] += 1
        if state[1] == paced:
            finished += 1
            if finished == count:
                all_done.set()
            return True
        return False

    async def report_ready() -> None:
        await ready_event.wait()
        print(json.dumps({"type": "ready"}), flush=True)

    if impl == "ours":
        from sse_broadcaster import BroadcasterConfig, EventBroadcaster
        from sse_broadcaster.redis import RedisBackend

        config = BroadcasterConfig(
            max_queue_size=burst + paced + 10_000, max_queue_bytes=64 * 1024 * 1024
        )
        async with EventBroadcaster(config, backend=RedisBackend(url, prefix=name)) as b:

            async def consume(index: int) -> None:
                state = [0, 0]
                n = 0
                async with b.subscribe("bench") as sub:
                    async for event in sub:
                        data = event.data
                        if data[0] == "b":
                            n += 1
                            if n == burst:
                                burst_ends.append(time.time())
                        elif other(index, state, data):
                            break
                burst_counts.append(n)

            tasks = [asyncio.create_task(consume(i)) for i in range(count)]
            reporter = asyncio.create_task(report_ready())
            await all_done.wait()
            await asyncio.gather(*tasks, reporter)
    else:
        from broadcaster import Broadcast

        async with Broadcast(url) as bc:

            async def consume_encode(index: int, entered: asyncio.Event) -> None:
                state = [0, 0]
                n = 0
                async with bc.subscribe(channel=name) as sub:
                    entered.set()
                    async for event in sub:  # type: ignore[union-attr]
                        data = event.message  # type: ignore[union-attr]
                        if data[0] == "b":
                            n += 1
                            if n == burst:
                                burst_ends.append(time.time())
                        elif other(index, state, data):
                            break
                burst_counts.append(n)

            # Two workarounds for races in broadcaster 0.3.1, outside its per-message
            # path: (1) subscribers entering concurrently each replace the channel's
            # queue set, so only the last one receives: enter them one at a time;
            # (2) its listener's "ready" flag is set before redis-py records the
            # subscription, so the listener sees no channel, stops and never restarts
            # (with redis-py 8 no message is delivered at all): set it again.
            tasks = []
            for i in range(count):
                entered = asyncio.Event()
                tasks.append(asyncio.create_task(consume_encode(i, entered)))
                await entered.wait()
            backend: Any = bc._backend
            while not backend._pubsub.subscribed:
                await asyncio.sleep(0.01)
            backend._ready.set()
            reporter = asyncio.create_task(report_ready())
            await all_done.wait()
            await asyncio.gather(*tasks, reporter)
    print(
        json.dumps(
            {
                "type": "result",
                "burst_end": max(burst_ends) if burst_ends else None,
                "burst_deliveries": sum(burst_counts),
                "latencies": latencies,
            }
        ),
        flush=True,
    )


# -- publisher (this process) ---------------------------------------------------------------


class Publisher:
    def __init__(self, impl: str, url: str, name: str) -> None:
        self.impl, self.url, self.name = impl, url, name
        self._stack: Any = None
        self._publish: Any = None

    async def __aenter__(self) -> Publisher:
        if self.impl == "ours":
            from sse_broadcaster import EventBroadcaster
            from sse_broadcaster.redis import RedisBackend

            self._stack = EventBroadcaster(backend=RedisBackend(self.url, prefix=self.name))
            b = await self._stack.__aenter__()

            async def publish(data: str) -> None:
                await b.publish("bench", data)

        else:
            from broadcaster import Broadcast

            self._stack = Broadcast(self.url)
            bc = await self._stack.__aenter__()

            async def publish(data: str) -> None:
                await bc.publish(channel=self.name, message=data)

        self._publish = publish
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.__aexit__(None, None, None)

    async def publish(self, data: str) -> None:
        await self._publish(data)


async def read_line(process: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout)
    if not line:
        raise RuntimeError("a subscriber process exited early")
    result: dict[str, Any] = json.loads(line)
    return result


async def run_case(
    impl: str,
    url: str,
    subscribers: int,
    burst: int,
    paced: int,
    interval: float,
    concurrency: int = CONCURRENCY,
) -> dict[str, float]:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    options = {
        "impl": impl,
        "url": url,
        "name": name,
        "subscribers": subscribers // 2,
        "burst": burst,
        "paced": paced,
    }
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--subscriber",
            json.dumps(options),
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        async with Publisher(impl, url, name) as publisher:
            waiting = [asyncio.create_task(read_line(p, 60)) for p in processes]
            while not all(t.done() for t in waiting):
                await publisher.publish(f"w|{time.time()}|")
                await asyncio.sleep(0.02)
            for t in waiting:
                t.result()
            await asyncio.sleep(0.2)  # let the warm-up events drain

            start = time.time()

            async def burst_task(k: int) -> None:
                for i in range(k, burst, concurrency):
                    await publisher.publish(f"b|{time.time()}|{i}|{PAD}")

            await asyncio.gather(*(burst_task(k) for k in range(concurrency)))
            published = time.time()
            await asyncio.sleep(0.5)
            for i in range(paced):
                await publisher.publish(f"p|{time.time()}|{i}|{PAD}")
                await asyncio.sleep(interval)
            results = [await read_line(p, 120) for p in processes]
    finally:
        for p in processes:
            if p.returncode is None:
                try:
                    await asyncio.wait_for(p.wait(), 10)
                except asyncio.TimeoutError:
                    p.kill()
                    await p.wait()
    deliveries = sum(r["burst_deliveries"] for r in results)
    expected = burst * (subscribers // 2) * 2
    if deliveries != expected:
        raise RuntimeError(f"{impl}: {deliveries} burst deliveries, expected {expected}")
    end = max(r["burst_end"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies"])
    return {
        "events_per_s": deliveries / (end - start),
        "publish_per_s": burst / (published - start),
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


# -- redis-server ------------------------------------------------------------------------------


def start_redis() -> tuple[str, subprocess.Popen[bytes] | None, Any]:
    url = os.environ.get("REDIS_URL")
    if url:
        return url, None, None
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not on PATH; set REDIS_URL")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.TemporaryDirectory(prefix="sse-bench-redis-")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    argv += ["no", "--dir", workdir.name, "--loglevel", "warning"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    import redis

    for _ in range(500):
        try:
            with redis.Redis(port=port) as client:
                client.ping()
                break
        except redis.ConnectionError:
            time.sleep(0.02)
    return f"redis://127.0.0.1:{port}/0", process, workdir


async def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    url, process, workdir = start_redis()
    cases = QUICK_CASES if args.quick else CASES
    raw: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for run in range(args.runs):
            for subscribers, burst, paced, interval in cases:
                order = IMPLS if run % 2 == 0 else IMPLS[::-1]
                for impl in order:
                    figures = await run_case(
                        impl, url, subscribers, burst, paced, interval, args.concurrency
                    )
                    raw.setdefault(str(subscribers), {}).setdefault(impl, []).append(figures)
                    print(
                        f"run {run + 1} S={subscribers:<5} {impl:<7} "
                        + " ".join(f"{k}={v:,.1f}" for k, v in figures.items()),
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)
            workdir.cleanup()
    summary: dict[str, Any] = {}
    for s, by_impl in raw.items():
        summary[s] = {
            impl: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            for impl, runs in by_impl.items()
        }
        ratios = [
            o["events_per_s"] / e["events_per_s"]
            for o, e in zip(by_impl["ours"], by_impl["encode"], strict=False)
        ]
        summary[s]["ratio_events_per_s_median"] = statistics.median(ratios)
    return {"raw": raw, "summary": summary}


def _parsers() -> str:
    """redis-py's version and whether hiredis (C reply parsing, used by both) is installed."""
    import importlib.metadata
    import importlib.util

    hiredis = "hiredis" if importlib.util.find_spec("hiredis") else "no hiredis"
    return f"redis-py {importlib.metadata.version('redis')}, {hiredis}"


def table(result: dict[str, Any], runs: int, concurrency: int) -> str:
    lines = [
        f"Redis fan-out, medians of {runs} runs, {concurrency} publishing tasks; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {_parsers()}, "
        f"redis-server on 127.0.0.1; load average at the end {os.getloadavg()[0]:.2f}",
        "",
        "| S | impl | delivered events/s | publishes/s | p50 ms | p99 ms |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for s, by_impl in result["summary"].items():
        for impl in IMPLS:
            f = by_impl[impl]
            lines.append(
                f"| {s} | {impl} | {f['events_per_s']:,.0f} | {f['publish_per_s']:,.0f} "
                f"| {f['p50_ms']:.2f} | {f['p99_ms']:.2f} |"
            )
        lines.append(
            f"| {s} | ratio ours/encode (median of paired runs) | "
            f"{by_impl['ratio_events_per_s_median']:.2f}x | | | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    parser.add_argument(
        "--concurrency", type=int, default=CONCURRENCY, help="publishing tasks in the burst"
    )
    parser.add_argument("--subscriber", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscriber:
        asyncio.run(subscriber_main(json.loads(args.subscriber)))
        return
    result = asyncio.run(orchestrate(args))
    print(table(result, args.runs, args.concurrency))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
