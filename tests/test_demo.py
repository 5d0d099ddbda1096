"""The demo server (`python -m sse_broadcaster.demo`) through a real uvicorn server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from importlib.resources import files

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from sse_broadcaster import BroadcasterConfig
from sse_broadcaster.demo import DEFAULT_ROOM, create_app
from sse_broadcaster.demo.__main__ import main, parse_args

from .support.demo_server import serve_demo, sse_events
from .support.redis_server import RedisServer
from .support.servers import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    # The demo's uvicorn server runs in the test's event loop, and uvicorn runs
    # on asyncio only. The app itself is anyio code; the adapter tests cover trio.
    return "asyncio"


TICK = 0.05
CONFIG = BroadcasterConfig(retry_ms=100, keepalive_interval=1.0, max_event_bytes=1024)


@pytest.fixture(scope="module")
async def url() -> AsyncIterator[str]:
    async with serve_demo(CONFIG, ticker_interval=TICK) as base:
        yield base


@pytest.fixture
async def client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client


def _n(event_id: str) -> int:
    return int(event_id.rpartition("-")[2])


# -- page and static files ----------------------------------------------------------------


def test_static_files_are_package_data() -> None:
    static = files("sse_broadcaster.demo").joinpath("static")
    for name in ("index.html", "app.js", "style.css", "run.html", "run.js", "run.css"):
        assert static.joinpath(name).is_file(), name


async def test_page(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert f'content="{DEFAULT_ROOM}"' in page.text
    assert "<canvas" in page.text
    # No CDN: every script and stylesheet comes from this server.
    assert not re.search(r'(src|href)="(https?:)?//', page.text)
    script = await client.get("/static/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "new EventSource(" in script.text
    style = await client.get("/static/style.css")
    assert style.headers["content-type"].startswith("text/css")
    missing = await client.get("/static/nope.js")
    assert missing.status_code == 404


# -- the stream, the ticker and publish -----------------------------------------------------


async def test_ticker_feeds_the_default_room(client: httpx.AsyncClient) -> None:
    ids: list[str] = []
    async with aconnect_sse(client, "GET", f"/events/{DEFAULT_ROOM}") as source:
        assert source.response.headers["content-type"] == "text/event-stream; charset=utf-8"
        async with sse_events(source) as events:
            async for sse in events:
                assert sse.event == "tick"
                assert set(json.loads(sse.data)) == {"tick", "time"}
                ids.append(sse.id)
                if len(ids) == 3:
                    break
    assert [_n(i) for i in ids] == list(range(_n(ids[0]), _n(ids[0]) + 3))


@pytest.mark.parametrize(
    ("kwargs", "data", "event"),
    [
        pytest.param(
            {"json": {"data": {"text": "hi"}, "event": "chat"}},
            '{"text":"hi"}',
            "chat",
            id="json-object",
        ),
        pytest.param({"json": {"data": "plain"}}, "plain", "message", id="json-string-no-event"),
        pytest.param({"json": {"data": "x", "event": None}}, "x", "message", id="json-null-event"),
        pytest.param(
            {"data": {"data": "from a form", "event": "chat"}}, "from a form", "chat", id="form"
        ),
        pytest.param(
            {"data": {"data": "two\nlines", "event": ""}},
            "two\nlines",
            "message",
            id="form-empty-event",
        ),
    ],
)
async def test_publish(
    client: httpx.AsyncClient, kwargs: dict[str, object], data: str, event: str
) -> None:
    room = "publish-room"
    async with aconnect_sse(client, "GET", f"/events/{room}") as source:
        answer = await client.post(f"/publish/{room}", **kwargs)  # type: ignore[arg-type]
        assert answer.status_code == 200, answer.text
        published_id = answer.json()["id"]
        assert re.fullmatch(r"\S+-\d+", published_id)
        async with sse_events(source) as events:
            async for sse in events:
                assert (sse.id, sse.event, sse.data) == (published_id, event, data)
                break


OVERSIZED = "x" * 1500  # over max_event_bytes=1024, under the 2048-byte body limit


@pytest.mark.parametrize(
    ("room", "kwargs", "status", "message"),
    [
        pytest.param(
            "r",
            {"content": b"{bad", "headers": {"content-type": "application/json"}},
            400,
            "malformed JSON body",
            id="malformed-json",
        ),
        pytest.param(
            "r",
            {"content": b"\xff", "headers": {"content-type": "application/json"}},
            400,
            "JSON body is not valid UTF-8",
            id="json-not-utf8",
        ),
        pytest.param("r", {"json": [1, 2]}, 400, "JSON body must be an object", id="json-array"),
        pytest.param(
            "r", {"json": {"event": "chat"}}, 400, "missing field 'data'", id="missing-data"
        ),
        pytest.param(
            "r",
            {"json": {"data": 1, "colour": "red"}},
            400,
            "unknown field(s) 'colour'",
            id="unknown-field",
        ),
        pytest.param(
            "r",
            {"json": {"data": 1, "event": 5}},
            400,
            "field 'event' must be a string",
            id="event-not-string",
        ),
        pytest.param(
            "r",
            {"json": {"data": 1, "event": "a\nb"}},
            400,
            "event must not contain CR, LF or NUL",
            id="event-line-break",
        ),
        pytest.param(
            "r", {"data": {"event": "chat"}}, 400, "missing field 'data'", id="form-missing-data"
        ),
        pytest.param(
            "r",
            {
                "content": b"data=%ff",
                "headers": {"content-type": "application/x-www-form-urlencoded"},
            },
            400,
            "not valid UTF-8",
            id="form-not-utf8",
        ),
        pytest.param(
            "r",
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported content type 'text/plain'",
            id="text-plain",
        ),
        pytest.param(
            "r",
            {"files": {"data": b"x"}},
            415,
            "unsupported content type 'multipart/form-data'",
            id="multipart",
        ),
        pytest.param("r", {"content": b""}, 415, "no Content-Type", id="no-content-type"),
        pytest.param(
            "r", {"json": {"data": OVERSIZED}}, 413, "max_event_bytes", id="event-too-large"
        ),
        pytest.param(
            "r",
            {"json": {"data": "x" * 5000}},
            413,
            "request body is larger than 2048 bytes",
            id="body-too-large",
        ),
        pytest.param(
            "r" * 257,
            {"json": {"data": 1}},
            400,
            "invalid room id: session_id must be at most 256",
            id="room-too-long",
        ),
        pytest.param(
            "a%01b",
            {"json": {"data": 1}},
            400,
            "invalid room id: session_id must not contain control",
            id="room-control-char",
        ),
    ],
)
async def test_publish_bad_input(
    client: httpx.AsyncClient, room: str, kwargs: dict[str, object], status: int, message: str
) -> None:
    answer = await client.post(f"/publish/{room}", **kwargs)  # type: ignore[arg-type]
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert message in answer.json()["error"]


async def test_publish_body_too_large_without_content_length(client: httpx.AsyncClient) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    answer = await client.post(
        "/publish/r",
        content=body(),
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 413
    assert "larger than 2048 bytes" in answer.json()["error"]


async def test_publish_only_accepts_post(client: httpx.AsyncClient) -> None:
    assert (await client.get("/publish/r")).status_code == 405


# -- hostile bodies, on the default limits (max_event_bytes 65536, bodies up to 131072) ----


@pytest.fixture(scope="module")
async def default_url() -> AsyncIterator[str]:
    async with serve_demo(BroadcasterConfig(), ticker_interval=None) as base:
        yield base


@pytest.fixture
async def default_client(default_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=default_url, timeout=30) as client:
        yield client


def _json(body: bytes | str) -> dict[str, object]:
    content = body.encode() if isinstance(body, str) else body
    return {"content": content, "headers": {"content-type": "application/json"}}


def _form(body: str) -> dict[str, object]:
    return {"content": body.encode(), "headers": {"content-type": _FORM}}


_FORM = "application/x-www-form-urlencoded"
DEEP = 60_000  # the JSON parser's recursion runs out far sooner; the body is 120 kB


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        pytest.param(
            _json('{"data": ' + "1" * 5000 + "}"),
            400,
            "JSON body has an integer of 5000 digits: at most 4300",
            id="int-5000-digits",
        ),
        pytest.param(
            _json('{"data": -' + "9" * 4301 + "}"),
            400,
            "JSON body has an integer of 4301 digits: at most 4300",
            id="negative-int-4301-digits",
        ),
        pytest.param(
            _json('{"data": ' + "[" * DEEP + "]" * DEEP + "}"),
            400,
            "JSON body nests deeper than 64 levels",
            id="deep-lists",
        ),
        pytest.param(
            _json('{"data": ' + '{"a":' * (DEEP // 3) + "1" + "}" * (DEEP // 3) + "}"),
            400,
            "JSON body nests deeper than 64 levels",
            id="deep-objects",
        ),
        pytest.param(
            _json('{"data": ' + "[" * 64 + "]" * 64 + "}"),
            400,
            "JSON body nests deeper than 64 levels",
            id="depth-65",
        ),
        pytest.param(_json('{"data": NaN}'), 400, "JSON body has NaN", id="nan"),
        pytest.param(_json('{"data": [Infinity]}'), 400, "JSON body has Infinity", id="infinity"),
        pytest.param(
            _json('{"data": -Infinity}'), 400, "JSON body has -Infinity", id="minus-infinity"
        ),
        pytest.param(
            _json('{"data": 1e999}'),
            400,
            "JSON body has a number out of range: '1e999'",
            id="float-overflow",
        ),
        pytest.param(
            _json('{"data": 1, "data": 2}'),
            400,
            "JSON body has the key 'data' twice in one object",
            id="duplicate-key",
        ),
        pytest.param(
            _json('{"data": {"a": 1, "a": 2}}'),
            400,
            "JSON body has the key 'a' twice in one object",
            id="duplicate-nested-key",
        ),
        pytest.param(
            _json(b'{"data": "caf\xe9"}'),
            400,
            "JSON body is not valid UTF-8",
            id="latin-1-bytes",
        ),
        pytest.param(
            _json('{"data": "x"}'.encode("utf-16")),
            400,
            "JSON body is not valid UTF-8",
            id="utf-16",
        ),
        pytest.param(_json(b""), 400, "malformed JSON body", id="empty-json"),
        pytest.param(_json('"just a string"'), 400, "got a string", id="json-string"),
        pytest.param(_json("null"), 400, "got null", id="json-null"),
        pytest.param(_json("42"), 400, "got a number", id="json-number"),
        pytest.param(
            {
                "content": b'{"data": 1}',
                "headers": {"content-type": "application/json; charset=latin-1"},
            },
            415,
            "charset 'latin-1' is not supported: send UTF-8",
            id="json-charset-latin-1",
        ),
        pytest.param(
            _json('{"data": 1, "event": "a\\rb"}'),
            400,
            "event must not contain CR, LF or NUL",
            id="event-cr",
        ),
        pytest.param(
            _json('{"data": 1, "event": "\\ud800"}'),
            400,
            "field 'event' is not valid Unicode (a lone surrogate)",
            id="event-lone-surrogate",
        ),
        pytest.param(
            _json('{"data": "\\udc00"}'),
            400,
            "data is not encodable as UTF-8",
            id="data-lone-surrogate",
        ),
        pytest.param(
            _json('{"data": 1, "event": ["chat"]}'),
            400,
            "field 'event' must be a string or null, got ['chat']",
            id="event-list",
        ),
        pytest.param(
            _json('{"data": "' + "x" * 100_000 + '"}'),
            413,
            "exceeds max_event_bytes=65536",
            id="event-too-large",
        ),
        pytest.param(
            _json('{"data": "' + "x" * 140_000 + '"}'),
            413,
            "request body is larger than 131072 bytes",
            id="body-too-large",
        ),
        pytest.param(
            _form("data=a&data=b"),
            400,
            "form field 'data' given more than once",
            id="form-repeated-data",
        ),
        pytest.param(
            _form("data=a&event=x&event=y"),
            400,
            "form field 'event' given more than once",
            id="form-repeated-event",
        ),
        pytest.param(
            _form("data=a&event=x%0D%0Ay"),
            400,
            "event must not contain CR, LF or NUL",
            id="form-event-crlf",
        ),
        pytest.param(
            {"content": b"data=a", "headers": {"content-type": _FORM + "; charset=iso-8859-1"}},
            415,
            "charset 'iso-8859-1' is not supported: send UTF-8",
            id="form-charset",
        ),
        pytest.param(
            {"content": b"data=a", "headers": {"content-type": "application/json-seq"}},
            415,
            "unsupported content type 'application/json-seq'",
            id="json-seq",
        ),
    ],
)
async def test_publish_hostile_body(
    default_client: httpx.AsyncClient, kwargs: dict[str, object], status: int, message: str
) -> None:
    room = "hostile"
    async with aconnect_sse(default_client, "GET", f"/events/{room}") as source:
        answer = await default_client.post(f"/publish/{room}", **kwargs)  # type: ignore[arg-type]
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert message in answer.json()["error"], answer.json()["error"]
        # Nothing was published: the next event on the stream is the marker.
        marker = await default_client.post(f"/publish/{room}", json={"data": "marker"})
        async with sse_events(source) as events:
            async for sse in events:
                assert (sse.id, sse.data) == (marker.json()["id"], "marker")
                break


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param(
            _json('{"data": 1, "' + "k" * 20_000 + '": 2}'),
            "unknown field(s) 'kkkk",
            id="long-unknown-field",
        ),
        pytest.param(
            _json("{" + ", ".join(f'"f{n}": {n}' for n in range(2000)) + ', "data": 1}'),
            "unknown field(s) 'f0', 'f1', 'f10', 'f100', 'f1000', ...: use data, event",
            id="many-unknown-fields",
        ),
        pytest.param(
            _json('{"data": {"' + "k" * 20_000 + '": 1, "' + "k" * 20_000 + '": 2}}'),
            "JSON body has the key 'kkkk",
            id="long-duplicate-key",
        ),
        pytest.param(
            _json('{"data": 1, "event": [' + "1," * 20_000 + "1]}"),
            "field 'event' must be a string or null, got [1, 1,",
            id="long-event-value",
        ),
        pytest.param(
            {"content": b"x", "headers": {"content-type": "text/" + "x" * 5000}},
            "unsupported content type 'text/xxx",
            id="long-content-type",
        ),
    ],
)
async def test_error_messages_echo_little(
    default_client: httpx.AsyncClient, kwargs: dict[str, object], message: str
) -> None:
    answer = await default_client.post("/publish/r", **kwargs)  # type: ignore[arg-type]
    assert 400 <= answer.status_code < 500, answer.text[:300]
    error = answer.json()["error"]
    assert message in error, error
    assert len(error) < 300, error


@pytest.mark.parametrize(
    ("body", "data"),
    [
        pytest.param('{"data": ' + "[" * 63 + "]" * 63 + "}", "[" * 63 + "]" * 63, id="depth-64"),
        pytest.param(
            '{"data": "' + "[" * 5000 + '{"}', "[" * 5000 + "{", id="brackets-in-a-string"
        ),
        pytest.param(
            '{"data": ["\\"[[[[", "\\\\", "]]]]]"]}',
            '["\\"[[[[","\\\\","]]]]]"]',
            id="escaped-quotes-and-brackets",
        ),
        pytest.param('{"data": ' + "9" * 4300 + "}", "9" * 4300, id="int-4300-digits"),
        pytest.param('{"data": 1e308}', "1e+308", id="largest-floats"),
        pytest.param('\ufeff{"data": "bom"}', "bom", id="utf-8-bom"),
        pytest.param('{"data": "caf\u00e9 \u2603"}', "caf\u00e9 \u2603", id="non-ascii"),
    ],
)
async def test_publish_edge_bodies_that_are_fine(
    default_client: httpx.AsyncClient, body: str, data: str
) -> None:
    room = "edge-ok"
    async with aconnect_sse(default_client, "GET", f"/events/{room}") as source:
        answer = await default_client.post(f"/publish/{room}", **_json(body))  # type: ignore[arg-type]
        assert answer.status_code == 200, answer.text
        async with sse_events(source) as events:
            async for sse in events:
                assert (sse.id, sse.data) == (answer.json()["id"], data)
                break


@pytest.mark.parametrize(
    "content_length",
    ["\u00b2", "-1", "1" * 5000, "99999999999999999999999"],
    ids=["superscript-two", "negative", "5000-digits", "huge"],
)
async def test_publish_bad_content_length(default_url: str, content_length: str) -> None:
    # A raw request: httpx would not send a Content-Length that is not the body's.
    host, _, port = default_url.removeprefix("http://").partition(":")
    body = b'{"data": 1}'
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(
            b"POST /publish/r HTTP/1.1\r\nHost: "
            + f"{host}:{port}".encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + content_length.encode("latin-1")
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        answer = b""
        with anyio.fail_after(10):
            try:
                while True:
                    answer += await stream.receive()
            except anyio.EndOfStream:
                pass
    status_line = answer.partition(b"\r\n")[0]
    assert re.fullmatch(rb"HTTP/1\.1 4\d\d .*", status_line), answer[:300]


# -- stats and metrics --------------------------------------------------------------------


async def test_stats(client: httpx.AsyncClient) -> None:
    await client.post("/publish/stats-room", json={"data": "counted"})
    stats = (await client.get("/stats")).json()
    for key in ("memoryUsageMB", "totalSessions", "totalSubscribers", "totalEvents", "cleanup"):
        assert key in stats
    assert stats["totalSessions"] >= 2  # the ticker's room and this one
    assert stats["memoryUsageMB"] > 0


async def test_metrics(client: httpx.AsyncClient) -> None:
    answer = await client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    samples = [line for line in answer.text.splitlines() if line and not line.startswith("#")]
    assert samples
    for line in samples:
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [-+0-9.eEnaNIf]+", line), line


# -- admin routes: the server ends streams ----------------------------------------------


async def _read_until_end(
    client: httpx.AsyncClient, room: str, last_id: str | None, stop_after: int
) -> tuple[list[str], list[str]]:
    """Read a stream; after `stop_after` events end the room's streams and read to the end."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    ids: list[str] = []
    names: list[str] = []
    async with (
        aconnect_sse(client, "GET", f"/events/{room}", headers=headers) as source,
        sse_events(source) as events,
    ):
        async for sse in events:
            names.append(sse.event)
            if sse.event != "gap":
                ids.append(sse.id)
            if len(ids) == stop_after:
                answer = await client.post(f"/admin/drop-streams/{room}")
                assert answer.json() == {"room": room, "streamsEnded": True}
    return ids, names


