"""Several sessions on one HTTP stream: the wire format, the cursor as Last-Event-ID.

Real uvicorn and aiohttp servers, raw sockets, and a real redis-server for the
Redis test: what a browser's EventSource would see and send back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import quote

import anyio
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, Query

from sse_broadcaster import BroadcasterConfig, EventBroadcaster
from sse_broadcaster._adapter import MAX_LAST_EVENT_ID
from sse_broadcaster._multi import max_cursor_length, parse_cursor
from sse_broadcaster._sources import MultiSource, multi_frame_data
from sse_broadcaster.starlette import EventSourceResponse, lifespan

from .support.servers import RawStream, open_raw, run_aiohttp, run_uvicorn
from .support.sse_parser import ParsedEvent, SSEParser

pytestmark = pytest.mark.anyio

ADAPTERS = ("starlette", "aiohttp")
SESSIONS = ("a", "b", "c")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn and aiohttp run on asyncio only


def make_app(adapter: str, broadcaster: EventBroadcaster, **options: Any) -> Any:
    """``/events`` (the convenience route) and ``/own`` (a handler's own response)."""
    if adapter == "starlette":
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.routing import Route

        from sse_broadcaster.starlette import EventSourceResponse, lifespan, sse_multi_endpoint

        async def own(request: Request) -> EventSourceResponse:
            multi = broadcaster.subscribe_many(
                request.query_params.getlist("session"),
                cursor=request.headers.get("last-event-id"),
            )
            return EventSourceResponse(multi)

        return Starlette(
            routes=[
                Route("/events", sse_multi_endpoint(broadcaster, **options)),
                Route("/own", own),
            ],
            lifespan=lifespan(broadcaster),
        )
    from aiohttp import web

    from sse_broadcaster.aiohttp import EventSourceResponse as AiohttpResponse
    from sse_broadcaster.aiohttp import setup, sse_multi_handler

    async def own_handler(request: web.Request) -> web.StreamResponse:
        multi = broadcaster.subscribe_many(
            request.query.getall("session", []), cursor=request.headers.get("Last-Event-ID")
        )
        return AiohttpResponse(multi)

    app = web.Application()
    app.router.add_get("/events", sse_multi_handler(broadcaster, **options))
    app.router.add_get("/own", own_handler)
    setup(app, broadcaster)
    return app


@asynccontextmanager
async def serve(adapter: str, broadcaster: EventBroadcaster, **options: Any) -> AsyncIterator[str]:
    app = make_app(adapter, broadcaster, **options)
    if adapter == "starlette":
        async with run_uvicorn(app) as running:
            yield running.base_url
    else:
        async with run_aiohttp(app) as running:
            yield running.base_url


def query(sessions: tuple[str, ...] | list[str]) -> str:
    return "&".join(f"session={quote(s)}" for s in sessions)


class Reader:
    """Parses one raw response as a browser would; keeps the events not yet taken."""

    def __init__(self, raw: RawStream) -> None:
        self.raw = raw
        self.parser = SSEParser()
        self.pending: list[ParsedEvent] = []

    async def _more(self) -> None:
        chunk = await self.raw.read_chunk()
        if not chunk:
            raise anyio.EndOfStream
        self.pending += self.parser.feed(chunk)

    async def take(self, n: int) -> list[ParsedEvent]:
        while len(self.pending) < n:
            await self._more()
        taken, self.pending = self.pending[:n], self.pending[n:]
        return taken

    async def cursor(self) -> str:
        """The last event id once the stream has set one (the opening id-only message)."""
        while not self.parser.last_event_id:
            await self._more()
        return self.parser.last_event_id


def items(events: list[ParsedEvent]) -> list[tuple[str, str]]:
    """(session, data) of each event, checking the envelope on the way."""
    result = []
    for event in events:
        assert event.type != "gap", event
        envelope = json.loads(event.data)
        assert set(envelope) == {"session", "data"}, envelope
        result.append((envelope["session"], envelope["data"]))
    return result


def assert_same(got: list[tuple[str, str]], expected: list[tuple[str, str]]) -> None:
    """The same events, each exactly once, and each session's in publish order.

    Across sessions the order is the merge by timestamp, best effort (ties).
    """
    assert sorted(got) == sorted(expected)
    assert len(set(got)) == len(got)
    for session in {s for s, _ in expected}:
        assert [d for s, d in got if s == session] == [d for s, d in expected if s == session]


async def publish_round(
    broadcaster: EventBroadcaster, tag: str, n: int = 1
) -> list[tuple[str, str]]:
    published = []
    for i in range(n):
        for session in SESSIONS:
            data = f"{tag}{i}-{session}"
            await broadcaster.publish(session, data)
            published.append((session, data))
    return published


# -- the wire format --------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_wire_format(adapter: str) -> None:
    broadcaster = EventBroadcaster()
    async with (
        serve(adapter, broadcaster) as base,
        open_raw(base, f"/events?{query(SESSIONS)}") as raw,
    ):
        assert raw.status == 200
        assert raw.headers["content-type"].startswith("text/event-stream")
        reader = Reader(raw)
        opening = await reader.cursor()
        # Nothing dispatched yet: the opening message only sets the cursor.
        assert reader.pending == []
        positions = parse_cursor(opening, SESSIONS, 16)
        assert all(positions[s] is not None for s in SESSIONS), opening

        sent = [
            await broadcaster.publish("a", "hello", event="chat"),
            await broadcaster.publish("b", "two\nlines"),
            await broadcaster.publish("c", "ü"),
        ]
        events = await reader.take(3)
    assert [e.type for e in events] == ["chat", "message", "message"]
    assert items(events) == [("a", "hello"), ("b", "two\nlines"), ("c", "ü")]
    for i, event in enumerate(events):
        # Every event carries the cursor as of after it: its own session's
        # position is the event, the others' are as of then.
        positions = parse_cursor(event.last_event_id, SESSIONS, 16)
        for j, session in enumerate(SESSIONS):
            expected = sent[j].id if j <= i else parse_cursor(opening, SESSIONS, 16)[session]
            assert positions[session] == expected, (i, session, event.last_event_id)


async def test_frame_cursor_equals_multi_cursor_and_escapes_lone_surrogates() -> None:
    async with EventBroadcaster() as broadcaster:
        sessions = ["x", "y\ud800"]  # a lone surrogate is a valid session id
        async with broadcaster.subscribe_many(sessions) as multi:
            source = MultiSource(multi)
            source.start()
            for i in range(3):
                for session in sessions:
                    await broadcaster.publish(session, f"{i}")
            framed = source.frame(multi.drain_nowait())
            assert len(framed) == 6
            assert source.cursor() == multi.cursor
            last = framed[-1].encode().decode()
            assert last.startswith(f"id: {multi.cursor}\n")
            envelope = json.loads(last.split("data: ", 1)[1])
            assert envelope == {"session": "y\ud800", "data": "2"}
    assert json.loads(multi_frame_data("s\ud800", "d")) == {"session": "s\ud800", "data": "d"}


async def test_framed_data_is_json_whatever_the_data() -> None:
    tricky = 'q"uote \\ back\tslash \x01\x1f \u2028 \u00fc\U0001f600 \r\n end'
    async with EventBroadcaster() as broadcaster, broadcaster.subscribe_many(["s"]) as multi:
        source = MultiSource(multi)
        source.start()
        await broadcaster.publish("s", tricky, event="name", retry=100)
        (framed,) = source.frame(multi.drain_nowait())
    lines = framed.encode().decode().split("\n")
    assert lines[1:3] == ["event: name", "retry: 100"]
    assert lines[3].startswith("data: ")
    assert lines[4:] == ["", ""]  # one data line, then the blank line
    envelope = json.loads(lines[3].removeprefix("data: "))
    # The published data exactly, CR included (JSON escapes it; a bare data:
    # field could only carry LF).
    assert envelope == {"session": "s", "data": tricky}


# -- resuming ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/events", "/own"])
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_resume_from_any_event_of_a_batch(adapter: str, path: str) -> None:
    """The id of an event in the middle of one write resumes right after that event."""
    broadcaster = EventBroadcaster()
    async with serve(adapter, broadcaster) as base:
        async with open_raw(base, f"{path}?{query(SESSIONS)}") as raw:
            reader = Reader(raw)
            await reader.cursor()
            # No await between them: one burst, written in as few writes as it takes.
            before = await publish_round(broadcaster, "r", 4)
            first = await reader.take(len(before))
        assert_same(items(first), before)
        cut = 5  # the client dropped after dispatching 6 of 12 events
        cursor = first[cut].last_event_id
        while_away = await publish_round(broadcaster, "w", 2)
        async with open_raw(base, f"{path}?{query(SESSIONS)}", {"Last-Event-ID": cursor}) as raw:
            reader = Reader(raw)
            expected = items(first)[cut + 1 :] + while_away
            resumed = await reader.take(len(expected))
            assert_same(items(resumed), expected)  # items() also refuses a gap event
            live = await publish_round(broadcaster, "l")
            assert_same(items(await reader.take(3)), live)


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_opening_cursor_resumes_a_quiet_stream(adapter: str) -> None:
    """A client that got no event yet resumes from the opening id: nothing missed."""
    broadcaster = EventBroadcaster()
    async with serve(adapter, broadcaster) as base:
        async with open_raw(base, f"/events?{query(SESSIONS)}") as raw:
            opening = await Reader(raw).cursor()
        published = await publish_round(broadcaster, "q")
        async with open_raw(base, f"/events?{query(SESSIONS)}", {"Last-Event-ID": opening}) as raw:
            assert_same(items(await Reader(raw).take(3)), published)


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_cursor_longer_than_the_single_session_cap_resumes(adapter: str) -> None:
    sessions = [f"room-{i:02d}" for i in range(16)]
    broadcaster = EventBroadcaster()
    async with serve(adapter, broadcaster) as base:
        for session in sessions:
            for i in range(12):
                await broadcaster.publish(session, f"{session}/{i}")
        async with open_raw(base, f"/events?{query(sessions)}") as raw:
            cursor = await Reader(raw).cursor()
        assert MAX_LAST_EVENT_ID < len(cursor) <= max_cursor_length(16)
        await broadcaster.publish("room-07", "after")
        async with open_raw(base, f"/events?{query(sessions)}", {"Last-Event-ID": cursor}) as raw:
            assert items(await Reader(raw).take(1)) == [("room-07", "after")]
        # The lastEventId query parameter (EventSource polyfills, a reloaded page) too.
        url = f"/events?{query(sessions)}&lastEventId={quote(cursor)}"
        async with open_raw(base, url) as raw:
            assert items(await Reader(raw).take(1)) == [("room-07", "after")]


# -- hostile cursors -----------------------------------------------------------------------


def _hostile(kind: str, good: str) -> tuple[str, bool]:
    """A Last-Event-ID of that kind (latin-1 str: one char per byte) and whether it is invalid."""
    cap = max_cursor_length(16)
    if kind == "huge":
        return "m1." + "0" * 6000, True  # under aiohttp's 8190-byte header limit
    if kind in ("at-the-cap", "one-over-the-cap"):
        # Well-formed entries of no session of the request, as long as a cursor may be.
        at_cap = "m1." + ",".join(f"{i:08x}" + "1" * 64 for i in range(16))
        assert len(at_cap) == cap
        return (at_cap, False) if kind == "at-the-cap" else (at_cap + ",", True)
    if kind == "not-utf-8":
        return good[:-2] + "\xff\xfe", True
    if kind == "wrong-version":
        return "m2." + good.removeprefix("m1."), False
    if kind == "other-sessions":
        return good, False  # a cursor of the sessions x, y, z
    if kind == "malformed":
        return good + ",zz", False
    if kind == "empty-body":
        return "m1.", False
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "huge",
        "at-the-cap",
        "one-over-the-cap",
        "not-utf-8",
        "wrong-version",
        "other-sessions",
        "malformed",
        "empty-body",
    ],
)
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_hostile_cursor_is_a_gap_for_every_session(adapter: str, kind: str) -> None:
    broadcaster = EventBroadcaster()
    async with serve(adapter, broadcaster) as base:
        retained = await publish_round(broadcaster, "h", 2)
        own = ("x", "y", "z") if kind == "other-sessions" else SESSIONS
        async with open_raw(base, f"/events?{query(own)}") as raw:
            good = await Reader(raw).cursor()
        header, invalid = _hostile(kind, good)
        async with open_raw(base, f"/events?{query(SESSIONS)}", {"Last-Event-ID": header}) as raw:
            assert raw.status == 200
            reader = Reader(raw)
            gaps = await reader.take(3)
            replay = await reader.take(len(retained))
    assert [g.type for g in gaps] == ["gap"] * 3
    payloads = [json.loads(g.data) for g in gaps]
    assert [p["session"] for p in payloads] == list(SESSIONS)
    for payload in payloads:
        assert payload["lastEventId"] is None
        assert payload["replayed"] == 2
        assert payload.get("invalid", False) is invalid
        # No gap event echoes the hostile header.
    assert_same(items(replay), retained)
    assert all(g.last_event_id == "" for g in gaps)  # a gap carries no id


