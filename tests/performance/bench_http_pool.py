"""Benchmark: the pooled httpx client of sse_broadcaster.http, against per-call
connections (the reference document's "before"), aiohttp's TCPConnector, and
the ceilings under ours: plain httpx and raw httpcore.

    .venv/bin/python tests/performance/bench_http_pool.py [--runs 7]
    .venv/bin/python tests/performance/bench_http_pool.py --profile ours [--calls 100]

A server in a child process (aiohttp, so it never competes with the client's
event loop) answers every request after 50 ms, on 127.0.0.1 to 127.0.0.5 (five
hosts, one port). Workloads: 10 calls to one host, and 100 calls spread over
the 5 hosts, all issued at once (asyncio.gather). Clients:

- before: the calls in sequence, a new connection each (httpx.Client per call,
  like the reference's blocking ``requests.get``);
- ours: create_http_client() with the default HTTPClientConfig;
- aiohttp: ClientSession on TCPConnector(limit=100, limit_per_host=20,
  ttl_dns_cache=300, keepalive_timeout=30), the reference settings;
- ours, transport only: the same pool, its transport called without
  httpx.AsyncClient (no request building, cookies, redirects, hooks): what
  httpx's client layer costs on top of ours;
- httpx: a plain httpx.AsyncClient, default transport, with
  Limits(max_connections=100, max_keepalive_connections=100,
  keepalive_expiry=30) (no per-host limit, no DNS cache);
- httpcore: a raw httpcore.AsyncConnectionPool with the same limits, without
  httpx on top.

Each parallel client is measured cold (a new client per run: the time includes
opening the connections) and warm (one client, warmed by one untimed run, then
reused). Within a workload the clients run in rotation, one run each per round,
the starting client shifting every round; times are medians of ``--runs``
rounds, and the ratio against aiohttp is the median of the per-round ratios
(run-to-run noise on this box is 15-25 %). "client CPU" is the client process's
CPU time per run: unlike wall time it does not include the 50 ms the server
waits, and it shows where a client spends more than another.

``--profile CLIENT`` prints, instead, where that client's CPU goes on the warm
workload (``--calls 100`` or ``10``): the workload runs ``--rounds`` times in a
child process under py-spy (``--nonblocking``, so the child is not paused),
and each sample goes to the layer of the topmost frame that belongs to one:
httpx's client layer (``AsyncClient.send``: request building, cookies, auth,
redirects, hooks, ``Response``), our transports, pool and streams, httpcore's
connection with h11, the event loop and sockets (asyncio, selectors). anyio
and the rest of the standard library count for their caller. The CPU per call
is the child's process time over the sampled rounds (sampling adds ~10 %).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

import aiohttp
import httpcore
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


# --------------------------------------------------------------------------- clients

# A client: an async context manager giving ``run(urls)``, which issues the
# calls at once and returns when every response has been read and closed.
Run = Callable[[list[str]], Awaitable[None]]


@asynccontextmanager
async def ours() -> AsyncIterator[Run]:
    async with create_http_client(HTTPClientConfig()) as client:
        yield _httpx_run(client)


@asynccontextmanager
async def ours_transport() -> AsyncIterator[Run]:
    """Our transport without httpx.AsyncClient on top: what the client layer costs."""
    config = HTTPClientConfig()
    async with create_http_client(config) as client:
        transport = client._transport  # the pooled transport create_http_client built
        extensions = {"timeout": config.timeout.as_dict()}

        async def get(url: str) -> None:
            request = httpx.Request("GET", url, extensions=extensions)
            response = await transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
            assert response.status_code == 200

        async def run(urls: list[str]) -> None:
            await asyncio.gather(*(get(url) for url in urls))

        yield run


@asynccontextmanager
async def plain_httpx() -> AsyncIterator[Run]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=30)
    async with httpx.AsyncClient(limits=limits) as client:
        yield _httpx_run(client)


def _httpx_run(client: httpx.AsyncClient) -> Run:
    async def get(url: str) -> None:
        (await client.get(url)).raise_for_status()

    async def run(urls: list[str]) -> None:
        await asyncio.gather(*(get(url) for url in urls))

    return run


@asynccontextmanager
async def raw_httpcore() -> AsyncIterator[Run]:
    async with httpcore.AsyncConnectionPool(
        max_connections=100, max_keepalive_connections=100, keepalive_expiry=30
    ) as pool:

        async def get(url: str) -> None:
            response = await pool.request("GET", url)
            assert response.status == 200

        async def run(urls: list[str]) -> None:
            await asyncio.gather(*(get(url) for url in urls))

        yield run


@asynccontextmanager
async def aiohttp_connector() -> AsyncIterator[Run]:
    connector = aiohttp.TCPConnector(
        limit=100, limit_per_host=20, ttl_dns_cache=300, keepalive_timeout=30
    )
    async with aiohttp.ClientSession(connector=connector) as session:

        async def get(url: str) -> None:
            async with session.get(url) as response:
                response.raise_for_status()
                await response.read()

        async def run(urls: list[str]) -> None:
            await asyncio.gather(*(get(url) for url in urls))

        yield run


CLIENTS: dict[str, Callable[[], AbstractAsyncContextManager[Run]]] = {
    "ours": ours,
    "aiohttp": aiohttp_connector,
    "ours, transport only": ours_transport,
    "httpx": plain_httpx,
    "httpcore": raw_httpcore,
}


def before(urls: list[str]) -> float:
    """Sequential calls, a new client (so a new connection) per call."""
    start = time.perf_counter()
    for url in urls:
        with httpx.Client() as client:
            client.get(url).raise_for_status()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- measurement

Sample = tuple[float, float]  # (wall seconds, client CPU seconds)


async def timed(run: Run, urls: list[str]) -> Sample:
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    await run(urls)
    return time.perf_counter() - wall, time.process_time() - cpu


async def cold_run(name: str, urls: list[str]) -> Sample:
    async with CLIENTS[name]() as run:
        return await timed(run, urls)


async def measure(urls: list[str], runs: int) -> dict[tuple[str, str], list[Sample]]:
    """Every client cold and warm, in rotation: {(client, "cold"|"warm"): samples}."""
    names = list(CLIENTS)
    samples: dict[tuple[str, str], list[Sample]] = {
        (name, mode): [] for name in names for mode in ("cold", "warm")
    }
    for i in range(runs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            samples[name, "cold"].append(await cold_run(name, urls))
    async with AsyncExitStack() as stack:
        warm = {name: await stack.enter_async_context(CLIENTS[name]()) for name in names}
        for run in warm.values():
            await run(urls)  # open the connections
        for i in range(runs):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                samples[name, "warm"].append(await timed(warm[name], urls))
    return samples


# --------------------------------------------------------------------------- profile

# Where a sample's time belongs: the frame nearest the top of the stack whose
# file matches one of these (first match per frame, in this order). Frames of
# anyio and of the rest of the standard library (cookiejar, enum, typing...)
# belong to the caller that called them.
CATEGORIES = [
    ("ours: transports, pool, streams", ("(sse_broadcaster/",)),
    ("httpx client layer", ("(httpx/",)),
    ("httpcore connection + h11", ("(httpcore/", "(h11/")),
    ("aiohttp", ("(aiohttp/", "(multidict/", "(yarl/")),
    ("event loop + socket", ("(asyncio/", "(selectors.py", "(socket.py", "(uvloop/")),
    ("benchmark driver (gather, timing)", ("(bench_http_pool.py",)),
]


def categorize(stack: list[str]) -> str:
    """The category of a py-spy stack (frames ``function (file:line)``, root first)."""
    for frame in reversed(stack):
        for name, markers in CATEGORIES:
            if any(marker in frame for marker in markers):
                return name
    return "other (gc, interpreter)"


async def profile_child(client: str, workload: str, rounds: int, port: int) -> None:
    """The warm ``workload`` on ``client``, ``rounds`` times: what py-spy samples."""
    urls = workloads(port)[workload]
    async with CLIENTS[client]() as run:
        for _ in range(3):
            await run(urls)  # open the connections, warm the caches
        cpu = time.process_time()
        for _ in range(rounds):
            await run(urls)
        cpu = time.process_time() - cpu
    print(f"cpu {cpu / (rounds * len(urls))}", flush=True)


def profile(client: str, workload: str, rounds: int, rate: int) -> None:
    """Run the warm ``workload`` under py-spy and print the CPU per call by category."""
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    process, port = start_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "raw.txt")
            command = [py_spy, "record", "--nonblocking", "--format", "raw", "-r", str(rate)]
            command += ["-o", out, "--", sys.executable, __file__, "--profile-child"]
            command += [client, workload, str(rounds), str(port)]
            child = subprocess.run(command, capture_output=True, text=True, check=True)
            line = next(x for x in child.stdout.splitlines() if x.startswith("cpu "))
            cpu_per_call = float(line.split()[1])
            totals: Counter[str] = Counter()
            with open(out) as raw:
                for entry in raw:
                    stack, _, count = entry.rstrip("\n").rpartition(" ")
                    frames = stack.split(";")
                    if "(<frozen importlib" in stack:
                        continue  # imports: start-up
                    # A task's stack starts at its coroutine, so do not look for the loop.
                    totals[categorize(frames)] += int(count)
    finally:
        process.terminate()
        process.wait(10)
    samples = sum(totals.values())
    print(
        f"\n{client}, {workload}, warm, {rounds} rounds under py-spy at {rate} Hz: "
        f"{samples} samples, client CPU {cpu_per_call * 1e6:.0f} us per call\n"
    )
    print("| where | share | CPU us per call |")
    print("|---|---:|---:|")
    for name, count in totals.most_common():
        share = count / samples
        print(f"| {name} | {share:.0%} | {share * cpu_per_call * 1e6:.0f} |")


# --------------------------------------------------------------------------- report


def workloads(port: int) -> dict[str, list[str]]:
    return {
        "10 calls, 1 host": [f"http://127.0.0.1:{port}/"] * 10,
        "100 calls, 5 hosts": [f"http://{HOSTS[i % 5]}:{port}/" for i in range(100)],
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="rounds per scenario (median)")
    parser.add_argument(
        "--profile",
        metavar="CLIENT",
        choices=list(CLIENTS),
        help="instead of the table: the client CPU per call of CLIENT on the warm workload, "
        "split by layer from a py-spy profile",
    )
    parser.add_argument(
        "--calls",
        type=int,
        choices=(10, 100),
        default=100,
        help="with --profile: the 10-call or the 100-call workload (default 100)",
    )
    parser.add_argument("--rounds", type=int, default=200, help="with --profile: rounds sampled")
    parser.add_argument("--rate", type=int, default=1000, help="with --profile: samples/s")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.profile_child:
        client, workload, rounds, port = args.profile_child
        asyncio.run(profile_child(client, workload, int(rounds), int(port)))
        return
    if args.profile:
        workload = "10 calls, 1 host" if args.calls == 10 else "100 calls, 5 hosts"
        profile(args.profile, workload, args.rounds, args.rate)
        return

    process, port = start_server()
    try:
        loads = workloads(port)
        before_times = {
            name: [before(urls) for _ in range(args.runs)] for name, urls in loads.items()
        }
        results = {name: asyncio.run(measure(urls, args.runs)) for name, urls in loads.items()}
    finally:
        process.terminate()
        process.wait(10)

    med = statistics.median
    print(
        f"\nhttpx {httpx.__version__}, httpcore {httpcore.__version__}, aiohttp "
        f"{aiohttp.__version__}, Python {sys.version.split()[0]}; server latency "
        f"{LATENCY * 1000:.0f} ms; medians of {args.runs} rounds\n"
    )
    print(
        "| workload | client | pool | wall ms | client CPU ms | aiohttp / this (per round) "
        "| before / this |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for workload, samples in results.items():
        seq = med(before_times[workload])
        print(f"| {workload} | before: sequential, new connection each | - | {ms(seq)} | | | |")
        for mode in ("cold", "warm"):
            reference = [wall for wall, _ in samples["aiohttp", mode]]
            for name in CLIENTS:
                walls = [wall for wall, _ in samples[name, mode]]
                cpus = [cpu for _, cpu in samples[name, mode]]
                ratio = med([r / w for r, w in zip(reference, walls, strict=True)])
                print(
                    f"| {workload} | {name} | {mode} | {ms(med(walls))} | {ms(med(cpus))} "
                    f"| {ratio:.2f}x | {seq / med(walls):.1f}x |"
                )
    print(
        "\naiohttp / this: aiohttp's wall time over this client's, per round; above 1.00x "
        "this client is faster.\nbefore / this is bounded by about the number of calls "
        f"(each call waits the {LATENCY * 1000:.0f} ms latency), plus the connection setup "
        "that 'before' pays per call."
    )


if __name__ == "__main__":
    main()
