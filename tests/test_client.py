"""sse_broadcaster.client: the WHATWG parser and EventSource against real servers."""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import resource
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import psutil
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
    _unwrap_group,
)
from sse_broadcaster.http import aclose_http_clients, create_http_client, get_http_client

from .support.http_servers import Connection, Request, serve, serve_uvicorn

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

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


def test_parser_bounds_an_unterminated_line_fed_in_small_pieces() -> None:
    # A hostile server sends one line that never ends: the buffer must not grow
    # past max_event_size, whatever the size of the pieces.
    parser = SSEParser(max_event_size=1000)
    assert parser.feed(b"data: ") == []
    for _ in range(9):
        assert parser.feed(b"x" * 100) == []
    with pytest.raises(OversizedEventError, match=r"exceeded max_event_size \(1000 characters\)"):
        parser.feed(b"x" * 100)  # 1006 characters pending


def test_parser_bounds_an_event_that_arrives_in_one_piece() -> None:
    with pytest.raises(OversizedEventError, match=r"\(10 characters\)"):
        SSEParser(max_event_size=10).feed(b"data: 0123456789AB\n\n")
    assert SSEParser(max_event_size=10).feed(b"data: 012345678\n\n") == [E(data="012345678")]


def test_parser_returns_the_events_before_an_oversized_one() -> None:
    parser = SSEParser(max_event_size=10)
    assert parser.feed(b"data: a\n\ndata: b\n\ndata: 0123456789AB\n") == [E(data="a"), E(data="b")]
    with pytest.raises(OversizedEventError):
        parser.feed(b"")
    with pytest.raises(OversizedEventError):
        parser.feed(b"data: c\n\n", final=True)
    parser.reset()
    assert parser.feed(b"data: c\n\n") == [E(data="c")]


@pytest.mark.parametrize(
    ("chunks", "data"),
    [
        pytest.param([b"data: ab", b"c\r", b"\ndata: d\r", b"\n\r", b"\n"], "abc\nd", id="CR|LF"),
        pytest.param([b"data: ab", b"c\r\nda", b"ta: d", b"\r", b"\r\n"], "abc\nd", id="CR|CRLF"),
        pytest.param([b"data: abc\r", b"", b"\n", b"data: d\r\n\r", b"\n"], "abc\nd", id="empty"),
        pytest.param([b"data: ab\xc3", b"\xa9\r", b"\n", b"data: d\n\n"], "ab\u00e9\nd", id="utf8"),
        pytest.param([b"data: ab\r", b"\xc3", b"\xa9\n\n"], "ab", id="CR|utf8"),
    ],
)
def test_parser_crlf_split_inside_a_pending_line(chunks: list[bytes], data: str) -> None:
    assert parse(*chunks) == [E(data=data)]


def test_parser_long_line_split_at_cr_lf() -> None:
    line = b"data: " + b"x" * 100_000
    chunks = [line[i : i + 4096] for i in range(0, len(line), 4096)]
    assert parse(*chunks, b"\r", b"\ndata: y\r", b"\n", b"\r\n") == [E(data="x" * 100_000 + "\ny")]


def test_parser_is_linear_in_a_long_unterminated_line() -> None:
    # 8 MB in 4 KB pieces took 58 s when each piece re-joined and re-scanned
    # the whole pending line; linear parsing takes well under a second.
    parser = SSEParser(max_event_size=None)
    piece = b"x" * 4096
    start = time.perf_counter()
    parser.feed(b"data: ")
    for _ in range(8 * 1024 * 1024 // 4096):
        assert parser.feed(piece) == []
    events = parser.feed(b"\n\n")
    elapsed = time.perf_counter() - start
    assert len(events[0].data) == 8 * 1024 * 1024
    assert elapsed < 10.0, elapsed  # generous: the machine is shared


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(b"0" * 5000 + b"1500", 1500, id="5000-leading-zeros"),
        pytest.param(b"9" * 400, SSEParser.MAX_RETRY, id="400-digits"),
        pytest.param(b"9" * 5000, SSEParser.MAX_RETRY, id="5000-digits"),
        pytest.param(str(2**31).encode(), SSEParser.MAX_RETRY, id="just-above"),
        pytest.param(str(2**31 - 1).encode(), 2**31 - 1, id="maximum"),
        pytest.param(b"0", 0, id="zero"),
    ],
)
def test_parser_huge_retry_is_clamped_without_converting_it(value: bytes, expected: int) -> None:
    assert parse(b"retry: " + value + b"\ndata: a\n\n") == [E(data="a", retry=expected)]


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
    assert delays(0.0, 0.5, base=30.0) == [30.0] * 6  # a reconnect_delay above the cap


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reconnect_delay": -1}, "reconnect_delay must be >= 0.0, got -1"),
        ({"max_reconnect_delay": -0.5}, "max_reconnect_delay must be >= 0.0, got -0.5"),
        ({"backoff_multiplier": 0.5}, "backoff_multiplier must be >= 1.0, got 0.5"),
        ({"jitter": 1.5}, "jitter must be <= 1, got 1.5"),
        ({"max_retries": -1}, "max_retries must be >= 0 or None, got -1"),
        (
            {"last_event_id": "a\nb"},
            "last_event_id cannot be sent: it holds NUL, LF, CR, VT or FF, "
            "which no HTTP header can carry, got 'a\\nb'",
        ),
        (
            {"last_event_id": "a\x0cb"},
            "last_event_id cannot be sent: it holds NUL, LF, CR, VT or FF, "
            "which no HTTP header can carry, got 'a\\x0cb'",
        ),
        (
            {"last_event_id": "x" * 5000},
            "last_event_id cannot be sent: it is 5000 bytes in UTF-8, over max_last_event_id "
            f"(4096), got {'x' * 60!r}... (5000 characters)",
        ),
        (
            {"last_event_id": "\u00e9" * 3, "max_last_event_id": 5},
            "last_event_id cannot be sent: it is 6 bytes in UTF-8, over max_last_event_id (5), "
            "got '\u00e9\u00e9\u00e9'",
        ),
        ({"max_last_event_id": 0}, "max_last_event_id must be >= 1, got 0"),
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