async def test_drop_streams_then_resume_without_loss(client: httpx.AsyncClient) -> None:
    first, _ = await _read_until_end(client, DEFAULT_ROOM, None, stop_after=3)
    await anyio.sleep(3 * TICK)  # ticks published while nobody listens
    second, names = await _read_until_end(client, DEFAULT_ROOM, first[-1], stop_after=6)
    assert "gap" not in names
    ids = first + second
    assert len(set(ids)) == len(ids)
    ns = [_n(i) for i in ids]
    assert ns == list(range(ns[0], ns[0] + len(ns)))


async def test_close_room_tells_the_reconnecting_client_of_the_gap(
    client: httpx.AsyncClient,
) -> None:
    room = "closing-room"
    first = (await client.post(f"/publish/{room}", json={"data": "one"})).json()["id"]
    answer = await client.post(f"/admin/close/{room}")
    assert answer.json() == {"room": room, "existed": True}
    async with (
        aconnect_sse(client, "GET", f"/events/{room}", headers={"Last-Event-ID": first}) as source,
        sse_events(source) as events,
    ):
        async for sse in events:
            assert sse.event == "gap"
            assert first in sse.data
            break


async def test_admin_routes_can_be_left_out() -> None:
    app = create_app(ticker_interval=None, admin=False)
    paths = {getattr(route, "path", "") for route in app.routes}
    assert paths == {
        "/",
        "/static/{name}",
        "/events/{session_id}",
        "/publish/{room}",
        "/stats",
        "/metrics",
        "/run",
        "/runs/{name}",
        "/runs/{name}/events",
        "/runs/{name}/cancel",
    }


