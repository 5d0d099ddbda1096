"""EventSourceResponse on Starlette / FastAPI (uvicorn) and aiohttp: real servers, real sockets."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from sse_broadcaster import BroadcasterConfig, Event, EventBroadcaster
from sse_broadcaster.asgi import EventSourceResponse as ASGIEventSourceResponse
from sse_broadcaster.starlette import EventSourceResponse, lifespan, open_streams

from .support.servers import (
    established,
    free_port,
    open_raw,
    open_silent,
    run_aiohttp,
    run_uvicorn,
    wait_for,
)
from .test_adapter_shutdown import ROOT, stop_process, wait_until_serving

pytestmark = pytest.mark.anyio

FRAMEWORKS = ("starlette", "aiohttp")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn and aiohttp run on asyncio only


@asynccontextmanager
async def serve(
    framework: str, make_source: Callable[[], Any], **options: Any
) -> AsyncIterator[str]:
    """A one-route app (``GET /stream``) returning ``EventSourceResponse(make_source(), ...)``."""
    if framework == "starlette":
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.routing import Route

        async def endpoint(request: Request) -> EventSourceResponse:
            return EventSourceResponse(make_source(), **options)

        async with run_uvicorn(Starlette(routes=[Route("/stream", endpoint)])) as running:
            yield running.base_url
        return
    from aiohttp import web

    from sse_broadcaster.aiohttp import EventSourceResponse as AiohttpResponse

    if "status_code" in options:
        options["status"] = options.pop("status_code")

    async def handler(request: web.Request) -> web.StreamResponse:
        return AiohttpResponse(make_source(), **options)

    app = web.Application()
    app.router.add_get("/stream", handler)
    async with run_aiohttp(app) as running:
        yield running.base_url


def socket_bytes(base_url: str, client: socket.socket) -> int:
    """Bytes queued in the client's receive buffer and the server's send buffer (Linux)."""
    import psutil

    queued = bytearray(4)
    fcntl.ioctl(client, termios.FIONREAD, queued)
    total = int.from_bytes(queued, sys.byteorder)
    port = int(base_url.rsplit(":", 1)[1])
    peer = client.getsockname()
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.raddr == peer:
            with socket.socket(fileno=os.dup(conn.fd)) as server_side:
                fcntl.ioctl(server_side, termios.TIOCOUTQ, queued)
            total += int.from_bytes(queued, sys.byteorder)
    return total


class Probe:
    """What a test generator did: items pulled, and whether its ``finally`` ran."""

    def __init__(self) -> None:
        self.pulled = 0
        self.closed = False


# -- what the body holds -----------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_streams_events_dicts_and_strings(framework: str) -> None:
    async def items() -> AsyncIterator[Any]:
        yield "hello"
        yield {"event": "token", "data": "a\nb", "id": "1"}
        yield {"comment": "note"}
        yield {"retry": 250}
        yield Event(id="7", session_id="s", data="e", event="done")

    options = {
        "retry": 1000,
        "status_code": 201,
        "headers": {"X-Trace": "abc", "Cache-Control": "no-store"},
    }
    async with serve(framework, items, **options) as url, open_raw(url, "/stream") as raw:
        assert raw.status == 201
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["x-trace"] == "abc"
        assert raw.headers["cache-control"] == "no-store"  # replaces the default
        assert raw.headers["x-accel-buffering"] == "no"
        body = await raw.read_body()
    assert body == (
        b"retry: 1000\n\n"
        b"data: hello\n\n"
        b"id: 1\nevent: token\ndata: a\ndata: b\n\n"
        b": note\n\n"
        b"retry: 250\n\n"
        b"id: 7\nevent: done\ndata: e\n\n"
    )


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_streams_a_subscription_with_its_replay_and_gap(framework: str) -> None:
    async with EventBroadcaster(BroadcasterConfig(retry_ms=700)) as broadcaster:
        first = await broadcaster.publish("room", "one")

        def source() -> Any:
            return broadcaster.subscribe("room", last_event_id=first.id)

        async with serve(framework, source) as url, open_raw(url, "/stream") as raw:
            assert raw.status == 200
            assert await raw.read_chunk() == b"retry: 700\n\n"
            await wait_for(lambda: broadcaster.subscriber_count("room") == 1)
            second = await broadcaster.publish("room", "two")
            assert await raw.read_chunk() == second.encode()
            await broadcaster.close_session("room")
            assert await raw.read_body() == b""
        await wait_for(lambda: open_streams(broadcaster) == 0)

        def unknown() -> Any:
            return broadcaster.subscribe("room", last_event_id="nope")

        async with serve(framework, unknown) as url, open_raw(url, "/stream") as raw:
            prelude = await raw.read_chunk()
            assert b"event: gap\n" in prelude
            assert b'"lastEventId":"nope"' in prelude
            assert b'"invalid"' not in prelude

        def hostile() -> Any:  # a header read by the app itself, passed on as is
            return broadcaster.subscribe("room", last_event_id="x" * 5000 + "\x01")

        async with serve(framework, hostile) as url, open_raw(url, "/stream") as raw:
            prelude = await raw.read_chunk()
            assert b'"invalid":true' in prelude
            assert len(prelude) < 1000  # echoed capped


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_subscription_at_its_limit_is_told_to_come_back_later(framework: str) -> None:
    config = BroadcasterConfig(max_subscribers_per_session=1)
    async with EventBroadcaster(config) as broadcaster:
        async with broadcaster.subscribe("room"):

            def source() -> Any:
                return broadcaster.subscribe("room")

            async with serve(framework, source) as url, open_raw(url, "/stream") as raw:
                assert raw.status == 200
                assert int(raw.headers["retry-after"]) >= 1
                body = await raw.read_body()
        assert body.startswith(b"retry: ")
        assert b"\n\n: " in body  # the reason, as a comment
        assert broadcaster.subscriber_count("room") == 0


# -- a request's own generator -------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_generator_exception_ends_the_stream_after_the_last_event(
    framework: str, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe()

    async def failing() -> AsyncIterator[str]:
        try:
            yield "one"
            yield "two"
            raise RuntimeError("model went away")
        finally:
            probe.closed = True

    with caplog.at_level(logging.ERROR, logger="sse_broadcaster"):
        async with serve(framework, failing) as url, open_raw(url, "/stream") as raw:
            assert await raw.read_body() == b"data: one\n\ndata: two\n\n"
    assert probe.closed
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].exc_info is not None
    assert "model went away" in str(errors[0].exc_info[1])


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(
    ("item", "message"),
    [
        pytest.param({"id": "a\nb", "data": "x"}, "id must not contain CR, LF or NUL", id="id-LF"),
        pytest.param({"event": "a\rb", "data": "x"}, "event must not contain", id="event-CR"),
        pytest.param({"id": "a\0b"}, "id must not contain CR, LF or NUL", id="id-NUL"),
        pytest.param({"comment": "a\nb"}, "comment must not contain", id="comment-LF"),
        pytest.param({"payload": "x"}, "takes the keys", id="unknown-key"),
        pytest.param(b"bytes", "takes Event, dict or str items, got bytes", id="bytes"),
    ],
)
async def test_an_item_that_cannot_be_written_ends_the_stream_cleanly(
    framework: str, item: object, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def items() -> AsyncIterator[object]:
        yield "before"
        yield item
        yield "never"

    with caplog.at_level(logging.ERROR, logger="sse_broadcaster"):
        async with serve(framework, items) as url, open_raw(url, "/stream") as raw:
            assert await raw.read_body() == b"data: before\n\n"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert message in str(errors[0].exc_info[1] if errors[0].exc_info else "")


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_client_leaving_closes_the_generator(framework: str) -> None:
    probe = Probe()

    async def forever() -> AsyncIterator[str]:
        try:
            yield "first"
            await anyio.sleep_forever()
            yield "never"
        finally:
            probe.closed = True

    async with serve(framework, forever, ping=0.2) as url:
        async with open_raw(url, "/stream") as raw:
            assert await raw.read_chunk() == b"data: first\n\n"
        await wait_for(lambda: probe.closed, what="the generator's finally")
        await wait_for(lambda: established(url) == 0, what="the server's socket closed")


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_pings_go_on_while_the_generator_is_slow(framework: str) -> None:
    async def slow() -> AsyncIterator[str]:
        yield "start"
        await anyio.sleep(60)
        yield "late"

    async with (
        serve(framework, slow, ping=0.2, ping_comment="still here") as url,
        open_raw(url, "/stream") as raw,
    ):
        assert await raw.read_chunk() == b"data: start\n\n"
        for _ in range(3):
            assert await raw.read_chunk() == b": still here\n\n"


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_slow_client_holds_the_generator_back(framework: str) -> None:
    probe = Probe()
    chunk = "x" * 262_144  # 256 kB per event

    async def endless() -> AsyncIterator[str]:
        try:
            while True:
                probe.pulled += 1
                yield chunk
        finally:
            probe.closed = True

    async with serve(framework, endless, send_timeout=60) as url:
        sock = await open_silent(url, "/stream", receive_buffer=65_536)
        try:
            # Wait until the writes back up: the count stops growing.
            last = -1
            deadline = time.monotonic() + 20
            while probe.pulled != last and time.monotonic() < deadline:
                last = probe.pulled
                await anyio.sleep(0.5)
            stalled_at = probe.pulled
            await anyio.sleep(1.0)
            assert probe.pulled == stalled_at, "the generator ran on while nothing was written"
            in_sockets = socket_bytes(url, sock)
            held = stalled_at - in_sockets / len(chunk)
            print(
                f"\n{framework}: the generator stalled after {stalled_at} items of 256 kB; "
                f"{in_sockets} bytes in the two sockets' buffers; {held:.2f} items beyond them"
            )
            # Beyond what the sockets hold: the server's write buffer (the item
            # being written and the tail of the one before: 2.92 items in all
            # measured on uvicorn, 1.92 on aiohttp) and the one item pulled
            # ahead; a generator run ahead would be hundreds of items beyond.
            assert held < 4, (stalled_at, in_sockets)
        finally:
            sock.close()
        await wait_for(lambda: probe.closed, limit=10, what="the generator closed")


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_client_that_stops_reading_is_dropped_after_send_timeout(framework: str) -> None:
    probe = Probe()

    async def endless() -> AsyncIterator[str]:
        try:
            while True:
                yield "y" * 65_536
        finally:
            probe.closed = True

    async with serve(framework, endless, send_timeout=0.5) as url:
        sock = await open_silent(url, "/stream")
        try:
            await wait_for(lambda: probe.closed, limit=15, what="the generator closed")
            await wait_for(lambda: established(url) == 0, limit=5, what="the connection aborted")
        finally:
            sock.close()


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_no_task_left_after_streams_end(framework: str) -> None:
    async def short() -> AsyncIterator[str]:
        yield "one"

    async with serve(framework, short) as url:
        await anyio.sleep(0.2)
        baseline = len(asyncio.all_tasks())
        for _ in range(20):
            async with open_raw(url, "/stream") as raw:
                assert await raw.read_body() == b"data: one\n\n"

        async def leaving() -> None:
            async with open_raw(url, "/stream") as raw:
                await raw.read_chunk()

        for _ in range(5):
            await leaving()
        await wait_for(lambda: len(asyncio.all_tasks()) <= baseline, what="tasks to end")


async def start_server(server: str, app: str, log: Path) -> tuple[anyio.abc.Process, str]:
    """``uvicorn <app>`` or aiohttp's ``web.run_app``, with this tree's package on the path."""
    port = free_port()
    if server == "uvicorn":
        uvicorn = Path(sys.executable).parent / "uvicorn"
        command = [str(uvicorn), app, "--host", "127.0.0.1", "--port", str(port)]
    else:
        command = [sys.executable, "-m", app, str(port)]
    with log.open("wb") as log_file:
        process = await anyio.open_process(
            command,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"},
        )
    return process, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("server", "app"),
    [
        ("uvicorn", "tests.apps.generator_app:app"),
        ("aiohttp", "tests.apps.aiohttp_generator_app"),
    ],
)
async def test_sigterm_ends_a_generator_stream_at_once(
    tmp_path: Path, server: str, app: str
) -> None:
    log = tmp_path / "server.log"
    process, base_url = await start_server(server, app, log)
    try:
        await wait_until_serving(base_url)
        async with open_raw(base_url, "/ticks") as raw:
            assert (await raw.read_chunk()).startswith(b"data: tick 0")
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            raw.timeout = 5
            await raw.read_body()  # ends with the terminating chunk
            with anyio.fail_after(10):
                await process.wait()
            took = time.monotonic() - start
    finally:
        await stop_process(process)
    stderr = log.read_text()
    assert took < 2.0, stderr
    assert "generator closed" in stderr


# -- FastAPI path operations ------------------------------------------------------------------


async def test_fastapi_path_operation_with_depends_and_typed_parameters() -> None:
    from fastapi import Depends, FastAPI, Header, HTTPException

    broadcaster = EventBroadcaster(BroadcasterConfig(retry_ms=500))
    app = FastAPI(lifespan=lifespan(broadcaster))
    opened: list[int] = []

    def user(authorization: str | None = Header(default=None)) -> str:
        if authorization is None:
            raise HTTPException(401, "log in")
        if authorization != "Bearer good":
            raise HTTPException(403, "not yours")
        return "ann"

    @app.get("/rooms/{room_id}/events", response_class=EventSourceResponse)
    async def room_events(room_id: int, who: str = Depends(user)) -> EventSourceResponse:
        opened.append(room_id)
        return EventSourceResponse(broadcaster.subscribe(f"room-{room_id}"), ping=30)

    @app.get("/count/{n}", response_class=EventSourceResponse)
    async def count(n: int) -> EventSourceResponse:
        async def numbers() -> AsyncIterator[dict[str, str]]:
            for i in range(n):
                yield {"id": str(i), "data": str(i)}

        return EventSourceResponse(numbers(), headers={"X-Count": str(n)})

    schema = app.openapi()
    responses = schema["paths"]["/rooms/{room_id}/events"]["get"]["responses"]
    assert "text/event-stream" in responses["200"]["content"]

    async with run_uvicorn(app) as running, httpx.AsyncClient(timeout=5) as client:
        url = running.base_url
        assert (await client.get(f"{url}/rooms/1/events")).status_code == 401
        bad = {"Authorization": "Bearer bad"}
        assert (await client.get(f"{url}/rooms/1/events", headers=bad)).status_code == 403
        good = {"Authorization": "Bearer good"}
        assert (await client.get(f"{url}/rooms/abc/events", headers=good)).status_code == 422
        assert opened == []
        assert open_streams(broadcaster) == 0
        async with open_raw(url, "/rooms/5/events", good) as raw:
            assert raw.status == 200
            assert await raw.read_chunk() == b"retry: 500\n\n"
            await wait_for(lambda: broadcaster.subscriber_count("room-5") == 1)
            event = await broadcaster.publish("room-5", "hi")
            assert await raw.read_chunk() == event.encode()
        assert opened == [5]
        response = await client.get(f"{url}/count/3")
        assert response.headers["x-count"] == "3"
        assert response.text == "id: 0\ndata: 0\n\nid: 1\ndata: 1\n\nid: 2\ndata: 2\n\n"
        await wait_for(lambda: broadcaster.subscriber_count("room-5") == 0)


# -- the ASGI core, on asyncio and trio ------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_asgi_core_runs_on_both_loops_and_ends_on_disconnect(anyio_backend: str) -> None:
    probe = Probe()
    sent: list[MutableMapping[str, Any]] = []
    gone = anyio.Event()

    async def ticks() -> AsyncIterator[str]:
        try:
            for i in range(3):
                yield f"t{i}"
            await anyio.sleep_forever()
        finally:
            probe.closed = True

    async def receive() -> MutableMapping[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)
        if message.get("body", b"").endswith(b"data: t2\n\n"):
            gone.set()

    scope = {"type": "http", "method": "GET", "headers": []}
    with anyio.fail_after(5):
        await ASGIEventSourceResponse(ticks(), retry=10)(scope, receive, send)
    assert probe.closed
    assert sent[0]["status"] == 200
    bodies = [m["body"] for m in sent[1:]]
    # Items the generator made while a write was in flight join the next write.
    assert bodies[0] == b"retry: 10\n\n"
    assert b"".join(bodies[1:-1]) == b"data: t0\n\ndata: t1\n\ndata: t2\n\n"
    assert bodies[-1] == b""


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        pytest.param({"ping": 0}, ValueError, "ping must be a finite number > 0, got 0", id="ping"),
        pytest.param({"send_timeout": float("nan")}, ValueError, "send_timeout", id="timeout"),
        pytest.param({"retry": -1}, ValueError, "retry must be >= 0, got -1", id="retry"),
        pytest.param(
            {"ping_comment": "a\nb"}, ValueError, "comment must not contain", id="ping-LF"
        ),
        pytest.param({"headers": {"X": "a\r\nSet-Cookie: x"}}, ValueError, "header 'X'", id="CRLF"),
        pytest.param({"status_code": 101}, ValueError, "status must be in 200..599", id="status"),
        pytest.param({"flush_window": -1}, ValueError, "flush_window", id="flush"),
    ],
)
def test_bad_options_are_named(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    async def nothing() -> AsyncIterator[str]:
        yield ""

    with pytest.raises(error, match=message.replace("(", r"\(")):
        ASGIEventSourceResponse(nothing(), **options)


def test_a_source_that_is_no_stream_is_named() -> None:
    with pytest.raises(TypeError, match="a Subscription or an async iterable of events, got list"):
        ASGIEventSourceResponse(["a", "b"])  # type: ignore[arg-type]


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_head_answers_the_head_and_never_starts_the_source(framework: str) -> None:
    probe = Probe()

    async def items() -> AsyncIterator[str]:
        probe.pulled += 1
        yield "never sent"

    async with serve(framework, items) as url, httpx.AsyncClient(timeout=5) as client:
        response = await client.head(url + "/stream")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert probe.pulled == 0


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_per_response_options_override_the_broadcasters_for_a_subscription(
    framework: str,
) -> None:
    # A queue large enough that only the response's send timeout can drop the flood.
    config = BroadcasterConfig(
        keepalive_interval=60, send_timeout=60, retry_ms=3000, max_queue_bytes=100_000_000
    )
    async with EventBroadcaster(config) as broadcaster:

        def quiet() -> Any:
            return broadcaster.subscribe("quiet")

        async with (
            serve(framework, quiet, ping=0.2, ping_comment="hb", retry=50) as url,
            open_raw(url, "/stream") as raw,
        ):
            assert await raw.read_chunk() == b"retry: 50\n\n"
            assert await raw.read_chunk() == b": hb\n\n"
            assert await raw.read_chunk() == b": hb\n\n"

        def flood() -> Any:
            return broadcaster.subscribe("flood")

        async with serve(framework, flood, send_timeout=0.5) as url:
            sock = await open_silent(url, "/stream")
            try:
                await wait_for(lambda: broadcaster.subscriber_count("flood") == 1)
                for _ in range(200):  # far more than the sockets hold
                    await broadcaster.publish("flood", "z" * 60_000)
                    await anyio.sleep(0.01)
                    if broadcaster.subscriber_count("flood") == 0:
                        break
                await wait_for(lambda: broadcaster.subscriber_count("flood") == 0, limit=10)
                await wait_for(lambda: established(url) == 0, what="the connection aborted")
            finally:
                sock.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_asgi_core_streams_a_subscription_on_both_loops(anyio_backend: str) -> None:
    sent: list[MutableMapping[str, Any]] = []
    gone = anyio.Event()

    async def receive() -> MutableMapping[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "headers": []}
    async with EventBroadcaster(BroadcasterConfig(retry_ms=20)) as broadcaster:
        response = ASGIEventSourceResponse(broadcaster.subscribe("room"), ping=30)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(response, scope, receive, send)
                await wait_for(lambda: broadcaster.subscriber_count("room") == 1)
                event = await broadcaster.publish("room", "hi")
                await wait_for(lambda: any(m.get("body") == event.encode() for m in sent))
                gone.set()
        assert broadcaster.subscriber_count("room") == 0
    assert [m.get("body") for m in sent[1:]] == [b"retry: 20\n\n", event.encode(), b""]


async def test_a_generator_runs_a_bounded_way_ahead_and_its_items_join_one_write() -> None:
    from sse_broadcaster._sources import _AHEAD_BYTES, _AHEAD_ITEMS, IterableSource

    pulled = 0

    async def tiny() -> AsyncIterator[str]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield str(i)

    source = IterableSource(tiny())
    async with anyio.create_task_group() as tg:
        tg.start_soon(source.feed)
        await anyio.sleep(0.2)  # nobody takes anything: the generator must stop
        assert pulled == _AHEAD_ITEMS
        batch = await source.receive_batch()
        # Everything made meanwhile goes in one write, in order.
        assert [event.data for event in batch] == [str(i) for i in range(_AHEAD_ITEMS)]
        await anyio.sleep(0.2)
        assert pulled == 2 * _AHEAD_ITEMS  # room again, and again bounded
        tg.cancel_scope.cancel()
    await source.aclose()

    big = "x" * (_AHEAD_BYTES // 4)
    pulled = 0

    async def large() -> AsyncIterator[str]:
        nonlocal pulled
        while True:
            pulled += 1
            yield big

    source = IterableSource(large())
    async with anyio.create_task_group() as tg:
        tg.start_soon(source.feed)
        await anyio.sleep(0.2)
        assert pulled == 4  # the byte bound, well under the item bound
        tg.cancel_scope.cancel()
    await source.aclose()


# -- items the generator waited for: written by its own task --------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_an_item_the_generator_waited_for_is_written_by_its_own_task(
    anyio_backend: str,
) -> None:
    made_by: dict[str, object] = {}
    sent: list[tuple[bytes, object]] = []
    done = anyio.Event()

    async def paced() -> AsyncIterator[str]:
        for name in ("a", "b", "c"):  # a burst: no wait between them
            made_by[name] = anyio.get_current_task().id
            yield name
        for name in ("p1", "p2", "p3"):  # each waited for (a timer): written through
            await anyio.sleep(0.02)
            made_by[name] = anyio.get_current_task().id
            yield name

    async def receive() -> MutableMapping[str, Any]:
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message.get("body") is not None:
            sent.append((message["body"], anyio.get_current_task().id))
        if not message.get("more_body", True):
            done.set()

    scope = {"type": "http", "method": "GET", "headers": []}
    with anyio.fail_after(5):
        await ASGIEventSourceResponse(paced(), retry=10)(scope, receive, send)
    body = b"".join(data for data, _ in sent)
    assert body == b"retry: 10\n\n" + b"".join(f"data: {n}\n\n".encode() for n in made_by)
    # The paced items were sent by the task that made them, one write each,
    # not handed to the stream's pump (one task switch later).
    for name in ("p1", "p2", "p3"):
        [(data, task)] = [(d, t) for d, t in sent if f"data: {name}\n".encode() in d]
        assert data == f"data: {name}\n\n".encode()
        assert task == made_by[name]
    # The burst went through the pump: not written by the generator's task.
    burst = [t for d, t in sent if b"data: a\n" in d]
    assert burst != [made_by["a"]]


async def test_a_keepalive_never_interleaves_with_a_write_through_in_flight() -> None:
    in_flight = most = 0
    sent: list[bytes] = []
    done = anyio.Event()

    async def one_late_item() -> AsyncIterator[str]:
        await anyio.sleep(0.05)
        yield "slow to write"
        await anyio.sleep(0.5)

    async def receive() -> MutableMapping[str, Any]:
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            if message.get("body", b"").startswith(b"data: slow"):
                await anyio.sleep(0.4)  # many keep-alive intervals
            if message.get("body") is not None:
                sent.append(message["body"])
            if not message.get("more_body", True):
                done.set()
        finally:
            in_flight -= 1

    scope = {"type": "http", "method": "GET", "headers": []}
    with anyio.fail_after(5):
        await ASGIEventSourceResponse(one_late_item(), ping=0.05, retry=None)(scope, receive, send)
    assert most == 1, "two writes of one stream were in flight at once"
    assert sent[0] == b"data: slow to write\n\n" or sent[1] == b"data: slow to write\n\n"
    assert b": ping\n\n" in sent  # pings before and after the slow write, none during it
    assert sent[-1] == b""


async def test_a_failed_write_through_ends_the_stream_without_blaming_the_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed = anyio.Event()

    async def paced() -> AsyncIterator[str]:
        try:
            while True:
                await anyio.sleep(0.01)
                yield "tick"
        finally:
            closed.set()

    async def receive() -> MutableMapping[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: MutableMapping[str, Any]) -> None:
        if message.get("body", b"").startswith(b"data:"):
            raise ConnectionResetError("the peer reset the connection")

    scope = {"type": "http", "method": "GET", "headers": []}
    with caplog.at_level(logging.DEBUG, logger="sse_broadcaster"), anyio.fail_after(5):
        await ASGIEventSourceResponse(paced(), retry=None)(scope, receive, send)
    assert closed.is_set()  # the generator was closed
    assert not [r for r in caplog.records if "source failed" in r.getMessage()]
