"""The demo server (`python -m sse_broadcaster.demo`) through a real uvicorn server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from importlib.resources import files

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from sse_broadcaster import BroadcasterConfig
from sse_broadcaster.demo import DEFAULT_ROOM, create_app
from sse_broadcaster.demo.__main__ import main

from ._demo_server import serve_demo, sse_events
from ._servers import free_port
from .redis_server import RedisServer, private_redis  # noqa: F401

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
    for name in ("index.html", "app.js", "style.css"):
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
            "malformed JSON body",
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


# -- the command line -------------------------------------------------------------------


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
        elapsed = _sigterm_with_open_stream(base, process)
    assert elapsed < 2.5, f"SIGTERM took {elapsed:.2f} s with an open stream"


@pytest.mark.redis
def test_cli_with_redis(private_redis: RedisServer) -> None:  # noqa: F811
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