async def test_admin_rejects_a_bad_room(client: httpx.AsyncClient) -> None:
    for route in ("drop-streams", "close"):
        answer = await client.post(f"/admin/{route}/{'r' * 300}")
        assert answer.status_code == 400
        assert "invalid room id" in answer.json()["error"]


def test_create_app_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="ticker_interval must be > 0 or None, got 0"):
        create_app(ticker_interval=0)
    with pytest.raises(ValueError, match="session_id must not be empty"):
        create_app(room="")
    with pytest.raises(ValueError, match="max_body_bytes must be >= 1 or None, got 0"):
        create_app(max_body_bytes=0)


# -- cross-origin requests: a page elsewhere must not publish or end streams --------------

EVIL = "http://evil.example"


async def _refused_then_marker(
    client: httpx.AsyncClient, room: str, attempt: Awaitable[httpx.Response], message: str
) -> None:
    """`attempt` is answered 403 with `message`, and the room's open stream is untouched:
    the next event it carries is a marker published afterwards."""
    async with aconnect_sse(client, "GET", f"/events/{room}") as source:
        answer = await attempt
        assert answer.status_code == 403, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert message in answer.json()["error"], answer.json()["error"]
        marker = await client.post(f"/publish/{room}", json={"data": "marker"})
        assert marker.status_code == 200, marker.text
        async with sse_events(source) as events:
            async for sse in events:
                assert (sse.id, sse.data) == (marker.json()["id"], "marker")
                break


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param(
            {"Origin": EVIL},
            "cross-origin POST refused: Origin 'http://evil.example' is not this server",
            id="origin",
        ),
        pytest.param(
            {"Origin": "null"},
            "cross-origin POST refused: Origin 'null' is not this server",
            id="origin-null",
        ),
        pytest.param(
            {"Origin": "http://127.0.0.1:1"},
            "cross-origin POST refused: Origin 'http://127.0.0.1:1' is not this server",
            id="origin-other-port",
        ),
        pytest.param(
            {"Origin": "http://localhost"},
            "cross-origin POST refused: Origin 'http://localhost' is not this server",
            id="origin-other-host",
        ),
        pytest.param(
            {"Referer": EVIL + "/page.html"},
            "cross-origin POST refused: Referer 'http://evil.example/page.html' is not this server",
            id="referer",
        ),
        pytest.param(
            {"Sec-Fetch-Site": "cross-site"},
            "cross-origin POST refused: Sec-Fetch-Site is 'cross-site'",
            id="sec-fetch-site-cross-site",
        ),
        pytest.param(
            {"Sec-Fetch-Site": "same-site"},
            "cross-origin POST refused: Sec-Fetch-Site is 'same-site'",
            id="sec-fetch-site-same-site",
        ),
    ],
)
async def test_cross_origin_form_post_publishes_nothing(
    client: httpx.AsyncClient, headers: dict[str, str], message: str
) -> None:
    # What a form on another site submits: a simple request, no CORS preflight.
    attempt = client.post(
        "/publish/xo-room",
        content=b"data=pwned",
        headers={"content-type": "application/x-www-form-urlencoded", **headers},
    )
    await _refused_then_marker(client, "xo-room", attempt, message)


