"""The plain-ASGI EventSourceResponse in other frameworks: Litestar, Quart, a bare ASGI app.

Real apps on real uvicorn; the same patterns as docs/frameworks.md.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from sse_broadcaster import BroadcasterConfig, EventBroadcaster
from sse_broadcaster.asgi import EventSourceResponse, lifespan, open_streams

from .support.servers import open_raw, run_uvicorn, wait_for

pytestmark = pytest.mark.anyio

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn runs on asyncio only


class Closed:
    count = 0


async def countdown(n: int, closed: type[Closed] = Closed) -> AsyncIterator[dict[str, str]]:
    try:
        for i in range(n, 0, -1):
            yield {"event": "tick", "data": str(i)}
            await anyio.lowlevel.checkpoint()
    finally:
        closed.count += 1


async def check_both_streams(base_url: str, broadcaster: EventBroadcaster) -> None:
    """``/events/room`` streams the room's subscription, ``/countdown/3`` a generator."""
    async with open_raw(base_url, "/events/room") as raw:
        assert raw.status == 200
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert await raw.read_chunk() == b"retry: 400\n\n"
        await wait_for(lambda: broadcaster.subscriber_count("room") == 1)
        event = await broadcaster.publish("room", "hello")
        assert await raw.read_chunk() == event.encode()
    await wait_for(lambda: broadcaster.subscriber_count("room") == 0, what="the stream closed")
    before = Closed.count
    async with open_raw(base_url, "/countdown/3") as raw:
        body = await raw.read_body()
    assert body == b"event: tick\ndata: 3\n\nevent: tick\ndata: 2\n\nevent: tick\ndata: 1\n\n"
    assert Closed.count == before + 1
    assert open_streams(broadcaster) == 0


async def test_litestar_handlers_return_the_response() -> None:
    from litestar import Litestar, get
    from litestar.params import FromPath

    broadcaster = EventBroadcaster(BroadcasterConfig(retry_ms=400))

    @get("/events/{room:str}")
    async def events(room: FromPath[str]) -> EventSourceResponse:
        return EventSourceResponse(broadcaster.subscribe(room))

    @get("/countdown/{n:int}")
    async def count(n: FromPath[int]) -> EventSourceResponse:
        return EventSourceResponse(countdown(n))

    app = Litestar([events, count], lifespan=[lifespan(broadcaster)])
    async with run_uvicorn(app) as running:
        assert broadcaster.running
        await check_both_streams(running.base_url, broadcaster)
        async with httpx.AsyncClient() as client:  # Litestar's typed paths still apply
            assert (await client.get(running.base_url + "/countdown/x")).status_code == 404
    assert not broadcaster.running


async def test_quart_app_with_the_streams_in_front() -> None:
    from quart import Quart

    broadcaster = EventBroadcaster(BroadcasterConfig(retry_ms=400))
    app = Quart(__name__)

    @app.get("/hello")
    async def hello() -> str:
        return "quart"

    @app.while_serving
    async def run_broadcaster() -> AsyncIterator[None]:
        async with lifespan(broadcaster)(app):
            yield

    quart_asgi = app.asgi_app

    async def with_streams(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/events/"):
            room = path.removeprefix("/events/")
            await EventSourceResponse(broadcaster.subscribe(room))(scope, receive, send)
        elif scope["type"] == "http" and path.startswith("/countdown/"):
            n = int(path.removeprefix("/countdown/"))
            await EventSourceResponse(countdown(n))(scope, receive, send)
        else:
            await quart_asgi(scope, receive, send)  # type: ignore[arg-type]

    app.asgi_app = with_streams  # type: ignore[assignment, method-assign]
    async with run_uvicorn(app) as running:
        assert broadcaster.running
        async with httpx.AsyncClient() as client:
            assert (await client.get(running.base_url + "/hello")).text == "quart"
        await check_both_streams(running.base_url, broadcaster)
    assert not broadcaster.running


async def test_a_bare_asgi_app_with_its_own_lifespan() -> None:
    """The shape docs/frameworks.md gives for Django: the streams in front of another app."""
    broadcaster = EventBroadcaster(BroadcasterConfig(retry_ms=400))
    run_broadcaster = lifespan(broadcaster)

    async def other_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"not here"})

    async def application(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            async with run_broadcaster(None):
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if scope["type"] == "http" and path.startswith("/events/"):
            room = path.removeprefix("/events/")
            await EventSourceResponse(broadcaster.subscribe(room))(scope, receive, send)
        elif scope["type"] == "http" and path.startswith("/countdown/"):
            n = int(path.removeprefix("/countdown/"))
            await EventSourceResponse(countdown(n))(scope, receive, send)
        else:
            await other_app(scope, receive, send)

    async with run_uvicorn(application) as running:
        assert broadcaster.running
        await check_both_streams(running.base_url, broadcaster)
    assert not broadcaster.running


def test_the_asgi_module_imports_no_framework() -> None:
    code = (
        "import sys, sse_broadcaster.asgi; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'starlette', 'fastapi', 'aiohttp', 'litestar', 'quart', 'django'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
