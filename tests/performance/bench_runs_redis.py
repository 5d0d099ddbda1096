"""Runs on Redis: tokens/s across two broadcasters vs a hand-written XADD/XREAD baseline,
and Redis memory per retained run.

    PYTHONPATH=src python tests/performance/bench_runs_redis.py [--tokens N] [--readers N]
        [--rounds N] [--runs N] [--smoke]

Starts its own redis-server. The run's producer is broadcaster A, the readers
follow it on broadcaster B (same Redis, separate connections; one OS process, so
the figures include both sides' CPU). The baseline XADDs on one client and
XREAD BLOCKs on N others. Rounds alternate; medians are printed.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.redis_server import start_private_server

from sse_broadcaster import BroadcasterConfig, EventBroadcaster
from sse_broadcaster.redis import RedisBackend

TOKEN = "x" * 16


async def run_round(url: str, tokens: int, readers: int) -> float:
    prefix = f"b{uuid.uuid4().hex[:8]}"
    config = BroadcasterConfig(max_run_events=tokens + 10)
    async with (
        EventBroadcaster(config, backend=RedisBackend(url, prefix=prefix)) as a,
        EventBroadcaster(config, backend=RedisBackend(url, prefix=prefix)) as b,
    ):
        gate = anyio.Event()

        async def gen() -> AsyncIterator[str]:
            await gate.wait()
            for _ in range(tokens):
                yield TOKEN

        await a.start_run("s", gen())
        done = 0

        async def reader() -> None:
            nonlocal done
            async with b.subscribe("s", until_end=True) as sub:
                async for _ in sub:
                    pass
            done += 1

        async with anyio.create_task_group() as tg:
            for _ in range(readers):
                tg.start_soon(reader)
            await anyio.sleep(0.2)
            start = time.perf_counter()
            gate.set()
        return tokens / (time.perf_counter() - start)


async def baseline_round(url: str, tokens: int, readers: int) -> float:
    key = f"b{uuid.uuid4().hex[:8]}"
    producer = aioredis.Redis.from_url(url)
    clients = [aioredis.Redis.from_url(url) for _ in range(readers)]

    async def reader(client: aioredis.Redis) -> None:
        last, got = "0-0", 0
        while got < tokens:
            reply = await client.xread({key: last}, block=1000, count=1000)
            for _, entries in reply:
                got += len(entries)
                last = entries[-1][0]

    async with anyio.create_task_group() as tg:
        for client in clients:
            tg.start_soon(reader, client)
        start = time.perf_counter()
        for _ in range(tokens):
            await producer.xadd(key, {"d": TOKEN})
    elapsed = time.perf_counter() - start
    await producer.delete(key)
    for client in [producer, *clients]:
        await client.aclose()
    return tokens / elapsed


async def finish_runs(broadcaster: EventBroadcaster, runs: int, tokens: int) -> None:
    for r in range(runs):

        async def gen() -> AsyncIterator[str]:
            for _ in range(tokens):
                yield TOKEN

        await broadcaster.start_run(f"s{r}", gen())
    with anyio.fail_after(600):
        for r in range(runs):
            while (info := await broadcaster.run_info(f"s{r}")) is None or not info.ended:
                await anyio.sleep(0.05)


async def memory_per_run_redis(url: str, runs: int, tokens: int) -> float:
    """MEMORY USAGE of each retained finished run's stream and hash (bytes, mean)."""
    prefix = f"m{uuid.uuid4().hex[:8]}"
    config = BroadcasterConfig(max_runs=runs + 1, max_run_events=tokens + 10)
    async with EventBroadcaster(config, backend=RedisBackend(url, prefix=prefix)) as a:
        await finish_runs(a, runs, tokens)
        raw = aioredis.Redis.from_url(url)
        total = 0
        for r in range(runs):
            for key in (f"{prefix}:s:s{r}", f"{prefix}:r:s{r}"):
                total += int(await raw.memory_usage(key, samples=0) or 0)
        await raw.aclose()
    return total / runs


async def memory_per_run_process(runs: int, tokens: int) -> float:
    """tracemalloc growth per retained finished run on the memory backend (bytes)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    config = BroadcasterConfig(max_runs=runs + 1, max_run_events=tokens + 10)
    async with EventBroadcaster(config) as broadcaster:
        await finish_runs(broadcaster, runs, tokens)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return held / runs


async def main(args: argparse.Namespace) -> None:
    server = start_private_server()
    try:
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(await run_round(server.url, args.tokens, args.readers))
            theirs.append(await baseline_round(server.url, args.tokens, args.readers))
        o, t = statistics.median(ours), statistics.median(theirs)
        print(f"runs_redis tokens={args.tokens} readers={args.readers} rounds={args.rounds}")
        print(f"  run across 2 broadcasters: {o:,.0f} tokens/s (median)")
        print(f"  XADD + XREAD BLOCK baseline: {t:,.0f} tokens/s (median)")
        print(f"  ratio: {o / t:.2f}")
        for where, per_run in (
            (
                "Redis (MEMORY USAGE)",
                await memory_per_run_redis(server.url, args.runs, args.tokens),
            ),
            ("in process (tracemalloc)", await memory_per_run_process(args.runs, args.tokens)),
        ):
            print(
                f"  {where}: {per_run / 1024:,.0f} KiB per retained run of {args.tokens} "
                f"tokens; x1000 runs: {per_run * 1000 / 2**20:,.0f} MiB"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--readers", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.readers, args.rounds, args.runs = 50, 2, 1, 2
    anyio.run(main, args, backend="asyncio")
