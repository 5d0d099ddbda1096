"""sse_broadcaster.client: the WHATWG parser and EventSource against real servers."""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sse_broadcaster import Event
from sse_broadcaster.client import (
    EventSource,
    EventSourceError,
    InvalidContentTypeError,
    InvalidStatusError,
    OversizedEventError,
    ServerSentEvent,
    SSEParser,
    _backoff,
)
from sse_broadcaster.http import aclose_http_clients, create_http_client, get_http_client

from ._http_servers import Connection, Request, serve, serve_uvicorn

pytestmark = pytest.mark.anyio

E = ServerSentEvent


def parse(*chunks: bytes, last_event_id: str = "") -> list[ServerSentEvent]:
    parser = SSEParser(last_event_id)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.feed(b"", final=True)


# --------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        pytest.param(b"data: a\n\n", [E(data="a")], id="LF"),
        pytest.param(b"data: a\r\rdata: b\r\r", [E(data="a"), E(data="b")], id="CR"),
        pytest.param(b"data: a\r\n\r\n", [E(data="a")], id="CRLF"),
        pytest.param(b"data: a\r\ndata: b\rdata: c\n\r\n", [E(data="a\nb\nc")], id="mixed-breaks"),
        pytest.param(b"data: a\ndata:b\ndata:  c\n\n", [E(data="a\nb\n c")], id="one-space"),
        pytest.param(b"\xef\xbb\xbfdata: a\n\n", [E(data="a")], id="BOM"),
        pytest.param(
            b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", [], id="second-BOM-is-part-of-field-name"
        ),
        pytest.param(b": ping\n\n:\ndata: a\n: x\n\n", [E(data="a")], id="comments"),
        pytest.param(b"data\n\n", [E(data="")], id="data-without-colon"),
        pytest.param(b"data\ndata\n\n", [E(data="\n")], id="two-empty-data-lines"),
        pytest.param(b"event\ndata: a\n\n", [E(data="a")], id="event-without-colon"),
        pytest.param(b"event: \ndata: a\n\n", [E(data="a")], id="empty-event-is-message"),
        pytest.param(b"event: chat\ndata: a\n\n", [E(event="chat", data="a")], id="event"),
        pytest.param(
            b"event: chat\ndata: a\n\ndata: b\n\n",
            [E(event="chat", data="a"), E(data="b")],
            id="event-resets",
        ),
        pytest.param(
            b"id: 1\ndata: a\n\ndata: b\n\n",
            [E(id="1", data="a"), E(id="1", data="b")],
            id="id-kept",
        ),
        pytest.param(
            b"id: 1\ndata: a\n\nid\ndata: b\n\n", [E(id="1", data="a"), E(data="b")], id="id-reset"
        ),
        pytest.param(
            b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",
            [E(id="1", data="a"), E(id="1", data="b")],
            id="id-with-NUL-ignored",
        ),
        pytest.param(b"id: 7\n\ndata: a\n\n", [E(id="7", data="a")], id="id-only-message"),
        pytest.param(b"retry: 1500\ndata: a\n\n", [E(data="a", retry=1500)], id="retry"),
        pytest.param(b"retry: 15a\ndata: a\n\n", [E(data="a")], id="retry-not-digits"),
        pytest.param(b"retry: -1\ndata: a\n\n", [E(data="a")], id="retry-negative"),
        pytest.param(b"retry:\ndata: a\n\n", [E(data="a")], id="retry-empty"),
        pytest.param(
            "retry: \u0661\u0662\ndata: a\n\n".encode(), [E(data="a")], id="retry-non-ascii-digits"
        ),
        pytest.param(b"retry: 1 \ndata: a\n\n", [E(data="a")], id="retry-trailing-space"),
        pytest.param(b"data: a\nfoo: bar\nDATA: b\n\n", [E(data="a")], id="unknown-fields"),
        pytest.param(b"data: a:b: c\n\n", [E(data="a:b: c")], id="colons-in-value"),
        pytest.param(b"data: a\n\ndata: b", [E(data="a")], id="unterminated-dropped"),
        pytest.param(b"data: a\n", [], id="no-blank-line"),
        pytest.param(b"\n\n\n", [], id="blank-lines"),
        pytest.param(
            b"data: caf\xc3\xa9 \xe2\x82\xac\n\n", [E(data="caf\u00e9 \u20ac")], id="utf8"
        ),
        pytest.param(b"data: \xff\xfe\n\n", [E(data="\ufffd\ufffd")], id="invalid-utf8"),
        pytest.param(
            b"data: \x00\x0b\x0c\x1c\n\n", [E(data="\x00\x0b\x0c\x1c")], id="no-other-eol"
        ),
        pytest.param(
            "data: a\u2028b\u0085c\n\n".encode(), [E(data="a\u2028b\u0085c")], id="unicode-eol-kept"
        ),
    ],
)
def test_parser(stream: bytes, expected: list[ServerSentEvent]) -> None:
    assert parse(stream) == expected


