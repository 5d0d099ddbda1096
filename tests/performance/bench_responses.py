"""Responses: a request's own generator, ours vs sse-starlette; one multi-session stream vs many.

    python tests/performance/bench_responses.py [--quick | --smoke] [--runs 3] [--json FILE]
        [--burst-clients 10,100,1000] [--paced-clients 10,100,200] [--multi-clients 200]

Part 1, generators. A FastAPI app per stack on uvicorn (h11, asyncio), one
path operation ``GET /events/{room}`` that returns an ``EventSourceResponse``
(``sse_broadcaster.starlette``'s or sse-starlette's, ``ping=15`` both) over
the request's own async generator. Every generator of a room waits until
``POST /bench/publish?rooms=R&n=E&rate=X`` starts them all at once, then:

- burst (``rate=0``): yields E strings ``@@<time>;xxx...`` (100 bytes) as fast
  as it can; deliveries/s = C * E / time until the last client holds all E
  (http_e2e.py's `measure_burst`, unchanged);
- paced (``rate=100``): yields one event every 10 ms, its data stamped with
  the wall time it was due (start + i / rate), so that the wake-up of the
  generator counts whichever task runs it (sse-starlette runs it in the task
  that sends, ours in a task of its own); p50 / p99 of receive time minus that
  stamp over every delivery (http_e2e.py's `measure_paced`).

In paced mode the publish request answers once every generator of the room
has finished, or 2 s after their schedule ends (a stack that falls behind is
measured on what arrived: the share received is shown); in burst mode at once.
Paced runs stop at C=200 by default: 100 events/s per generator is 20k
events/s there, within what both stacks write (C=1000 would be 100k/s).
The raw-socket clients of _common.py count the ``@@`` markers, as for every
benchmark here. Target (#12): ours >= 3x sse-starlette in burst, paced p99 no
worse.

Part 2, several sessions per client. Our broadcaster on uvicorn; N clients
each follow the same 10 sessions, either on one connection (one
``broadcaster.subscribe_many(ids)`` per request, streamed by a plain ASGI
route that writes each ``receive_batch()`` with one ``send``: multi-session
responses are not merged into ``EventSourceResponse`` in this tree) or on 10
connections of ``sse_endpoint`` (N * 10 connections). The 10 sessions get a
paced publish (``--multi-rate`` events/s each) for ``--paced-seconds``;
reported: the server's RSS added per client (over the RSS of the fresh
server), the server's CPU per client (% of one core), p99 latency and the
share received. Each layout runs on a fresh server.

Modes: ``--smoke`` (seconds, shape only), ``--quick`` (1 run, fewer clients),
default 3 runs, medians; ratios are medians of per-run ratios, the order of
the stacks alternates between runs.

The script is also the server: ``bench_responses.py KIND --port N ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
    quantile,
    save_results,
    stamp,
    table,
)

SCRIPT = Path(__file__).resolve()
# stack name -> server kind (this script's)
STACKS = {"ours": "gen-ours", "sse-starlette": "gen-sse-starlette"}
SERVER_KINDS = ["gen-ours", "gen-sse-starlette", "multi-ours"]
LAYOUTS = ("multi", "separate")
SESSIONS = 10


# -- the servers ----------------------------------------------------------------------


def stamped(when: float, size: int) -> str:
    """A paced event's data: the ``@@<time>;`` the clients read, padded to `size`."""
    head = f"@@{when:.6f};"
    return head + "x" * max(0, size - len(head))