@pytest.mark.parametrize("route", ["drop-streams", "close"])
async def test_cross_origin_admin_post_ends_nothing(client: httpx.AsyncClient, route: str) -> None:
    room = f"xo-admin-{route}"
    attempt = client.post(f"/admin/{route}/{room}", headers={"Origin": EVIL})
    await _refused_then_marker(client, room, attempt, "cross-origin POST refused")


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
async def test_cross_origin_other_methods_are_refused(
    client: httpx.AsyncClient, url: str, method: str
) -> None:
    refused = await client.request(method, "/publish/r", headers={"Origin": EVIL})
    assert refused.status_code == 403
    assert f"cross-origin {method} refused" in refused.json()["error"]
    # From the page's own origin they reach the router, which allows only POST.
    allowed = await client.request(method, "/publish/r", headers={"Origin": url})
    assert allowed.status_code == 405


async def test_cross_origin_reads_are_not_refused(client: httpx.AsyncClient) -> None:
    # Reading is harmless (and the browser keeps the answer from the other site).
    for path in ("/", "/stats", "/metrics"):
        answer = await client.get(path, headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site"})
        assert answer.status_code == 200, path


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-origin-curl"),
        pytest.param({"Origin": "{url}"}, id="same-origin"),
        pytest.param({"Origin": "{url}", "Sec-Fetch-Site": "same-origin"}, id="fetch-metadata"),
        pytest.param({"Referer": "{url}/?room=lobby"}, id="same-origin-referer"),
        pytest.param({"Sec-Fetch-Site": "none"}, id="user-initiated"),
        pytest.param({"Origin": "HTTP://127.0.0.1:{port}"}, id="origin-case"),
    ],
)
async def test_same_origin_and_originless_posts_work(
    client: httpx.AsyncClient, url: str, headers: dict[str, str]
) -> None:
    port = url.rpartition(":")[2]
    filled = {k: v.format(url=url, port=port) for k, v in headers.items()}
    room = "same-origin-room"
    async with aconnect_sse(client, "GET", f"/events/{room}") as source:
        answer = await client.post(f"/publish/{room}", json={"data": "ok"}, headers=filled)
        assert answer.status_code == 200, answer.text
        async with sse_events(source) as events:
            async for sse in events:
                assert (sse.id, sse.data) == (answer.json()["id"], "ok")
                break
        dropped = await client.post(f"/admin/drop-streams/{room}", headers=filled)
        assert dropped.json() == {"room": room, "streamsEnded": True}