# -- the convenience route's requests ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/events", 400, "at least one session"),
        ("/events?session=a&session=a", 400, "more than once"),
        ("/events?" + query([f"s{i}" for i in range(17)]), 400, "max_sessions_per_subscription"),
        ("/events?session=a&session=%01", 400, "control character"),
        (f"/events?session=a&session={'x' * 300}", 400, "at most 256"),
        ("/events?session=a&session=secret", 403, "forbidden"),
    ],
)
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_bad_requests(adapter: str, path: str, status: int, says: str) -> None:
    asked: list[str] = []

    async def authorize(request: Any, session_id: str) -> bool:
        asked.append(session_id)
        return session_id != "secret"

    broadcaster = EventBroadcaster()
    async with serve(adapter, broadcaster, authorize=authorize) as base:
        async with open_raw(base, path) as raw:
            assert raw.status == status
            assert says in (await raw.read_body()).decode()
        assert broadcaster.subscriber_count("a") == 0
    if status == 403:
        assert asked == ["a", "secret"]  # every session is asked, in order
    else:
        assert asked == []  # a bad request never reaches authorize


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_subscriber_limit_says_come_back_later(adapter: str) -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig(max_subscribers_per_session=1))
    async with (
        serve(adapter, broadcaster) as base,
        open_raw(base, "/events?session=b") as first,
    ):
        await Reader(first).cursor()
        async with open_raw(base, f"/events?{query(SESSIONS)}") as raw:
            assert raw.status == 200
            assert "retry-after" in raw.headers
            assert (await raw.read_body()).startswith(b"retry: ")
        # The sessions entered before the full one were left again.
        assert broadcaster.subscriber_count("a") == 0


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_one_session_closed_ends_the_stream_and_the_rest_resume(adapter: str) -> None:
    broadcaster = EventBroadcaster()
    async with serve(adapter, broadcaster) as base:
        async with open_raw(base, f"/events?{query(SESSIONS)}") as raw:
            reader = Reader(raw)
            await reader.cursor()
            first = await publish_round(broadcaster, "f")
            got = await reader.take(3)
            assert_same(items(got), first)
            broadcaster.disconnect_subscribers("b")
            with anyio.fail_after(10):
                with pytest.raises(anyio.EndOfStream):
                    await reader.take(1)
        later = await publish_round(broadcaster, "g")
        headers = {"Last-Event-ID": got[-1].last_event_id}
        async with open_raw(base, f"/events?{query(SESSIONS)}", headers) as raw:
            assert_same(items(await Reader(raw).take(3)), later)