def generator_app(kind: str) -> Any:
    """FastAPI: each request streams its own generator, started by /bench/publish."""
    from _servers import _query, payload, rss
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    if kind == "gen-ours":
        from sse_broadcaster.starlette import EventSourceResponse
    else:
        from sse_starlette import EventSourceResponse  # type: ignore[no-redef]

    class Room:
        def __init__(self) -> None:
            self.start: asyncio.Future[tuple[int, float, int]] = (
                asyncio.get_running_loop().create_future()
            )
            self.live = 0
            self.idle = asyncio.Event()

    rooms: dict[str, Room] = {}
    app = FastAPI()

    @app.get("/events/{room}", response_class=EventSourceResponse)
    async def events(room: str) -> EventSourceResponse:
        async def generate() -> Any:
            state = rooms.setdefault(room, Room())
            state.live += 1
            try:
                n, rate, size = await asyncio.shield(state.start)
                if rate > 0:
                    begin, wall = time.perf_counter(), time.time()
                    for i in range(n):
                        delay = begin + i / rate - time.perf_counter()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        # Stamped with the time the event was due: the wake-up of
                        # the generator counts, whichever task runs it.
                        yield stamped(wall + i / rate, size)
                else:
                    data = payload(size)
                    for _ in range(n):
                        yield data
            finally:
                state.live -= 1
                if not state.live:
                    state.idle.set()

        return EventSourceResponse(generate(), ping=15)

    async def publish(request: Request) -> JSONResponse:
        names, n, size, rate, _ = _query(dict(request.query_params))
        started = 0
        for name in names:
            state = rooms.get(name)
            if state is None:
                continue
            started += state.live
            state.start.set_result((n, rate, size))
        # Paced: answer when the generators are done, or their schedule plus 2 s
        # has passed (a stack that falls behind must not hold the measurement;
        # the clients count what arrived). Burst: at once, the clients time it.
        deadline = time.monotonic() + n / rate + 2 if rate > 0 else 0.0
        for name in names:
            state = rooms.pop(name, None)
            if state is not None and state.live and rate > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.idle.wait(), max(0.0, deadline - time.monotonic()))
        return JSONResponse({"published": started * n})

    async def subscribers(request: Request) -> JSONResponse:
        live = sum(s.live for s in rooms.values() if not s.start.done())
        return JSONResponse({"subscribers": live})

    async def bench_rss(request: Request) -> JSONResponse:
        return JSONResponse({"rss": rss()})

    app.add_route("/bench/publish", publish, methods=["POST"])
    app.add_route("/bench/subscribers", subscribers)
    app.add_route("/bench/rss", bench_rss)
    return app


def multi_app(flush: float | None) -> Any:
    """Our broadcaster: ``/multi/{a,b,...}`` (one subscribe_many) and ``/events/{id}``."""
    import anyio
    from _servers import _query, publish_loop, rss
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from sse_broadcaster import BroadcasterConfig, EventBroadcaster
    from sse_broadcaster.starlette import lifespan, sse_endpoint

    broadcaster = EventBroadcaster(BroadcasterConfig(max_subscribers_per_session=None))
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

    class MultiEndpoint:  # not a function: Starlette's Route calls it as an ASGI app
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            ids = scope["path_params"]["ids"].split(",")
            async with broadcaster.subscribe_many(ids) as multi:
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                async with anyio.create_task_group() as task_group:

                    async def listen() -> None:
                        while (await receive())["type"] != "http.disconnect":
                            pass
                        task_group.cancel_scope.cancel()

                    task_group.start_soon(listen)
                    try:
                        while True:
                            batch = await multi.receive_batch()
                            body = b"".join(event.encode() for event in batch)
                            await send(
                                {"type": "http.response.body", "body": body, "more_body": True}
                            )
                    except (anyio.EndOfStream, anyio.ClosedResourceError, OSError):
                        pass
                    task_group.cancel_scope.cancel()

    async def publish(request: Request) -> JSONResponse:
        rooms, n, size, rate, every = _query(dict(request.query_params))
        count = await publish_loop(broadcaster.publish, rooms, n, size, rate, every)
        return JSONResponse({"published": count})

    async def subscribers(request: Request) -> JSONResponse:
        return JSONResponse({"subscribers": broadcaster.stats()["totalSubscribers"]})

    async def bench_rss(request: Request) -> JSONResponse:
        return JSONResponse({"rss": rss()})

    single = (
        sse_endpoint(broadcaster)
        if flush is None
        else sse_endpoint(broadcaster, flush_window=flush)
    )
    return Starlette(
        routes=[
            Route("/events/{session_id}", single),
            Route("/multi/{ids}", MultiEndpoint()),
            Route("/bench/publish", publish, methods=["POST"]),
            Route("/bench/subscribers", subscribers),
            Route("/bench/rss", bench_rss),
        ],
        lifespan=lifespan(broadcaster),
    )


def serve() -> None:
    parser = argparse.ArgumentParser(description="A response benchmark server.")
    parser.add_argument("kind", choices=SERVER_KINDS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http", default="h11", choices=["h11", "httptools"])
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    parser.add_argument("--flush", default="default")
    args = parser.parse_args()
    import uvicorn
    from _servers import raise_nofile

    raise_nofile()
    flush = None if args.flush == "default" else float(args.flush)
    app = multi_app(flush) if args.kind == "multi-ours" else generator_app(args.kind)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        http=args.http,
        loop=args.loop,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_graceful_shutdown=2,
    )


