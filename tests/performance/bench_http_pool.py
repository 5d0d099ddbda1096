"""Benchmark: the pooled httpx client of sse_broadcaster.http, against per-call
connections (the reference document's "before") and aiohttp's TCPConnector.

    .venv/bin/python tests/performance/bench_http_pool.py [--runs 5]

A server in a child process (aiohttp, so it never competes with the client's
event loop) answers every request after 50 ms, on 127.0.0.1 to 127.0.0.5 (five
hosts, one port). Scenarios:

- before-10: 10 sequential calls, a new connection each (httpx.Client per call,
  like the reference's blocking ``requests.get``);
- after-10: the same 10 calls in parallel on the pooled AsyncClient (warm pool);
- before-mixed / after-mixed: 100 calls spread over the 5 hosts;
- aiohttp-*: the parallel scenarios on aiohttp's ClientSession with
  TCPConnector(limit=100, limit_per_host=20, ttl_dns_cache=300,
  keepalive_timeout=30), the reference settings.

Ours and aiohttp run alternately, in pairs, and the ratio quoted is the median
of the per-pair ratios (run-to-run noise on this box is 15-25 %). Times are
medians of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx

from sse_broadcaster.http import HTTPClientConfig, create_http_client

LATENCY = 0.05
HOSTS = [f"127.0.0.{i}" for i in range(1, 6)]


# --------------------------------------------------------------------------- server


def serve(port: int) -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(LATENCY)
        return web.Response(text="ok")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for host in HOSTS:
            await web.TCPSite(runner, host, port, backlog=1024).start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def start_server() -> tuple[subprocess.Popen[str], int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        process.kill()
        raise RuntimeError("the benchmark server did not start")
    return process, port


# --------------------------------------------------------------------------- scenarios


def before(urls: list[str]) -> float:
    """Sequential calls, a new client (so a new connection) per call."""
    start = time.perf_counter()
    for url in urls:
        with httpx.Client() as client:
            client.get(url).raise_for_status()
    return time.perf_counter() - start


async def ours(client: httpx.AsyncClient, urls: list[str]) -> float:
    async def get(url: str) -> None:
        (await client.get(url)).raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*(get(url) for url in urls))
    return time.perf_counter() - start


async def theirs(session: aiohttp.ClientSession, urls: list[str]) -> float:
    async def get(url: str) -> None:
        async with session.get(url) as response:
            response.raise_for_status()
            await response.read()

    start = time.perf_counter()
    await asyncio.gather(*(get(url) for url in urls))
    return time.perf_counter() - start


def aiohttp_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=100, limit_per_host=20, ttl_dns_cache=300, keepalive_timeout=30
    )
    return aiohttp.ClientSession(connector=connector)


async def paired(
    workloads: dict[str, list[str]], runs: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """Ours and aiohttp alternately on each workload: times, and per-pair ratios."""
    times_ours: dict[str, list[float]] = {name: [] for name in workloads}
    times_theirs: dict[str, list[float]] = {name: [] for name in workloads}
    cold: dict[str, list[float]] = {name: [] for name in workloads}
    for name, urls in workloads.items():
        for _ in range(runs):
            # Cold: a new pool, so the time includes opening the connections.
            async with create_http_client(HTTPClientConfig()) as client:
                cold[name].append(await ours(client, urls))
        async with create_http_client(HTTPClientConfig()) as client, aiohttp_session() as session:
            await ours(client, urls)  # warm both pools
            await theirs(session, urls)
            pair: list[tuple[Callable[[], Awaitable[float]], list[float]]] = [
                (functools.partial(ours, client, urls), times_ours[name]),
                (functools.partial(theirs, session, urls), times_theirs[name]),
            ]
            for i in range(runs):
                for run, sink in pair if i % 2 == 0 else reversed(pair):
                    sink.append(await run())
    return times_ours, times_theirs, cold


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per scenario (median)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    process, port = start_server()
    try:
        workloads = {
            "10 calls, 1 host": [f"http://127.0.0.1:{port}/"] * 10,
            "100 calls, 5 hosts": [f"http://{HOSTS[i % 5]}:{port}/" for i in range(100)],
        }
        before_times = {
            name: [before(urls) for _ in range(args.runs)] for name, urls in workloads.items()
        }
        times_ours, times_theirs, cold = asyncio.run(paired(workloads, args.runs))
    finally:
        process.terminate()
        process.wait(10)

    med = statistics.median
    print(
        f"\nhttpx {httpx.__version__}, aiohttp {aiohttp.__version__}, Python "
        f"{sys.version.split()[0]}; server latency {LATENCY * 1000:.0f} ms; "
        f"medians of {args.runs} runs\n"
    )
    print(
        "| workload | before: sequential, new connection each | after: pooled, parallel "
        "(cold pool) | after: pooled, parallel (warm) | aiohttp TCPConnector (warm) "
        "| before / after (warm) | aiohttp / ours (pairs) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in workloads:
        pair_ratios = [t / o for o, t in zip(times_ours[name], times_theirs[name], strict=True)]
        print(
            f"| {name} | {ms(med(before_times[name]))} | {ms(med(cold[name]))} "
            f"| {ms(med(times_ours[name]))} | {ms(med(times_theirs[name]))} "
            f"| {med(before_times[name]) / med(times_ours[name]):.1f}x "
            f"| {med(pair_ratios):.2f}x |"
        )
    print(
        "\nbefore / after is bounded by about the number of calls (each call waits the "
        f"{LATENCY * 1000:.0f} ms latency), plus the connection setup that 'before' pays "
        "per call.\naiohttp / ours is aiohttp's time over ours: above 1.00x, ours is faster."
    )


if __name__ == "__main__":
    main()
