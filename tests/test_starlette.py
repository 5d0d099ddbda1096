"""What only the Starlette adapter does: FastAPI, trio, the ASGI surface, signals.

The behaviour it shares with the aiohttp adapter is tested against uvicorn in
tests/test_adapters.py. Here the endpoint also runs under a small ASGI driver
of our own, so that it is exercised on trio (no trio ASGI server is installed).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import signal
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import pytest
from httpx_sse import aconnect_sse
from starlette.applications import Starlette
from starlette.routing import Route

from sse_broadcaster import BroadcasterConfig, EventBroadcaster
from sse_broadcaster._shutdown import install_shutdown_hook
from sse_broadcaster._streams import StreamRegistry, registry_for
from sse_broadcaster.starlette import (
    SSEEndpoint,
    close_streams,
    lifespan,
    metrics_endpoint,
    open_streams,
    sse_endpoint,
    stats_endpoint,
)

from .support.servers import established, open_silent, run_uvicorn, wait_for

pytestmark = pytest.mark.anyio


# -- a minimal ASGI driver: runs on asyncio and trio ----------------------------------------


@dataclass
class Exchange:
    """One ASGI request in flight: what the app sent, and a way to disconnect."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    disconnect: anyio.Event = field(default_factory=anyio.Event)
    returned: anyio.Event = field(default_factory=anyio.Event)
    _arrived: anyio.Event = field(default_factory=anyio.Event)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    @property
    def start(self) -> dict[str, Any]:
        return self.messages[0]

    async def wait_for_body(self, predicate: Callable[[bytes], bool]) -> bytes:
        with anyio.fail_after(5):
            while not predicate(self.body):
                self._arrived = anyio.Event()
                await self._arrived.wait()
        return self.body


@asynccontextmanager
async def request(
    app: Any,
    path_params: dict[str, str],
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    method: str = "GET",
    query_string: bytes = b"",
) -> AsyncIterator[Exchange]:
    exchange = Exchange()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/events/x",
        "raw_path": b"/events/x",
        "query_string": query_string,
        "root_path": "",
        "headers": headers or [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "path_params": path_params,
    }
    sent_request = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await exchange.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        exchange.messages.append(message)
        exchange._arrived.set()

    async def run() -> None:
        await app(scope, receive, send)
        exchange.returned.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        yield exchange
        exchange.disconnect.set()
        with anyio.fail_after(5):
            await exchange.returned.wait()


@pytest.fixture
async def broadcaster() -> AsyncIterator[EventBroadcaster]:
    broadcaster = EventBroadcaster(BroadcasterConfig(keepalive_interval=0.3))
    async with lifespan(broadcaster)(None):
        yield broadcaster


async def test_stream_over_asgi_replays_streams_and_releases_on_disconnect(
    broadcaster: EventBroadcaster,
) -> None:
    endpoint = sse_endpoint(broadcaster)
    first = await broadcaster.publish("room", "one")
    second = await broadcaster.publish("room", "two")
    headers = [(b"last-event-id", first.id.encode())]
    async with request(endpoint, {"session_id": "room"}, headers) as exchange:
        await exchange.wait_for_body(lambda body: body.endswith(second.encode()))
        assert exchange.start["status"] == 200
        assert (b"content-type", b"text/event-stream; charset=utf-8") in exchange.start["headers"]
        assert exchange.body == b"retry: 3000\n\n" + second.encode()
        third = await broadcaster.publish("room", "three")
        await exchange.wait_for_body(lambda body: body.endswith(third.encode()))
        await exchange.wait_for_body(lambda body: body.endswith(b": ping\n\n"))
        assert broadcaster.stats()["totalSubscribers"] == 1
    # the driver disconnected: the endpoint returned and let go of the subscription
    assert broadcaster.stats()["totalSubscribers"] == 0
    assert open_streams(broadcaster) == 0


async def test_stream_over_asgi_ends_with_the_session(broadcaster: EventBroadcaster) -> None:
    async with request(sse_endpoint(broadcaster), {"session_id": "room"}) as exchange:
        await exchange.wait_for_body(bool)
        await broadcaster.close_session("room")
        with anyio.fail_after(5):
            await exchange.returned.wait()
    assert exchange.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_lifespan_end_closes_streams_and_broadcaster() -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig())
    async with lifespan(broadcaster)(None):
        assert broadcaster.running
        async with request(sse_endpoint(broadcaster), {"session_id": "room"}) as exchange:
            await exchange.wait_for_body(bool)
            close_streams(broadcaster)  # what the lifespan's exit does first
            with anyio.fail_after(5):
                await exchange.returned.wait()
            assert exchange.messages[-1]["more_body"] is False
    assert not broadcaster.running