# -- part 1: generators -------------------------------------------------------------


def run_generators(args: argparse.Namespace, bar: Any) -> dict[str, Any]:
    from http_e2e import events_for, measure_burst, measure_paced, summarise, wait_idle

    names = [n for n in STACKS if available(n, "fastapi")]
    burst_cs = [int(c) for c in args.burst_clients.split(",")]
    paced_cs = [int(c) for c in args.paced_clients.split(",")]
    samples: dict[str, Any] = {n: {"burst": {}, "burst100": {}, "paced": {}} for n in names}
    for r in range(args.runs):
        for name in names if r % 2 == 0 else names[::-1]:
            with Server(STACKS[name], script=SCRIPT, flush=None) as server:
                for c in burst_cs:
                    bar.set_postfix_str(f"{name} burst C={c}")
                    res = measure_burst(server, c, events_for(c, args.scale), f"{r}")
                    samples[name]["burst"].setdefault(str(c), []).append(res)
                    wait_idle(server)
                    bar.update()
                for c in paced_cs:
                    bar.set_postfix_str(f"{name} paced C={c}")
                    res = measure_paced(server, c, args.paced_seconds, 100.0, f"{r}")
                    samples[name]["paced"].setdefault(str(c), []).append(res)
                    wait_idle(server)
                    bar.update()
    result = summarise(samples, names, burst_cs, paced_cs, names)
    result["missing"] = [n for n in STACKS if n not in names]
    result["p99"] = _p99(result["paced"], paced_cs)
    return result


def _p99(paced: dict[str, Any], paced_cs: list[int]) -> dict[str, Any]:
    """Paced p99, ours vs sse-starlette: medians and the per-run values."""
    out: dict[str, Any] = {}
    if "ours" not in paced or "sse-starlette" not in paced:
        return out
    for c in map(str, paced_cs):
        ours, peer = paced["ours"][c], paced["sse-starlette"][c]
        out[c] = {
            "ours_ms": ours["p99_ms"],
            "sse_starlette_ms": peer["p99_ms"],
            "no_worse": ours["p99_ms"] <= peer["p99_ms"],
            "runs_ours": ours["runs_p99"],
            "runs_sse_starlette": peer["runs_p99"],
        }
    return out


# -- part 2: one multi-session stream vs separate streams ------------------------------


def measure_layout(
    server: Server, layout: str, clients: int, seconds: float, rate: float, tag: str
) -> dict[str, Any]:
    ids = [f"s{tag}-{k}" for k in range(SESSIONS)]
    n = max(1, int(seconds * rate))
    if layout == "multi":
        paths, expect = [f"/multi/{','.join(ids)}"] * clients, n * SESSIONS
    else:
        paths, expect = [f"/events/{sid}" for _ in range(clients) for sid in ids], n
    procs = 2 if len(paths) <= 200 else 3
    rss0 = server.rss()
    group = Clients(server.port, paths, expect=expect, procs=procs, latency=True)
    try:
        group.wait_ready()
        server.wait_subscribers(clients * SESSIONS)
        rss1 = server.rss()
        group.go(timeout=seconds + 30)
        cpu0 = server.cpu()
        t0 = time.time()
        server.publish(ids, n, rate=rate)
        cpu1 = server.cpu()
        t1 = time.time()
        rss2 = server.rss()
        out = group.results()
    finally:
        group.kill()
    lat = out["lat"]
    cpu = (cpu1 - cpu0) / max(t1 - t0, 1e-6)
    return {
        "connections": len(paths),
        "rss_base_mb": rss0 / 2**20,
        "rss_mb": max(rss1, rss2) / 2**20,
        "rss_per_client_kb": (max(rss1, rss2) - rss0) / clients / 1024,
        "server_cpu": cpu,
        "cpu_per_client_pct": cpu * 100 / clients,
        "p99_ms": quantile(lat, 0.99) * 1000,
        "received": len(lat) / max(1, clients * n * SESSIONS),
    }