# -- plain ASGI and FastAPI ----------------------------------------------------------------


async def test_plain_asgi_response() -> None:
    from sse_broadcaster.asgi import EventSourceResponse

    broadcaster = EventBroadcaster()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope["headers"])
        cursor = headers.get(b"last-event-id", b"").decode("latin-1") or None
        multi = broadcaster.subscribe_many(["a", "b"], cursor=cursor)
        await EventSourceResponse(multi, flush_window=0)(scope, receive, send)

    async with broadcaster, run_uvicorn(app, lifespan="off") as running:
        async with open_raw(running.base_url, "/") as raw:
            reader = Reader(raw)
            await reader.cursor()
            await broadcaster.publish("a", "1")
            await broadcaster.publish("b", "2")
            got = await reader.take(2)
        assert items(got) == [("a", "1"), ("b", "2")]
        await broadcaster.publish("a", "3")
        headers = {"Last-Event-ID": got[0].last_event_id}
        async with open_raw(running.base_url, "/", headers) as raw:
            assert_same(items(await Reader(raw).take(2)), [("b", "2"), ("a", "3")])


async def readable_rooms(room: Annotated[list[str], Query()]) -> list[str]:
    """A dependency: the rooms of the query this user may read."""
    if "secret" in room:
        raise HTTPException(403, "forbidden")
    return room


