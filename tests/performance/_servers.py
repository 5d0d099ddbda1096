"""The benchmark servers, one per stack, all with the same routes.

    python tests/performance/_servers.py KIND --port N [--http h11|httptools]
        [--loop asyncio|uvloop] [--flush SECONDS|default]

KIND is one of:

- ``ours``: our Starlette adapter (``sse_endpoint``) on uvicorn;
- ``sse-starlette``: sse-starlette's ``EventSourceResponse`` over
  encode/broadcaster's ``Broadcast("memory://")`` on uvicorn;
- ``bare``: a bare ASGI app on uvicorn that appends pre-encoded bytes to a
  list per connection and writes what accumulated with one ``send`` (the
  ceiling: no broadcaster, no framework);
- ``ours-aiohttp``: our aiohttp adapter (``sse_handler``) on aiohttp;
- ``aiohttp-sse``: aiohttp-sse's ``sse_response`` over encode/broadcaster on aiohttp.

Routes (the same for every kind):

- ``GET /events/{room}``: the SSE stream;
- ``POST /bench/publish?rooms=a,b&n=N&size=S&rate=R&every=K``: publish N
  events into every room from inside the server, as fast as possible
  (yielding to the loop after every K events, 100 by default) or paced at R
  events/s; answers when done. Each event's
  data is ``@@<time.time()>;`` padded with ``x`` to S bytes: the clients count
  the ``@@`` markers and read the publish time;
- ``POST /publish/{room}``: publish the request body (same marker), one event;
- ``GET /bench/subscribers``: streams subscribed right now;
- ``GET /bench/rss``: the server's resident set size in bytes.

``--flush`` is our adapters' ``flush_window``; ``default`` leaves it out, so
the adapter runs with the window it ships with. Access logs are off for every
kind. Servers stop on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any

KINDS = ["ours", "sse-starlette", "bare", "ours-aiohttp", "aiohttp-sse"]
UVICORN_KINDS = {"ours", "sse-starlette", "bare"}


def payload(size: int) -> str:
    head = f"@@{time.time():.6f};"
    return head + "x" * max(0, size - len(head))


async def publish_loop(
    publish: Any, rooms: list[str], n: int, size: int, rate: float, every: int = 100
) -> int:
    """Publish n events into each room: paced at `rate` events/s when rate > 0,
    else as fast as possible, yielding to the loop after every `every` events."""
    count = 0
    start = time.perf_counter()
    for i in range(n):
        if rate > 0:
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        for room in rooms:
            await publish(room, payload(size))
            count += 1
        if rate <= 0 and i % every == every - 1:
            await asyncio.sleep(0)
    return count


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _query(qs: dict[str, Any]) -> tuple[list[str], int, int, float, int]:
    return (
        str(qs.get("rooms", "bench")).split(","),
        int(qs.get("n", 1)),
        int(qs.get("size", 100)),
        float(qs.get("rate", 0)),
        max(1, int(qs.get("every", 100))),
    )


# -- uvicorn (Starlette) stacks ------------------------------------------------------


def starlette_app(kind: str, flush: float | None) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    state = {"subscribers": 0}
    if kind == "ours":
        from sse_broadcaster import BroadcasterConfig, EventBroadcaster
        from sse_broadcaster.starlette import lifespan, sse_endpoint

        broadcaster = EventBroadcaster(BroadcasterConfig(max_subscribers_per_session=None))

        async def publish(room: str, data: str) -> None:
            await broadcaster.publish(room, data)

        def subscribers() -> int:
            return int(broadcaster.stats()["totalSubscribers"])

        stream: Any = (
            sse_endpoint(broadcaster)
            if flush is None
            else sse_endpoint(broadcaster, flush_window=flush)
        )
        life: Any = lifespan(broadcaster)
    elif kind == "sse-starlette":
        from contextlib import asynccontextmanager

        from broadcaster import Broadcast
        from sse_starlette import EventSourceResponse

        broadcast = Broadcast("memory://")

        async def publish(room: str, data: str) -> None:
            await broadcast.publish(room, data)

        def subscribers() -> int:
            return state["subscribers"]

        async def events(request: Request) -> Any:
            room = request.path_params["session_id"]

            async def generator() -> Any:
                async with broadcast.subscribe(room) as subscriber:
                    state["subscribers"] += 1
                    try:
                        async for event in subscriber:
                            yield {"data": event.message}
                    finally:
                        state["subscribers"] -= 1

            return EventSourceResponse(generator(), ping=15)

        stream = events

        @asynccontextmanager
        async def life(app: Any) -> Any:
            async with broadcast:
                yield

    elif kind == "bare":
        from contextlib import asynccontextmanager

        rooms_conns: dict[str, set[Any]] = {}

        class Conn:
            __slots__ = ("buf", "waiter")

            def __init__(self) -> None:
                self.buf: list[bytes] = []
                self.waiter: asyncio.Future[None] | None = None

        async def publish(room: str, data: str) -> None:
            encoded = f"data: {data}\n\n".encode()
            for conn in rooms_conns.get(room, ()):
                conn.buf.append(encoded)
                waiter = conn.waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

        def subscribers() -> int:
            return sum(len(c) for c in rooms_conns.values())

        async def bare_stream(scope: Any, receive: Any, send: Any) -> None:
            room = scope["path_params"]["session_id"]
            conn = Conn()
            loop = asyncio.get_running_loop()
            rooms_conns.setdefault(room, set()).add(conn)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )

            async def listen() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass

            listener = asyncio.ensure_future(listen())
            try:
                while not listener.done():
                    if not conn.buf:
                        conn.waiter = loop.create_future()
                        await asyncio.wait(
                            [conn.waiter, listener], return_when=asyncio.FIRST_COMPLETED
                        )
                        conn.waiter = None
                        continue
                    data = b"".join(conn.buf)
                    conn.buf.clear()
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            except OSError:
                pass
            finally:
                listener.cancel()
                rooms_conns[room].discard(conn)

        class BareEndpoint:  # not a function: Starlette's Route calls it as an ASGI app
            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                await bare_stream(scope, receive, send)

        stream = BareEndpoint()

        @asynccontextmanager
        async def life(app: Any) -> Any:
            yield

    else:  # pragma: no cover
        raise SystemExit(f"unknown kind {kind!r}")

    async def bench_publish(request: Request) -> JSONResponse:
        rooms, n, size, rate, every = _query(dict(request.query_params))
        count = await publish_loop(publish, rooms, n, size, rate, every)
        return JSONResponse({"published": count})

    async def publish_one(request: Request) -> JSONResponse:
        body = (await request.body()).decode()
        await publish(request.path_params["room"], payload(0) + body)
        return JSONResponse({"published": 1})

    async def bench_subscribers(request: Request) -> JSONResponse:
        return JSONResponse({"subscribers": subscribers()})

    async def bench_rss(request: Request) -> JSONResponse:
        return JSONResponse({"rss": rss()})

    return Starlette(
        routes=[
            Route("/events/{session_id}", stream),
            Route("/bench/publish", bench_publish, methods=["POST"]),
            Route("/publish/{room}", publish_one, methods=["POST"]),
            Route("/bench/subscribers", bench_subscribers),
            Route("/bench/rss", bench_rss),
        ],
        lifespan=life,
    )


# -- aiohttp stacks ------------------------------------------------------------------


def aiohttp_app(kind: str, flush: float | None) -> Any:
    from aiohttp import web

    app = web.Application()
    state = {"subscribers": 0}
    if kind == "ours-aiohttp":
        from sse_broadcaster import BroadcasterConfig, EventBroadcaster
        from sse_broadcaster.aiohttp import setup, sse_handler

        broadcaster = EventBroadcaster(BroadcasterConfig(max_subscribers_per_session=None))

        async def publish(room: str, data: str) -> None:
            await broadcaster.publish(room, data)

        def subscribers() -> int:
            return int(broadcaster.stats()["totalSubscribers"])

        handler = (
            sse_handler(broadcaster)
            if flush is None
            else sse_handler(broadcaster, flush_window=flush)
        )
        app.router.add_get("/events/{session_id}", handler)
        setup(app, broadcaster)
    elif kind == "aiohttp-sse":
        from aiohttp_sse import sse_response
        from broadcaster import Broadcast

        broadcast = Broadcast("memory://")

        async def publish(room: str, data: str) -> None:
            await broadcast.publish(room, data)

        def subscribers() -> int:
            return state["subscribers"]

        async def events(request: web.Request) -> web.StreamResponse:
            room = request.match_info["session_id"]
            async with (
                sse_response(request) as response,
                broadcast.subscribe(room) as subscriber,
            ):
                state["subscribers"] += 1
                try:
                    async for event in subscriber:
                        await response.send(event.message)
                finally:
                    state["subscribers"] -= 1
            return response

        async def ctx(app: web.Application) -> Any:
            async with broadcast:
                yield

        app.router.add_get("/events/{session_id}", events)
        app.cleanup_ctx.append(ctx)
    else:  # pragma: no cover
        raise SystemExit(f"unknown kind {kind!r}")

    async def bench_publish(request: web.Request) -> web.Response:
        rooms, n, size, rate, every = _query(dict(request.query))
        count = await publish_loop(publish, rooms, n, size, rate, every)
        return web.json_response({"published": count})

    async def publish_one(request: web.Request) -> web.Response:
        body = (await request.read()).decode()
        await publish(request.match_info["room"], payload(0) + body)
        return web.json_response({"published": 1})

    async def bench_subscribers(request: web.Request) -> web.Response:
        return web.json_response({"subscribers": subscribers()})

    async def bench_rss(request: web.Request) -> web.Response:
        return web.json_response({"rss": rss()})

    app.router.add_post("/bench/publish", bench_publish)
    app.router.add_post("/publish/{room}", publish_one)
    app.router.add_get("/bench/subscribers", bench_subscribers)
    app.router.add_get("/bench/rss", bench_rss)
    return app


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description="A benchmark SSE server.")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http", default="h11", choices=["h11", "httptools"])
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    parser.add_argument(
        "--flush", default="0", help="flush_window in seconds, or 'default' (ours only)"
    )
    args = parser.parse_args()
    flush = None if args.flush == "default" else float(args.flush)
    raise_nofile()
    if args.kind in UVICORN_KINDS:
        import uvicorn

        uvicorn.run(
            starlette_app(args.kind, flush),
            host="127.0.0.1",
            port=args.port,
            http=args.http,
            loop=args.loop,
            log_level="warning",
            access_log=False,
            backlog=4096,
            timeout_graceful_shutdown=2,
        )
    else:
        from aiohttp import web

        web.run_app(
            aiohttp_app(args.kind, flush),
            host="127.0.0.1",
            port=args.port,
            backlog=4096,
            print=None,
            access_log=None,
            shutdown_timeout=2,
        )
    print(json.dumps({"stopped": args.kind}), flush=True)


if __name__ == "__main__":
    main()