@pytest.mark.parametrize(
    ("method", "path_params", "status"),
    [
        pytest.param("POST", {"session_id": "room"}, 405, id="post"),
        pytest.param("GET", {}, 400, id="no-session-id"),
    ],
)
async def test_asgi_errors(
    broadcaster: EventBroadcaster, method: str, path_params: dict[str, str], status: int
) -> None:
    async with request(sse_endpoint(broadcaster), path_params, method=method) as exchange:
        with anyio.fail_after(5):
            await exchange.returned.wait()
    assert exchange.start["status"] == status


async def test_rejects_non_http_scopes(broadcaster: EventBroadcaster) -> None:
    async def nothing() -> dict[str, Any]:
        raise AssertionError

    async def ignore(message: MutableMapping[str, Any]) -> None:
        raise AssertionError

    with pytest.raises(RuntimeError, match="HTTP only"):
        await sse_endpoint(broadcaster)({"type": "websocket"}, nothing, ignore)


def test_endpoint_arguments() -> None:
    broadcaster = EventBroadcaster()
    endpoint = sse_endpoint(broadcaster, path_param="room")
    assert isinstance(endpoint, SSEEndpoint)
    assert "room" in repr(endpoint)
    for bad in (-1, math.inf, math.nan):
        with pytest.raises(
            ValueError, match=f"flush_window must be a finite number >= 0, got {bad}"
        ):
            sse_endpoint(broadcaster, flush_window=bad)


async def test_a_burst_is_held_while_events_keep_coming(broadcaster: EventBroadcaster) -> None:
    endpoint = sse_endpoint(broadcaster, flush_window=30.0)
    async with request(endpoint, {"session_id": "room"}) as exchange:
        await exchange.wait_for_body(bool)
        # Right after the opening write: a burst. One event per loop iteration
        # keeps the flush held; the first quiet iteration writes them all.
        events = []
        for data in "abcdefgh":
            events.append(await broadcaster.publish("room", data))
            await anyio.lowlevel.checkpoint()
        with anyio.fail_after(5):  # held one iteration past the burst, not 30 s
            await exchange.wait_for_body(lambda body: body.endswith(events[-1].encode()))
        writes = [m["body"] for m in exchange.messages if m.get("body")]
        assert writes[-1] == b"".join(e.encode() for e in events)


async def test_a_burst_is_held_at_most_one_window(broadcaster: EventBroadcaster) -> None:
    endpoint = sse_endpoint(broadcaster, flush_window=0.05)
    async with request(endpoint, {"session_id": "room"}) as exchange:
        await exchange.wait_for_body(bool)
        first = await broadcaster.publish("room", "first")
        start = time.monotonic()
        # A burst that never ends: the flush still goes out after one window.
        while first.id not in exchange.body.decode():
            await broadcaster.publish("room", "more")
            await anyio.lowlevel.checkpoint()
            assert time.monotonic() - start < 5, "the burst was held past its window"


async def test_a_held_burst_never_overflows_a_small_queue() -> None:
    # Held until 5 events are queued (half the bound), never 30 s nor 11 events.
    broadcaster = EventBroadcaster(BroadcasterConfig(max_queue_size=10, retry_ms=None))
    endpoint = sse_endpoint(broadcaster, flush_window=30.0)
    async with lifespan(broadcaster)(None), request(endpoint, {"session_id": "room"}) as exchange:
        with anyio.fail_after(5):
            while broadcaster.stats()["totalSubscribers"] < 1:
                await anyio.sleep(0.01)
        first = await broadcaster.publish("room", "first")
        await exchange.wait_for_body(lambda body: body == first.encode())
        events = []
        for i in range(100):
            events.append(await broadcaster.publish("room", f"e{i}"))
            await anyio.lowlevel.checkpoint()
        expected = first.encode() + b"".join(e.encode() for e in events)
        with anyio.fail_after(5):
            await exchange.wait_for_body(lambda body: body == expected)
        assert broadcaster.stats()["totalSubscribers"] == 1  # not dropped as slow