@pytest.mark.parametrize(
    ("host", "origin", "status"),
    [
        pytest.param("demo.example", "http://demo.example", 200, id="default-port"),
        pytest.param("demo.example:80", "http://demo.example", 200, id="explicit-default-port"),
        pytest.param("demo.example", "https://demo.example", 200, id="https-behind-a-proxy"),
        pytest.param("DEMO.example:8080", "http://demo.EXAMPLE:8080", 200, id="host-case"),
        pytest.param("[::1]:8000", "http://[::1]:8000", 200, id="ipv6"),
        pytest.param("demo.example", "http://demo.example:8080", 403, id="other-port"),
        pytest.param("demo.example:443", "http://demo.example", 403, id="port-443-vs-http"),
        pytest.param("demo.example", "http://evil.demo.example", 403, id="subdomain"),
        pytest.param("demo.example", "demo.example", 403, id="origin-without-scheme"),
        pytest.param("demo.example", "ftp://demo.example", 403, id="other-scheme"),
        pytest.param("demo.example", "http://demo.example:99999", 403, id="bad-port"),
    ],
)
async def test_origin_is_compared_with_the_host_header(
    client: httpx.AsyncClient, host: str, origin: str, status: int
) -> None:
    # Behind a proxy that passes Host (docs/nginx.md does), the browser's
    # origin is the proxy's, and the Host header names it.
    answer = await client.post(
        "/publish/host-room", json={"data": 1}, headers={"Host": host, "Origin": origin}
    )
    assert answer.status_code == status, answer.text