@pytest.mark.parametrize("together", [False, True], ids=["apart", "same-write"])
async def test_an_oversized_event_stops_the_source(
    client: httpx.AsyncClient, together: bool
) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        small = b"data: small\n\n"
        if together:  # the event before the oversized one arrives in the same read
            await conn.send(small + b"data: " + b"x" * 20_000)
        else:
            await conn.send(small)
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


# ------------------------------------------------------------------------ hostile servers (#10)


@pytest.mark.parametrize(
    ("sent_id", "header"),
    [
        pytest.param("\u00e9", b"\xc3\xa9", id="non-ASCII-as-UTF-8"),
        pytest.param(" x ", b"x", id="spaces-at-the-ends"),
        pytest.param("a\tb c\x01", b"a\tb c\x01", id="inner-tab-space-and-control"),
        pytest.param(" \t ", None, id="only-spaces-not-sent"),
    ],
)
async def test_reconnects_with_any_sendable_id(
    client: httpx.AsyncClient, sent_id: str, header: bytes | None
) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        if request.connection_number == 1:
            await conn.send(f"id: {sent_id}\ndata: one\n\n".encode())
        else:
            await conn.send(b"data: two\n\n")
            await conn.hold()

    async with serve(sse(script)) as server:
        async with EventSource(server.url(), client=client, **FAST) as source:
            events = await take(source, 2)
        assert events == [E(id=sent_id, data="one"), E(id=sent_id, data="two")]
        received = server.requests[1].headers.get("last-event-id")  # decoded as latin-1
        assert (None if received is None else received.encode("latin-1")) == header


@pytest.mark.parametrize(
    ("sent_id", "kwargs", "reason"),
    [
        pytest.param(
            "a\x0cb",
            {},
            "its last event id 'a\\x0cb' holds NUL, LF, CR, VT or FF, "
            "which no HTTP header can carry",
            id="form-feed",
        ),
        pytest.param(
            "x" * 10_000,
            {},
            f"its last event id {'x' * 60!r}... (10000 characters) is 10000 bytes in UTF-8, "
            "over max_last_event_id (4096)",
            id="10-KB-id",
        ),
        pytest.param(
            "\u00e9\u00e9",
            {"max_last_event_id": 3},
            "its last event id '\u00e9\u00e9' is 4 bytes in UTF-8, over max_last_event_id (3)",
            id="limit-in-bytes",
        ),
    ],
)
async def test_an_id_that_cannot_be_sent_ends_the_source(
    client: httpx.AsyncClient, sent_id: str, kwargs: dict[str, Any], reason: str
) -> None:
    # Retrying could never send it, and resuming without it (or from an older
    # id) would resume from the wrong place: the source stops, saying why.
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        if request.connection_number == 1:
            await conn.send(f"id: {sent_id}\ndata: one\n\n".encode())
        else:
            await conn.send(b"data: two\n\n")
            await conn.hold()

    async with serve(sse(script)) as server:
        async with EventSource(server.url(), client=client, **FAST, **kwargs) as source:
            assert await take(source, 1) == [E(id=sent_id, data="one")]
            with anyio.fail_after(5), pytest.raises(EventSourceError) as info:
                await source.__anext__()
        assert str(info.value) == f"cannot resume {server.url()}: {reason}"
        assert server.counters.accepted == 1