async def test_an_event_after_a_quiet_spell_is_written_at_once(
    broadcaster: EventBroadcaster,
) -> None:
    endpoint = sse_endpoint(broadcaster, flush_window=0.05)
    async with request(endpoint, {"session_id": "room"}) as exchange:
        await exchange.wait_for_body(bool)
        await anyio.sleep(0.3)  # more than five windows since the opening write
        first = await broadcaster.publish("room", "a")
        await exchange.wait_for_body(lambda body: body.endswith(first.encode()))
        assert exchange.messages[-1]["body"] == first.encode()  # alone, not held back
        second = await broadcaster.publish("room", "b")  # right after a write: a burst
        third = await broadcaster.publish("room", "c")
        await exchange.wait_for_body(lambda body: body.endswith(third.encode()))
        assert exchange.messages[-1]["body"] == second.encode() + third.encode()


async def test_one_flush_per_session_holds_a_burst_but_not_a_fanout() -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig(retry_ms=None))
    endpoint = sse_endpoint(broadcaster, flush_window=30.0)
    registry = registry_for(broadcaster)
    async with (
        lifespan(broadcaster)(None),
        request(endpoint, {"session_id": "room"}) as one,
        request(endpoint, {"session_id": "room"}) as two,
    ):
        with anyio.fail_after(5):
            while broadcaster.stats()["totalSubscribers"] < 2:
                await anyio.sleep(0.01)
        gate = registry._gates["room"]
        assert gate.streams == 2  # one gate for the session's streams
        # Nothing written yet: the first event is not a burst, and the second
        # stream writing the same event does not wait either.
        first = await broadcaster.publish("room", "a")
        for exchange in (one, two):
            await exchange.wait_for_body(lambda body: body == first.encode())
        assert gate.flush is None
        # Newer events right after a write, one per loop iteration: held for
        # the session's one flush while they keep coming, then in one write each.
        burst = []
        for data in "bcdefg":
            burst.append(await broadcaster.publish("room", data))
            await anyio.lowlevel.checkpoint()
            if len(burst) == 2:
                assert gate.flush is not None
                assert one.body == two.body == first.encode()
        expected = first.encode() + b"".join(e.encode() for e in burst)
        for exchange in (one, two):
            with anyio.fail_after(5):  # a window of 30 s: held past the burst would hang
                await exchange.wait_for_body(lambda body: body == expected)
            assert len([m for m in exchange.messages if m.get("body")]) <= 3
    assert "room" not in registry._gates  # released with its last stream
    assert len(registry) == 0


async def test_keepalive_through_the_shared_watchdog() -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig(keepalive_interval=0.1, retry_ms=None))
    endpoint = sse_endpoint(broadcaster)
    async with (
        lifespan(broadcaster)(None),
        request(endpoint, {"session_id": "a"}) as one,
        request(endpoint, {"session_id": "b"}) as two,
    ):
        for exchange in (one, two):
            await exchange.wait_for_body(lambda body: body == b": ping\n\n: ping\n\n")
        event = await broadcaster.publish("a", "after the pings")
        await one.wait_for_body(lambda body: body.endswith(event.encode()))
    assert open_streams(broadcaster) == 0
    assert registry_for(broadcaster)._streams == set()


# -- hostile slow readers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("anyio_backend", "http", "wrap_receive"),
    [
        pytest.param("asyncio", "h11", False, id="h11"),
        pytest.param("asyncio", "httptools", False, id="httptools"),
        pytest.param("asyncio", "h11", True, id="h11-wrapped-receive"),
        pytest.param(("asyncio", {"use_uvloop": True}), "httptools", False, id="httptools-uvloop"),
    ],
)
async def test_dropped_slow_readers_lose_their_connection_on_uvicorn(
    anyio_backend: Any, http: str, wrap_receive: bool
) -> None:
    """A client dropped for its send timeout must not keep its socket and buffer.

    uvicorn's own close() of an unfinished response waits for the client to
    read what is buffered: a client that never reads kept its connection (and
    the megabytes queued for it) for as long as it stayed connected.
    """
    import psutil

    clients = 30
    broadcaster = EventBroadcaster(
        BroadcasterConfig(
            send_timeout=0.5,
            keepalive_interval=5.0,
            max_history_per_session=4,
            max_queue_size=10_000,
            max_queue_bytes=512 * 2**20,
        )
    )
    app: Any = Starlette(
        routes=[Route("/events/{session_id}", sse_endpoint(broadcaster))],
        lifespan=lifespan(broadcaster),
    )
    if wrap_receive:  # a pure ASGI middleware: the endpoint no longer gets uvicorn's receive
        app = _WrapReceive(app)
    process = psutil.Process()
    big = "x" * 60_000
    async with run_uvicorn(app, http=http) as running, contextlib.AsyncExitStack() as stack:
        socks = [await open_silent(running.base_url, "/events/room") for _ in range(clients)]
        for sock in socks:
            stack.callback(sock.close)
        await wait_for(lambda: open_streams(broadcaster) == clients, 10, "the streams to open")
        assert established(running.base_url) == clients
        rss_before = _held_rss(process)
        start = time.monotonic()
        while open_streams(broadcaster) and time.monotonic() - start < 20:
            for _ in range(40):  # 2.4 MB a burst, written to each stream at once
                await broadcaster.publish("room", big)
            await anyio.sleep(0.05)
        assert open_streams(broadcaster) == 0, "the send timeout did not drop the readers"
        # The server's side of every dropped connection is gone while the
        # clients are still there, not reading.
        await wait_for(lambda: established(running.base_url) == 0, 5, "the sockets to close")
        await broadcaster.close_session("room")
        rss_after = _held_rss(process)
    grown = (rss_after - rss_before) / 2**20
    # Before the fix: about 100 MB (30 clients x a 2.4 MB burst each).
    assert grown < 20, f"RSS grew {grown:.1f} MB and stayed"