def run_multi(args: argparse.Namespace, bar: Any) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {layout: [] for layout in LAYOUTS}
    for r in range(args.runs):
        for layout in LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]:
            bar.set_postfix_str(f"{layout} N={args.multi_clients}")
            with Server("multi-ours", script=SCRIPT, flush=None) as server:
                res = measure_layout(
                    server, layout, args.multi_clients, args.paced_seconds, args.multi_rate, f"{r}"
                )
            runs[layout].append(res)
            bar.update()
    layouts = {
        layout: {key: median([s[key] for s in samples]) for key in samples[0]}
        for layout, samples in runs.items()
    }
    ratios = {
        f"{key}: separate / multi": median(
            [
                s[key] / m[key]
                for s, m in zip(runs["separate"], runs["multi"], strict=True)
                if m[key] > 0
            ]
        )
        for key in ("rss_per_client_kb", "cpu_per_client_pct")
    }
    return {
        "clients": args.multi_clients,
        "sessions": SESSIONS,
        "rate": args.multi_rate,
        "seconds": args.paced_seconds,
        "layouts": layouts,
        "ratios": ratios,
        "samples": runs,
    }


# -- report -----------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    from http_e2e import markdown as e2e_markdown

    out = ["#### A request's own generator (FastAPI, uvicorn h11)\n"]
    gen = result["generators"]
    out.append(e2e_markdown(gen))
    if gen["p99"]:
        out.append("\n**Paced p99, ours vs sse-starlette** (ms, median; per run)\n")
        rows = [
            [
                f"C={c}",
                f"{v['ours_ms']:.1f} ({'/'.join(f'{x:.1f}' for x in v['runs_ours'])})",
                f"{v['sse_starlette_ms']:.1f} "
                f"({'/'.join(f'{x:.1f}' for x in v['runs_sse_starlette'])})",
                "yes" if v["no_worse"] else "**no**",
            ]
            for c, v in gen["p99"].items()
        ]
        out.append(table(["clients", "ours", "sse-starlette", "ours no worse"], rows))
    multi = result["multi"]
    out.append(
        f"\n#### {multi['clients']} clients x {multi['sessions']} sessions, paced "
        f"{multi['rate']:g} events/s per session ({multi['seconds']:g} s)\n"
    )
    rows = []
    for layout, v in multi["layouts"].items():
        label = "one subscribe_many stream" if layout == "multi" else "10 sse_endpoint streams"
        rows.append(
            [
                f"{label} ({v['connections']:.0f} connections)",
                f"{v['rss_base_mb']:.1f} -> {v['rss_mb']:.1f}",
                f"{v['rss_per_client_kb']:.1f}",
                f"{v['server_cpu'] * 100:.0f}",
                f"{v['cpu_per_client_pct']:.3f}",
                f"{v['p99_ms']:.1f}",
                f"{v['received'] * 100:.0f} %",
            ]
        )
    header = [
        "layout",
        "server RSS (MB)",
        "RSS per client (KB)",
        "server CPU (%)",
        "CPU per client (%)",
        "p99 (ms)",
        "received",
    ]
    out.append(table(header, rows))
    out.append("\n**Ratios** (median of per-run ratios)\n")
    ratio_rows = [[k, f"{v:.2f}x" if v == v else "n/a"] for k, v in multi["ratios"].items()]
    out.append(table(["figure", "ratio"], ratio_rows))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 run, fewer clients")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for the test suite")
    parser.add_argument("--burst-clients", default="10,100,1000")
    # 100 events/s per generator: C=1000 would be 100k events/s, beyond what either
    # stack writes on a small machine (burst: about 30k/s on 2 cores).
    parser.add_argument("--paced-clients", default="10,100,200")
    parser.add_argument("--paced-seconds", type=float, default=5.0)
    parser.add_argument("--scale", type=float, default=1.0, help="scale the burst sizes")
    parser.add_argument("--multi-clients", type=int, default=200)
    parser.add_argument("--multi-rate", type=float, default=10.0, help="events/s per session")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.burst_clients, args.paced_clients = 1, "5", "5"
        args.paced_seconds, args.scale, args.multi_clients = 0.5, 0.05, 5
        args.no_progress = True
    elif args.quick:
        args.runs = min(args.runs, 1)
        args.burst_clients, args.paced_clients = "10,100", "100"
        args.paced_seconds, args.scale, args.multi_clients = 2.0, 0.3, 100
    burst_cs = len(args.burst_clients.split(","))
    paced_cs = len(args.paced_clients.split(","))
    steps = args.runs * (len(STACKS) * (burst_cs + paced_cs) + len(LAYOUTS))
    with progress(steps, "bench_responses", not args.no_progress) as bar:
        result: dict[str, Any] = {
            "generators": run_generators(args, bar),
            "multi": run_multi(args, bar),
            "runs": args.runs,
        }
    stamp(result, "bench_responses.py")
    save_results("responses", result, markdown(result), smoke=args.smoke, json_path=args.json)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in SERVER_KINDS:
        serve()
    else:
        main()