async def test_a_later_valid_id_replaces_one_that_cannot_be_sent(
    client: httpx.AsyncClient,
) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        if request.connection_number == 1:
            await conn.send(b"id: a\x0cb\ndata: one\n\nid: 2\ndata: two\n\n")
        else:
            await conn.send(b"data: three\n\n")
            await conn.hold()

    async with serve(sse(script)) as server:
        async with EventSource(server.url(), client=client, **FAST) as source:
            assert [e.data for e in await take(source, 3)] == ["one", "two", "three"]
        assert server.requests[1].headers["last-event-id"] == "2"


@pytest.mark.parametrize("digits", [400, 5000])
async def test_a_huge_retry_is_capped_at_max_reconnect_delay(
    client: httpx.AsyncClient, digits: int
) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        if request.connection_number == 1:
            await conn.send(b"retry: " + b"9" * digits + b"\nid: 1\ndata: one\n\n")
        else:
            await conn.send(b"data: two\n\n")
            await conn.hold()

    async with serve(sse(script)) as server:
        source = EventSource(
            server.url(), client=client, reconnect_delay=0.01, max_reconnect_delay=0.1, jitter=0
        )
        async with source:
            events = await take(source, 2)
            assert source.reconnect_delay == 0.1
        assert events == [E(id="1", data="one", retry=SSEParser.MAX_RETRY), E(id="1", data="two")]


async def test_a_redirect_loop_raises_event_source_error(client: httpx.AsyncClient) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.respond(307, b"", headers={"Location": request.target}, close=True)

    async with serve(sse(script)) as server:
        with pytest.raises(EventSourceError, match="TooManyRedirects") as info:
            async with EventSource(server.url("/loop"), client=client, **FAST) as source:
                await take(source, 1)
        assert isinstance(info.value.__cause__, httpx.TooManyRedirects)
        assert server.counters.accepted == 21  # the first request and 20 redirects, once


async def test_a_redirect_to_another_scheme_is_not_retried(client: httpx.AsyncClient) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.respond(307, b"", headers={"Location": "ftp://127.0.0.1/x"}, close=True)

    async with serve(sse(script)) as server:
        # The pooled transport raises httpx's own UnsupportedProtocol: not retried.
        with pytest.raises(EventSourceError, match=r"ftp") as info:
            async with EventSource(server.url(), client=client, **FAST) as source:
                await take(source, 1)
        assert isinstance(info.value.__cause__, httpx.UnsupportedProtocol)
        assert server.counters.accepted == 1


async def test_a_request_h11_refuses_is_not_retried(client: httpx.AsyncClient) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        await conn.hold()

    async with serve(sse(script)) as server:
        source = EventSource(server.url(), client=client, headers={"X-Token": " a"}, **FAST)
        with pytest.raises(EventSourceError, match="cannot be sent: LocalProtocolError") as info:
            async with source:
                await take(source, 1)
        assert isinstance(info.value.__cause__, httpx.LocalProtocolError)
        assert source.connections == 1


async def test_errors_leave_the_block_as_themselves(client: httpx.AsyncClient) -> None:
    # The documented `except EventSourceError` around the block must match: no
    # ExceptionGroup from the task group inside.
    async def script(request: Request, conn: Connection) -> None:
        if request.target == "/404":
            await conn.respond(404, b"nope", close=True)
            return
        await conn.start_stream()
        await conn.send(b"data: x\n\n")
        await conn.hold()

    async with serve(sse(script)) as server:
        with pytest.raises(InvalidStatusError) as info:  # noqa: PT012
            async with EventSource(server.url("/404"), client=client, **FAST) as source:
                async for _ in source:
                    pass
        assert info.value.status_code == 404
        with pytest.raises(KeyError, match="mine"):  # noqa: PT012
            async with EventSource(server.url(), client=client, **FAST) as source:
                await source.__anext__()
                raise KeyError("mine")
        await server.wait_open(0)


def test_unwrap_group_raises_a_lone_exception_as_itself() -> None:
    cause, context = OSError("cause"), ValueError("context")
    error = EventSourceError("lone")
    error.__cause__, error.__context__ = cause, context
    with pytest.raises(EventSourceError) as info, _unwrap_group():
        raise BaseExceptionGroup("g", [BaseExceptionGroup("inner", [error])])
    assert info.value is error
    assert (error.__cause__, error.__context__) == (cause, context)
    several = BaseExceptionGroup("g", [KeyError(1), KeyboardInterrupt()])
    with pytest.raises(BaseExceptionGroup) as group_info, _unwrap_group():
        raise several
    assert group_info.value is several