STREAM = (
    b"\xef\xbb\xbf: hello\r\n"
    b"retry: 2500\r\n"
    b"id: 1\r\nevent: chat\r\ndata: caf\xc3\xa9\r\ndata\r\n\r\n"
    b"id: 2\rdata: b\r\r"
    b"data: c\n\n"
    b"id: 3\ndata: \xe2\x82\xac\r\n\n"
)
STREAM_EVENTS = [
    E(id="1", event="chat", data="caf\u00e9\n", retry=2500),
    E(id="2", data="b"),
    E(id="2", data="c"),
    E(id="3", data="\u20ac"),
]


def test_parser_same_events_wherever_the_stream_is_split() -> None:
    assert parse(STREAM) == STREAM_EVENTS
    for i in range(len(STREAM) + 1):
        assert parse(STREAM[:i], STREAM[i:]) == STREAM_EVENTS, i
        for j in range(i, len(STREAM) + 1, 7):
            assert parse(STREAM[:i], STREAM[i:j], STREAM[j:]) == STREAM_EVENTS, (i, j)
    assert parse(*(STREAM[i : i + 1] for i in range(len(STREAM)))) == STREAM_EVENTS


def test_parser_crlf_split_across_chunks_is_one_line_break() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # the LF of the CRLF, not a blank line
    assert parser.feed(b"\r") == [E(data="a")]
    assert parser.feed(b"\n") == []
    assert parser.feed(b"data: b\r") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\n\n") == [E(data="b")]


def test_parser_reset_drops_half_an_event_and_keeps_the_last_id() -> None:
    parser = SSEParser("0")
    assert parser.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n") == [E(id="1", data="a")]
    assert parser.last_event_id == "1"
    parser.reset()  # the connection broke mid-event: a reconnection resumes from "1"
    assert parser.feed(b"data: c\n\n") == [E(id="1", data="c")]
    assert parse(b"data: x\n\n", last_event_id="9") == [E(id="9", data="x")]


def test_parser_bounds_the_size_of_an_event() -> None:
    parser = SSEParser(max_event_size=10)
    assert parser.feed(b"data: 0123\ndata: 4567\n\n") == [E(data="0123\n4567")]
    with pytest.raises(OversizedEventError, match=r"exceeded max_event_size \(10 characters\)"):
        parser.feed(b"data: 0123\ndata: 45678")  # a long unfinished line counts too
    with pytest.raises(OversizedEventError):
        SSEParser(max_event_size=10).feed(b"data: 012345\ndata: 012345\n")
    with pytest.raises(ValueError, match=r"^max_event_size must be >= 1 or None, got 0$"):
        SSEParser(max_event_size=0)


def test_parser_tracks_retry_and_last_id() -> None:
    parser = SSEParser()
    parser.feed(b"retry: 10\n\nretry: x\nid: 5\n\n")
    assert parser.retry == 10
    assert parser.last_event_id == "5"


_field = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0"))


@settings(deadline=None, database=None)  # the box is shared and noisy
@given(
    id=_field,
    event=st.none() | _field.filter(bool),
    data=st.text(st.characters(exclude_categories=["Cs"])),
    retry=st.none() | st.integers(0, 10**9),
)
def test_round_trip_with_the_project_encoder(
    id: str, event: str | None, data: str, retry: int | None
) -> None:
    wire = Event(id=id, session_id="s", data=data, event=event, retry=retry).encode()
    expected = E(id=id, event=event or "message", data=re.sub(r"\r\n|\r", "\n", data), retry=retry)
    assert parse(wire) == [expected]
    assert parse(*(wire[i : i + 1] for i in range(len(wire)))) == [expected]