def fastapi_app(broadcaster: EventBroadcaster) -> FastAPI:
    """The docs' FastAPI example, as written there (at module level: FastAPI resolves
    the string annotations in the module's globals)."""
    app = FastAPI(lifespan=lifespan(broadcaster))

    @app.get("/rooms/events", response_class=EventSourceResponse)
    async def room_events(
        rooms: Annotated[list[str], Depends(readable_rooms)],
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> EventSourceResponse:
        try:
            multi = broadcaster.subscribe_many(rooms, cursor=last_event_id)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return EventSourceResponse(multi)

    return app


async def test_fastapi_path_operation_with_depends() -> None:
    broadcaster = EventBroadcaster()
    app = fastapi_app(broadcaster)
    async with run_uvicorn(app) as running:
        base = running.base_url
        async with open_raw(base, "/rooms/events?room=a&room=secret") as raw:
            assert raw.status == 403
        async with open_raw(base, "/rooms/events?room=a&room=a") as raw:
            assert raw.status == 400
        async with open_raw(base, "/rooms/events?room=a&room=b") as raw:
            reader = Reader(raw)
            await reader.cursor()
            await broadcaster.publish("b", "1")
            got = await reader.take(1)
        await broadcaster.publish("a", "2")
        headers = {"Last-Event-ID": got[0].last_event_id}
        async with open_raw(base, "/rooms/events?room=b&room=a", headers) as raw:
            assert items(await Reader(raw).take(1)) == [("a", "2")]


# -- Redis ------------------------------------------------------------------------------------


async def test_redis_multi_stream_resumes_exactly(redis_server: str) -> None:
    from sse_broadcaster.redis import RedisBackend

    backend = RedisBackend(redis_server, prefix=f"multi-{uuid.uuid4().hex}:")
    broadcaster = EventBroadcaster(backend=backend)
    async with serve("starlette", broadcaster) as base:
        path = f"/events?{query(SESSIONS)}"
        async with open_raw(base, path) as raw:
            reader = Reader(raw)
            opening = await reader.cursor()
            first = await publish_round(broadcaster, "r", 3)
            got = await reader.take(len(first))
        assert_same(items(got), first)
        away = await publish_round(broadcaster, "w", 2)
        async with open_raw(base, path, {"Last-Event-ID": got[4].last_event_id}) as raw:
            expected = items(got)[5:] + away
            resumed = await Reader(raw).take(len(expected))
            assert_same(items(resumed), expected)  # items() also refuses a gap event
        # The opening cursor (before any event) replays everything since, no gap.
        async with open_raw(base, path, {"Last-Event-ID": opening}) as raw:
            everything = first + away
            replayed = await Reader(raw).take(len(everything))
            assert_same(items(replayed), everything)


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_keepalive_and_shutdown_reach_a_multi_stream(adapter: str) -> None:
    """The watchdog wakes a multi-stream for its ping; close_streams ends it."""
    from sse_broadcaster.asgi import close_streams, open_streams

    broadcaster = EventBroadcaster(BroadcasterConfig(keepalive_interval=0.2))
    async with (
        serve(adapter, broadcaster) as base,
        open_raw(base, f"/events?{query(SESSIONS)}") as raw,
    ):
        body = b""
        with anyio.fail_after(10):
            while b": ping\n\n" not in body:
                body += await raw.read_chunk()
        assert open_streams(broadcaster) == 1
        close_streams(broadcaster)
        with anyio.fail_after(10):
            await raw.read_body()  # the server ends the body
        assert open_streams(broadcaster) == 0
        assert broadcaster.subscriber_count("a") == 0