@functools.cache
def _gzip_bomb() -> bytes:
    """256 MiB of zeros (no line break) in 250 KiB of gzip."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(1024 * 1024)
    body = b"".join(compressor.compress(zeros) for _ in range(256))
    return body + compressor.flush()


@functools.cache
def _brotli_bomb() -> bytes:
    """1 GiB of zeros (no line break) in about 2 KiB of brotli."""
    import brotli  # requirements/test.txt installs it, so both decoders are tested

    compressor = brotli.Compressor(quality=5)
    zeros = bytes(1024 * 1024)
    return b"".join([*(compressor.process(zeros) for _ in range(1024)), compressor.finish()])


class PeakRSS:
    """The peak resident memory of this process while the block runs, above its start."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.process.memory_info().rss
        self._max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if max_after > self._max_before:  # a new peak of the process, exact even between samples
            self.peak = max(self.peak, max_after)

    @property
    def growth(self) -> int:
        return self.peak - self.start


@pytest.mark.parametrize("encoding", ["gzip", "br"])
async def test_a_compression_bomb_does_not_fill_memory(
    client: httpx.AsyncClient, encoding: str
) -> None:
    body = _gzip_bomb() if encoding == "gzip" else _brotli_bomb()

    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream(content_encoding=encoding)
        await conn.send(body)
        await conn.hold()

    async with serve(sse(script)) as server:
        with PeakRSS() as rss:
            async with EventSource(server.url(), client=client, **FAST) as source:
                with anyio.fail_after(30), pytest.raises(OversizedEventError):
                    await source.__anext__()
        assert rss.growth < 100 * 1024 * 1024, f"{rss.growth / 2**20:.0f} MiB"
        assert server.requests[0].headers["accept-encoding"] in (
            "gzip, deflate, br",
            "gzip, deflate",
        )


E_ACUTE = "\u00e9"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate", "br", "gzip, br"])
async def test_compressed_streams_are_decoded_as_they_arrive(
    client: httpx.AsyncClient, encoding: str
) -> None:
    import brotli  # requirements/test.txt installs it

    events = [f"id: {n}\ndata: {E_ACUTE * n}\n\n".encode() for n in range(1, 4)]

    def compressor(name: str) -> Callable[[bytes], bytes]:
        # Each event flushed on its own, as a streaming server does.
        if name == "br":
            assert brotli is not None
            br = brotli.Compressor()
            return lambda data: br.process(data) + br.flush()
        wbits = {"gzip": 31, "deflate": 15, "raw-deflate": -15}[name]
        z = zlib.compressobj(6, zlib.DEFLATED, wbits)
        return lambda data: z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)

    names = [n.strip() for n in encoding.split(",")]
    steps = [compressor(n) for n in names]
    header = encoding.replace("raw-deflate", "deflate")
    go = anyio.Event()

    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream(content_encoding=header)
        for n, event in enumerate(events):
            for step in steps:
                event = step(event)
            await conn.send(event)
            if n == 1:
                await go.wait()  # the first two events must arrive before the third is sent
        await conn.hold()

    async with serve(sse(script)) as server:
        async with EventSource(server.url(), client=client, **FAST) as source:
            first = await take(source, 2)
            go.set()
            third = await take(source, 1)
        assert [e.data for e in first + third] == ["\u00e9", "\u00e9" * 2, "\u00e9" * 3]


@pytest.mark.parametrize(
    ("encoding", "body", "message"),
    [
        pytest.param(
            "zstd",
            b"\x28\xb5\x2f\xfd",
            "answered Content-Encoding 'zstd', which the client",
            id="unknown",
        ),
        pytest.param(
            "gzip", b"not gzip at all", "answered a body that is not valid gzip", id="corrupt"
        ),
    ],
)
async def test_a_body_that_cannot_be_decoded_stops_the_source(
    client: httpx.AsyncClient, encoding: str, body: bytes, message: str
) -> None:
    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream(content_encoding=encoding)
        await conn.send(body)
        await conn.hold()

    async with serve(sse(script)) as server:
        with pytest.raises(EventSourceError, match=re.escape(message)):
            async with EventSource(server.url(), client=client, **FAST) as source:
                await take(source, 1)
        assert server.counters.accepted == 1


async def test_a_long_event_in_small_writes(client: httpx.AsyncClient) -> None:
    size = 4 * 1024 * 1024

    async def script(request: Request, conn: Connection) -> None:
        await conn.start_stream()
        await conn.send(b"data: ")
        piece = b"x" * 4096
        for _ in range(size // 4096):
            await conn.send(piece)
        await conn.send(b"\n\n")
        await conn.hold()

    async with serve(sse(script)) as server:
        async with EventSource(server.url(), client=client, **FAST) as source:
            with anyio.fail_after(30):
                event = await source.__anext__()
        assert event.data == "x" * size


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