def test_backoff_grows_is_capped_and_jittered() -> None:
    def delays(jitter: float, rnd: float, base: float = 1.0) -> list[float]:
        return [
            _backoff(n, base=base, cap=10.0, multiplier=2.0, jitter=jitter, random=lambda: rnd)
            for n in range(1, 7)
        ]

    assert delays(0.0, 0.9) == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert delays(0.5, 1.0) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert delays(0.5, 0.0) == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert delays(0.0, 0.5, base=30.0) == [30.0] * 6  # a server's retry: above the cap


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reconnect_delay": -1}, "reconnect_delay must be >= 0.0, got -1"),
        ({"max_reconnect_delay": -0.5}, "max_reconnect_delay must be >= 0.0, got -0.5"),
        ({"backoff_multiplier": 0.5}, "backoff_multiplier must be >= 1.0, got 0.5"),
        ({"jitter": 1.5}, "jitter must be <= 1, got 1.5"),
        ({"max_retries": -1}, "max_retries must be >= 0 or None, got -1"),
        ({"last_event_id": "a\nb"}, "last_event_id must not contain CR, LF or NUL, got 'a\\nb'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        EventSource("http://127.0.0.1/", **kwargs)


# --------------------------------------------------------------------------- EventSource

Script = Callable[[Request, Connection], Any]


def sse(script: Script) -> Callable[[Request, Connection], Any]:
    """A handler that runs ``script`` for each connection, then closes it."""

    async def handler(request: Request, conn: Connection) -> bool:
        await script(request, conn)
        return False

    return handler


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with create_http_client() as client:
        yield client


FAST = {"reconnect_delay": 0.01, "max_reconnect_delay": 0.05, "jitter": 0.0}


async def take(source: EventSource, n: int) -> list[ServerSentEvent]:
    events = []
    with anyio.fail_after(10):
        async for event in source:
            events.append(event)
            if len(events) == n:
                break
    return events


async def test_reconnects_after_a_cut_mid_event_and_resends_last_event_id(
    client: httpx.AsyncClient,
) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        if request.connection_number == 1:
            # The second event is cut before its blank line: it must not be
            # dispatched, and the client resumes from "1".
            await conn.send(b"id: 1\ndata: one\n\nid: 2\ndata: tw")
        else:
            last = int(request.headers["last-event-id"])
            await conn.send(f"id: {last + 1}\ndata: again\n\n".encode())
            await conn.hold()

    async with serve(sse(script)) as server:
        async with EventSource(server.url(), client=client, **FAST) as source:
            events = await take(source, 2)
            assert source.last_event_id == "2"
        assert events == [E(id="1", data="one"), E(id="2", data="again")]
        assert [r.headers.get("last-event-id") for r in server.requests] == [None, "1"]
        assert server.requests[0].headers["accept"] == "text/event-stream"
        await server.wait_open(0)


async def test_initial_last_event_id_is_sent(client: httpx.AsyncClient) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        await conn.send(b"data: x\n\n")
        await conn.hold()

    async with serve(sse(script)) as server:
        async with EventSource(server.url(), client=client, last_event_id="41") as source:
            assert await take(source, 1) == [E(id="41", data="x")]
        assert server.requests[0].headers["last-event-id"] == "41"


async def test_garbage_does_not_stop_the_stream(client: httpx.AsyncClient) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        await conn.send(b"\x00\xff\xfe garbage \x80\x81\r\n:\xc3\nnonsense\n\x1b[31m\n\n")
        await conn.send(b"\xfe\xfe\xfe" * 1000 + b"\n\n")
        await conn.send(b"data: still here\n\n")
        await conn.hold()

    async with serve(sse(script)) as server:
        async with EventSource(server.url(), client=client, **FAST) as source:
            assert await take(source, 1) == [E(data="still here")]
        assert server.counters.accepted == 1


async def test_stalled_stream_times_out_and_reconnects(client: httpx.AsyncClient) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        await conn.send(f"id: {request.connection_number}\ndata: hi\n\n".encode())
        await conn.hold()  # stalls: no keep-alive comment either

    async with serve(sse(script)) as server:
        async with EventSource(
            server.url(), client=client, timeout=httpx.Timeout(5.0, read=0.2), **FAST
        ) as source:
            events = await take(source, 2)
        assert events == [E(id="1", data="hi"), E(id="2", data="hi")]
        assert server.requests[1].headers["last-event-id"] == "1"


async def test_500_then_200(client: httpx.AsyncClient) -> None:
    async def script(request: Request, conn: Connection) -> None:
        if request.connection_number <= 2:
            await conn.respond((500, 503)[request.connection_number - 1], b"down", close=True)
            return
        await conn.start_stream(content_type="text/event-stream; charset=utf-8")
        await conn.send(b"data: up\n\n")
        await conn.hold()

    async with (
        serve(sse(script)) as server,
        EventSource(server.url(), client=client, **FAST) as source,
    ):
        assert await take(source, 1) == [E(data="up")]
        assert source.connections == 3


async def test_server_retry_field_sets_the_reconnection_time(client: httpx.AsyncClient) -> None:
    times: list[float] = []

    async def script(request: Request, conn: Connection) -> None:
        times.append(anyio.current_time())
        await conn.start_stream()
        await conn.send(f"retry: 300\nid: {request.connection_number}\ndata: x\n\n".encode())

    async with serve(sse(script)) as server:
        # Without the server's retry: the client would wait 20 s.
        source = EventSource(server.url(), client=client, reconnect_delay=20.0, jitter=0.0)
        async with source:
            events = await take(source, 2)
            assert source.reconnect_delay == 0.3
        assert [e.id for e in events] == ["1", "2"]
        assert 0.25 <= times[1] - times[0] < 5.0


async def test_backoff_between_failed_attempts(client: httpx.AsyncClient) -> None:
    times: list[float] = []

    async def script(request: Request, conn: Connection) -> None:
        times.append(anyio.current_time())
        await conn.respond(503, b"busy", close=True)

    async with serve(sse(script)) as server:
        source = EventSource(
            server.url(),
            client=client,
            reconnect_delay=0.05,
            max_reconnect_delay=0.2,
            jitter=0.0,
            max_retries=4,
        )
        async with source:
            with pytest.raises(
                EventSourceError, match="after 5 failed attempts in a row: HTTP 503"
            ):
                await take(source, 1)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(gaps) == 4
        for gap, expected in zip(gaps, [0.05, 0.1, 0.2, 0.2], strict=True):
            assert expected * 0.9 <= gap < expected + 0.5


async def test_retry_after_lengthens_the_wait_up_to_the_cap(client: httpx.AsyncClient) -> None:
    times: list[float] = []

    async def script(request: Request, conn: Connection) -> None:
        times.append(anyio.current_time())
        if request.connection_number == 1:
            await conn.respond(503, b"", headers={"Retry-After": "120"}, close=True)
            return
        await conn.start_stream()
        await conn.send(b"data: back\n\n")
        await conn.hold()

    async with serve(sse(script)) as server:
        source = EventSource(
            server.url(), client=client, reconnect_delay=0.01, max_reconnect_delay=0.3, jitter=0
        )
        async with source:
            assert await take(source, 1) == [E(data="back")]
    assert 0.28 <= times[1] - times[0] < 5.0


async def test_an_oversized_event_stops_the_source(client: httpx.AsyncClient) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        await conn.send(b"data: small\n\n")
        for _ in range(64):  # 64 KiB with no line break, and more would follow
            await conn.send(b"x" * 1024)
        await conn.hold()

    async with (
        serve(sse(script)) as server,
        EventSource(server.url(), client=client, max_event_size=10_000) as source,
    ):
        assert await source.__anext__() == E(data="small")
        with pytest.raises(OversizedEventError):
            await source.__anext__()
        await server.wait_open(0)
    assert server.counters.accepted == 1


@pytest.mark.parametrize(
    ("status", "content_type", "error", "message"),
    [
        pytest.param(
            404,
            "text/plain",
            InvalidStatusError,
            "answered HTTP 404, which is not retried",
            id="404",
        ),
        pytest.param(
            401,
            "text/plain",
            InvalidStatusError,
            "answered HTTP 401, which is not retried",
            id="401",
        ),
        pytest.param(
            200,
            "text/html; charset=utf-8",
            InvalidContentTypeError,
            "answered Content-Type 'text/html; charset=utf-8', not 'text/event-stream'",
            id="html",
        ),
    ],
)
async def test_stops_with_a_clear_error(
    client: httpx.AsyncClient,
    status: int,
    content_type: str,
    error: type[Exception],
    message: str,
) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.respond(status, b"nope", headers={"Content-Type": content_type}, close=True)

    async with serve(sse(script)) as server:
        async with EventSource(server.url(), client=client, **FAST) as source:
            with pytest.raises(error, match=re.escape(message)) as info:
                await take(source, 1)
            assert source.closed
            with pytest.raises(StopAsyncIteration):
                await source.__anext__()
        assert server.counters.accepted == 1
    if isinstance(info.value, InvalidStatusError):
        assert info.value.status_code == status
    if isinstance(info.value, InvalidContentTypeError):
        assert info.value.content_type == content_type


async def test_204_stops_reconnecting(client: httpx.AsyncClient) -> None:
    async def script(request: Request, conn: Connection) -> None:
        if request.connection_number == 1:
            await conn.start_stream()
            await conn.send(b"id: 1\ndata: last\n\n")
        else:
            await conn.send(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")

    async with serve(sse(script)) as server:
        async with EventSource(server.url(), client=client, **FAST) as source:
            events = [event async for event in source]
        assert events == [E(id="1", data="last")]
        assert server.counters.accepted == 2
        assert source.closed


async def test_follows_redirects(client: httpx.AsyncClient) -> None:
    async def script(request: Request, conn: Connection) -> None:
        if request.target == "/old":
            await conn.respond(307, b"", headers={"Location": "/new"}, close=True)
            return
        await conn.start_stream()
        await conn.send(b"data: moved\n\n")
        await conn.hold()

    async with (
        serve(sse(script)) as server,
        EventSource(server.url("/old"), client=client) as source,
    ):
        assert await take(source, 1) == [E(data="moved")]


async def test_cancelling_the_consumer_closes_the_connection(client: httpx.AsyncClient) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        await conn.send(b"data: first\n\n")
        await conn.hold()

    async with serve(sse(script)) as server:
        got: list[ServerSentEvent] = []
        with anyio.move_on_after(0.3) as scope:
            async with EventSource(server.url(), client=client) as source:
                async for event in source:
                    got.append(event)
        assert scope.cancelled_caught
        assert got == [E(data="first")]
        await server.wait_open(0)
        assert client._transport.transport.connection_count() == 0  # type: ignore[attr-defined]
        # The pool is fine afterwards.
        async with EventSource(server.url(), client=client) as source:
            assert await take(source, 1) == [E(data="first")]


async def test_breaking_out_closes_the_connection(client: httpx.AsyncClient) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        await conn.send(b"data: 1\n\ndata: 2\n\ndata: 3\n\n")
        await conn.hold()

    async with serve(sse(script)) as server:
        async with EventSource(server.url(), client=client) as source:
            async for event in source:
                assert event.data == "1"
                break
        await server.wait_open(0)
        assert client._transport.transport.connection_count() == 0  # type: ignore[attr-defined]


async def test_a_cancelled_wait_loses_no_event(client: httpx.AsyncClient) -> None:
    go = anyio.Event()

    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        await conn.send(b"id: 1\ndata: a\n\n")
        await go.wait()
        await conn.send(b"id: 2\ndata: b\n\n")
        await conn.hold()

    async with serve(sse(script)) as server:
        async with EventSource(server.url(), client=client) as source:
            assert await source.__anext__() == E(id="1", data="a")
            with anyio.move_on_after(0.1):
                await source.__anext__()
            go.set()
            assert await source.__anext__() == E(id="2", data="b")
        assert server.counters.accepted == 1


async def test_needs_async_with_and_enters_once(client: httpx.AsyncClient) -> None:
    source = EventSource("http://127.0.0.1:9/", client=client)
    with pytest.raises(RuntimeError, match="async with"):
        await source.__anext__()
    async with source:
        await source.aclose()
        with pytest.raises(StopAsyncIteration):
            await source.__anext__()
    with pytest.raises(RuntimeError, match="entered only once"):
        await source.__aenter__()


async def test_connection_refused_retries_then_gives_up() -> None:
    async with serve(sse(lambda r, c: anyio.lowlevel.checkpoint())) as server:
        port = server.port  # closed once the block exits: connections are refused
    source = EventSource(f"http://127.0.0.1:{port}/", max_retries=2, **FAST)
    try:
        async with source:
            with pytest.raises(EventSourceError, match="after 3 failed attempts") as info:
                await take(source, 1)
        assert isinstance(info.value.__cause__, httpx.ConnectError)
    finally:
        await aclose_http_clients()


async def test_uses_the_shared_pooled_client_by_default() -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        await conn.send(b"data: pooled\n\n")
        await conn.hold()

    try:
        async with serve(sse(script)) as server:
            async with EventSource(server.url()) as source:
                assert await take(source, 1) == [E(data="pooled")]
            assert not get_http_client().is_closed
    finally:
        await aclose_http_clients()


# --------------------------------------------------------------------------- Starlette on uvicorn


def _broadcaster_app() -> Any:
    """A small Starlette app streaming an EventBroadcaster session as SSE."""
    from starlette.applications import Starlette
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from sse_broadcaster import EventBroadcaster

    broadcaster = EventBroadcaster()

    async def events(request: HTTPRequest) -> StreamingResponse:
        session = request.path_params["session"]
        last = request.headers.get("last-event-id")

        async def body() -> AsyncIterator[bytes]:
            async with broadcaster.subscribe(session, last_event_id=last) as sub:
                yield b"retry: 50\n\n"
                async for event in sub:
                    yield event.encode()

        return StreamingResponse(body(), media_type="text/event-stream")

    async def publish(request: HTTPRequest) -> JSONResponse:
        event = await broadcaster.publish(request.path_params["session"], await request.json())
        return JSONResponse({"id": event.id})

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with broadcaster:
            yield

    return Starlette(
        routes=[
            Route("/events/{session}", events),
            Route("/publish/{session}", publish, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


@pytest.mark.parametrize("backend", ["small-app", "adapter"])
async def test_resumes_from_last_event_id_against_the_broadcaster(
    client: httpx.AsyncClient, backend: str
) -> None:
    app = _adapter_app() if backend == "adapter" else _broadcaster_app()
    with serve_uvicorn(app) as base:
        ids = []
        for n in range(5):
            response = await client.post(f"{base}/publish/feed", json={"n": n})
            ids.append(response.json()["id"])
        # A worker that had seen event 0 restarts: the history replays the rest.
        async with EventSource(f"{base}/events/feed", client=client, last_event_id=ids[0]) as src:
            first = await take(src, 2)
            resume = src.last_event_id
        assert [e.data for e in first] == ['{"n":1}', '{"n":2}']
        assert resume == ids[2]
        async with EventSource(f"{base}/events/feed", client=client, last_event_id=resume) as src:
            rest = await take(src, 2)
            await client.post(f"{base}/publish/feed", json={"n": 5})
            live = await take(src, 1)
        assert [e.data for e in rest + live] == ['{"n":3}', '{"n":4}', '{"n":5}']
        assert [e.id for e in rest] == ids[3:]
        assert all(e.event == "message" for e in first + rest + live)


def _adapter_app() -> Any:
    """The project's own Starlette adapter, with a publish route for the test."""
    from starlette.applications import Starlette
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from sse_broadcaster import BroadcasterConfig, EventBroadcaster
    from sse_broadcaster.starlette import lifespan, sse_endpoint

    broadcaster = EventBroadcaster(BroadcasterConfig(retry_ms=50))

    async def publish(request: HTTPRequest) -> JSONResponse:
        event = await broadcaster.publish(request.path_params["session"], await request.json())
        return JSONResponse({"id": event.id})

    return Starlette(
        routes=[
            Route("/events/{session_id}", sse_endpoint(broadcaster)),
            Route("/publish/{session}", publish, methods=["POST"]),
        ],
        lifespan=lifespan(broadcaster),
    )