async def test_origin_without_a_host_header_is_refused(url: str) -> None:
    host, _, port = url.removeprefix("http://").partition(":")
    async with await anyio.connect_tcp(host, int(port)) as stream:
        body = b'{"data": 1}'
        await stream.send(
            b"POST /publish/r HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Origin: http://evil.example\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        answer = b""
        with anyio.fail_after(10):
            try:
                while True:
                    answer += await stream.receive()
            except anyio.EndOfStream:
                pass
    assert answer.startswith(b"HTTP/1.1 403 "), answer[:300]
    assert b"no Host header" in answer


# -- the command line -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "admin"),
    [
        pytest.param([], True, id="default-host"),
        pytest.param(["--host", "127.0.0.1"], True, id="127.0.0.1"),
        pytest.param(["--host", "127.8.9.10"], True, id="127.8.9.10"),
        pytest.param(["--host", "::1"], True, id="ipv6-loopback"),
        pytest.param(["--host", "localhost"], True, id="localhost"),
        pytest.param(["--host", "0.0.0.0"], False, id="all-ipv4"),
        pytest.param(["--host", "::"], False, id="all-ipv6"),
        pytest.param(["--host", "192.168.1.10"], False, id="lan"),
        pytest.param(["--host", "demo.example"], False, id="a-name"),
        pytest.param(["--host", "0.0.0.0", "--admin"], True, id="forced-on"),
        pytest.param(["--no-admin"], False, id="off-on-loopback"),
        pytest.param(["--host", "::1", "--no-admin"], False, id="off-on-ipv6-loopback"),
    ],
)
def test_cli_admin_routes_default_to_off_off_loopback(argv: list[str], admin: bool) -> None:
    assert parse_args(argv).admin is admin