class _WrapReceive:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def wrapped() -> Any:
            return await receive()

        await self.app(scope, wrapped, send)


def _held_rss(process: Any) -> int:
    """Resident memory still in use: glibc keeps freed heap pages until trimmed."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS as it is
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(process.memory_info().rss)


# -- the shutdown hook ------------------------------------------------------------------------


async def test_shutdown_hook_chains_the_servers_signal_handler(
    broadcaster: EventBroadcaster,
) -> None:
    calls: list[int] = []

    def server_handler(signum: int, frame: FrameType | None) -> None:
        calls.append(signum)

    registry = registry_for(broadcaster)
    previous = signal.signal(signal.SIGTERM, server_handler)
    try:
        async with request(sse_endpoint(broadcaster), {"session_id": "room"}) as exchange:
            await exchange.wait_for_body(bool)  # the endpoint installed the hook
            assert install_shutdown_hook(registry)  # idempotent: wraps once
            hook = signal.getsignal(signal.SIGTERM)
            assert getattr(hook, "original", None) is server_handler
            signal.raise_signal(signal.SIGTERM)
            with anyio.fail_after(5):
                await exchange.returned.wait()  # the open stream was ended
            assert registry.closing
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls == [signal.SIGTERM]
    assert exchange.messages[-1]["more_body"] is False


async def test_shutdown_hook_leaves_default_handlers_alone() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        before = signal.getsignal(signal.SIGINT)
        install_shutdown_hook(StreamRegistry())
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- FastAPI on uvicorn ---------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_fastapi_app(anyio_backend: str) -> None:
    from fastapi import FastAPI

    broadcaster = EventBroadcaster(BroadcasterConfig(retry_ms=500))
    app = FastAPI(lifespan=lifespan(broadcaster))
    app.router.routes.append(Route("/events/{session_id}", sse_endpoint(broadcaster)))
    app.add_api_route("/stats", stats_endpoint(broadcaster), include_in_schema=False)
    app.add_api_route("/metrics", metrics_endpoint(broadcaster), include_in_schema=False)

    @app.post("/publish/{room}")
    async def publish(room: str, text: str) -> dict[str, str]:
        return {"id": (await broadcaster.publish(room, text)).id}

    async with run_uvicorn(app) as running, httpx.AsyncClient(timeout=5) as client:
        url = running.base_url
        first = (await client.post(f"{url}/publish/room", params={"text": "hi"})).json()["id"]
        async with aconnect_sse(
            client, "GET", f"{url}/events/room", headers={"Last-Event-ID": first}
        ) as source:
            assert source.response.headers["x-accel-buffering"] == "no"
            stream = source.aiter_sse()
            assert (await anext(stream)).retry == 500
            await client.post(f"{url}/publish/room", params={"text": "there"})
            sse = await anext(stream)
            assert (sse.event, sse.data) == ("message", "there")
        stats = (await client.get(f"{url}/stats")).json()
        assert stats["eventsPublished"] == 2
        metrics = await client.get(f"{url}/metrics")
        assert "sse_broadcaster_events_published_total 2" in metrics.text
        await wait_for(lambda: broadcaster.stats()["totalSubscribers"] == 0)
    assert not broadcaster.running