def test_cli_admin_and_no_admin_conflict(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        parse_args(["--admin", "--no-admin"])
    assert exc_info.value.code == 2
    assert "argument --no-admin: not allowed with argument --admin" in capsys.readouterr().err


def test_cli_help_explains_admin_routes_and_origins(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--help"])
    assert exc_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in (
        "--admin",
        "--no-admin",
        "off by default when --host is not a loopback address",
        "Cross-origin POSTs (from a page on another site) are refused",
        "requests that send none of these, such as curl's, are served",
        "/admin/drop-streams/ROOM",
    ):
        assert phrase in text, phrase


def test_cli_rejects_a_bad_port() -> None:
    with pytest.raises(SystemExit, match="--port must be between 0 and 65535, got 70000"):
        main(["--port", "70000"])


def test_cli_redis_without_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail, as in an install without the module.
    monkeypatch.setitem(sys.modules, "sse_broadcaster.redis", None)
    with pytest.raises(SystemExit, match="--redis: the Redis backend is not available"):
        main(["--redis", "redis://127.0.0.1:6379/0"])


@contextmanager
def _cli(*args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``python -m sse_broadcaster.demo`` on a free port until it serves ``/``."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sse_broadcaster.demo", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{base}/", timeout=2)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    output = process.communicate(timeout=5)[0].decode(errors="replace")
                    pytest.fail(f"the demo did not start (exit {process.returncode}):\n{output}")
                time.sleep(0.1)
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=5)


def _sigterm_with_open_stream(base: str, process: subprocess.Popen[bytes]) -> float:
    """SIGTERM the demo while a stream is open; the seconds it took to exit."""
    with httpx.stream("GET", f"{base}/events/{DEFAULT_ROOM}", timeout=5) as stream:
        assert next(stream.iter_lines()).startswith("retry:")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
    elapsed = time.monotonic() - started
    output = process.communicate(timeout=5)[0].decode(errors="replace")
    # uvicorn shuts down gracefully, then re-raises the signal it caught: the
    # process ends "killed by SIGTERM", as `uvicorn module:app` does.
    assert code in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output
    return elapsed


def test_cli_serves_the_page_and_stops_on_sigterm() -> None:
    with _cli("--log-level", "warning") as (base, process):
        page = httpx.get(f"{base}/")
        assert page.status_code == 200
        assert "sse-broadcaster demo" in page.text
        # On the loopback default the admin routes are on.
        dropped = httpx.post(f"{base}/admin/drop-streams/{DEFAULT_ROOM}")
        assert dropped.status_code == 200, dropped.text
        elapsed = _sigterm_with_open_stream(base, process)
    assert elapsed < 2.5, f"SIGTERM took {elapsed:.2f} s with an open stream"


@pytest.mark.redis
def test_cli_with_redis(private_redis: RedisServer) -> None:
    with _cli("--redis", private_redis.url, "--log-level", "warning") as (base, process):
        assert httpx.get(f"{base}/stats").json()["backend"]["type"] == "redis"
        with httpx.stream("GET", f"{base}/events/redis-room", timeout=10) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("retry:")
            answer = httpx.post(f"{base}/publish/redis-room", json={"data": "via redis"})
            assert answer.status_code == 200, answer.text
            received = []
            for line in lines:
                received.append(line)
                if line.startswith("data:"):
                    break
        assert f"id: {answer.json()['id']}" in received
        assert received[-1] == "data: via redis"
        assert _sigterm_with_open_stream(base, process) < 2.5


def test_cli_no_admin() -> None:
    with _cli("--host", "127.0.0.1", "--no-admin", "--log-level", "warning") as (base, process):
        for route in ("drop-streams", "close"):
            answer = httpx.post(f"{base}/admin/{route}/{DEFAULT_ROOM}")
            assert answer.status_code == 404, answer.text
        published = httpx.post(f"{base}/publish/{DEFAULT_ROOM}", json={"data": "still works"})
        assert published.status_code == 200, published.text
        refused = httpx.post(
            f"{base}/publish/{DEFAULT_ROOM}", data={"data": "pwned"}, headers={"Origin": EVIL}
        )
        assert refused.status_code == 403, refused.text
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=10)[0].decode(errors="replace")
    assert "admin routes off (--no-admin)" in output, output
