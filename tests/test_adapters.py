"""Behaviour shared by the Starlette and aiohttp adapters, against real servers.

Every test runs on uvicorn (Starlette adapter) and on aiohttp's own server,
on 127.0.0.1 with a free port, and reads streams with httpx-sse or, where the
wire itself is the point (chunks, a client that stops reading), a bare socket.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from sse_broadcaster import BroadcasterConfig, EventBroadcaster
from sse_broadcaster._adapter import MAX_LAST_EVENT_ID
from sse_broadcaster._streams import registry_for
from sse_broadcaster.aiohttp import open_streams

from .support.servers import ADAPTERS, Served, established, open_raw, serve_adapter, wait_for

pytestmark = pytest.mark.anyio

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn and aiohttp run on asyncio only


@pytest.fixture(params=ADAPTERS)
def adapter(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def config(**overrides: Any) -> BroadcasterConfig:
    values: dict[str, Any] = {"keepalive_interval": 5.0, "send_timeout": 2.0}
    values.update(overrides)
    return BroadcasterConfig(**values)


@pytest.fixture
async def served(adapter: str) -> AsyncIterator[Served]:
    async with serve_adapter(adapter, EventBroadcaster(config())) as served:
        yield served


async def events(
    client: httpx.AsyncClient, url: str, count: int, headers: dict[str, str] | None = None
) -> list[ServerSentEvent]:
    """The first `count` events of a stream that carry data (``retry:`` alone is skipped)."""
    received: list[ServerSentEvent] = []
    async with aconnect_sse(client, "GET", url, headers=headers or {}) as source:
        async for sse in source.aiter_sse():
            if sse.data or sse.event != "message":
                received.append(sse)
                if len(received) == count:
                    break
    return received


async def subscribers(served: Served) -> int:
    return int(served.broadcaster.stats()["totalSubscribers"])


# -- headers and prelude -------------------------------------------------------------------


async def test_headers_and_retry_first(served: Served) -> None:
    async with open_raw(served.base_url, "/events/room?lastEventId=") as raw:
        assert raw.status == 200
        assert {k: raw.headers.get(k) for k in SSE_HEADERS} == SSE_HEADERS
        assert await raw.read_chunk() == b"retry: 3000\n\n"
        event = await served.broadcaster.publish("room", "hello")
        assert await raw.read_chunk() == event.encode()


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_no_retry_line_when_retry_ms_is_none(adapter: str) -> None:
    broadcaster = EventBroadcaster(config(retry_ms=None))
    async with (
        serve_adapter(adapter, broadcaster) as served,
        open_raw(served.base_url, "/events/room") as raw,
    ):
        await wait_for(lambda: broadcaster.subscriber_count("room") > 0)
        event = await broadcaster.publish("room", "hello")
        first = await raw.read_chunk()
    assert first == event.encode()


async def test_live_events_round_trip(served: Served) -> None:
    async with httpx.AsyncClient(timeout=5) as client, anyio.create_task_group() as tg:
        result: list[ServerSentEvent] = []

        async def read() -> None:
            result.extend(await events(client, served.url("/events/room"), 3))

        tg.start_soon(read)
        await wait_for(lambda: served.broadcaster.subscriber_count("room") > 0)
        published = [
            await served.broadcaster.publish("room", {"n": 1}),
            await served.broadcaster.publish("room", "two\nlines\r\nhere", event="chat"),
            await served.broadcaster.publish("room", " leading space"),
        ]
    # SSE carries line breaks as LF only
    assert [(e.id, e.event, e.data) for e in result] == [
        (p.id, p.event or "message", p.data.replace("\r\n", "\n")) for p in published
    ]


# -- replay and gaps ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["header", "query", "header-wins"])
async def test_replay_from_last_event_id(served: Served, where: str) -> None:
    published = [await served.broadcaster.publish("room", f"e{i}") for i in range(5)]
    resume = published[1].id
    path, headers = "/events/room", {}
    if where == "header":
        headers = {"Last-Event-ID": resume}
    elif where == "query":
        path += f"?lastEventId={resume}"
    else:
        headers = {"Last-Event-ID": resume}
        path += f"?lastEventId={published[3].id}"
    async with httpx.AsyncClient(timeout=5) as client:
        got = await events(client, served.url(path), 3, headers)
    assert [e.id for e in got] == [p.id for p in published[2:]]
    assert all(e.event == "message" for e in got)


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param("garbage", id="garbage"),
        pytest.param("0-0-0", id="unknown-shape"),
        pytest.param("9" * 40, id="digits"),
        pytest.param("x" * 5000, id="over-long"),
    ],
)
async def test_unusable_last_event_id_is_a_gap(served: Served, sent: str) -> None:
    published = [await served.broadcaster.publish("room", f"e{i}") for i in range(3)]
    async with httpx.AsyncClient(timeout=5) as client:
        got = await events(client, served.url("/events/room"), 4, {"Last-Event-ID": sent})
    gap, *replayed = got
    assert gap.event == "gap"
    assert gap.id == ""  # no id field: the client's last id stays what it was
    payload = json.loads(gap.data)
    assert payload["lastEventId"] == sent[:MAX_LAST_EVENT_ID]
    assert payload["replayed"] == 3
    assert payload.get("invalid", False) == (len(sent) > MAX_LAST_EVENT_ID)
    assert [e.id for e in replayed] == [p.id for p in published]


async def test_control_characters_in_query_id_are_a_gap(served: Served) -> None:
    await served.broadcaster.publish("room", "e0")
    async with httpx.AsyncClient(timeout=5) as client:
        got = await events(client, served.url("/events/room?lastEventId=a%00b%0A"), 2)
    assert got[0].event == "gap"
    assert json.loads(got[0].data) == {"lastEventId": "a\x00b\n", "replayed": 1, "invalid": True}
    assert got[1].data == "e0"


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        pytest.param(b"\xff", "\ufffd", id="ff"),
        pytest.param(b"\x80abc", "\ufffdabc", id="continuation-byte"),
        pytest.param(b"\xed\xa0\x80", "\ufffd\ufffd\ufffd", id="encoded-surrogate"),
    ],
)
async def test_non_utf8_last_event_id_is_a_gap(served: Served, sent: bytes, shown: str) -> None:
    await served.broadcaster.publish("room", "e0")
    # open_raw encodes header values as latin-1: one character per byte sent.
    headers = {"Last-Event-ID": sent.decode("latin-1")}
    async with open_raw(served.base_url, "/events/room", headers) as raw:
        assert raw.status == 200
        body = b""
        while b"data: e0" not in body:
            body += await raw.read_chunk()
    gap = [line for line in body.decode().split("\n") if line.startswith("data: {")]
    assert "event: gap" in body.decode()
    assert [json.loads(line.removeprefix("data: ")) for line in gap] == [
        {"lastEventId": shown, "replayed": 1, "invalid": True}
    ]


async def test_utf8_last_event_id_is_read_as_utf8(served: Served) -> None:
    await served.broadcaster.publish("room", "e0")
    headers = {"Last-Event-ID": "é".encode().decode("latin-1")}  # the bytes C3 A9
    async with open_raw(served.base_url, "/events/room", headers) as raw:
        assert raw.status == 200
        body = b""
        while b"data: e0" not in body:
            body += await raw.read_chunk()
    assert 'data: {"lastEventId":"é","replayed":1}\n'.encode() in body


# -- keep-alive, disconnects, send timeout --------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_keepalive_comment(adapter: str) -> None:
    broadcaster = EventBroadcaster(config(keepalive_interval=0.2))
    async with (
        serve_adapter(adapter, broadcaster) as served,
        open_raw(served.base_url, "/events/room") as raw,
    ):
        assert await raw.read_chunk() == b"retry: 3000\n\n"
        start = time.monotonic()
        assert await raw.read_chunk() == b": ping\n\n"
        assert await raw.read_chunk() == b": ping\n\n"
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed <= 1.0


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_disconnect_releases_subscription_within_one_interval(adapter: str) -> None:
    interval = 0.5
    broadcaster = EventBroadcaster(config(keepalive_interval=interval))
    async with serve_adapter(adapter, broadcaster) as served:
        async with open_raw(served.base_url, "/events/room") as raw:
            await raw.read_chunk()
            assert await subscribers(served) == 1
        took = await wait_for(lambda: broadcaster.stats()["totalSubscribers"] == 0, 2 * interval)
        assert took <= interval
        assert open_streams(broadcaster) == 0


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_streams_share_one_watchdog(adapter: str) -> None:
    import asyncio

    # Tasks per open stream: the server's (uvicorn: the ASGI cycle; aiohttp:
    # the connection and its handler), plus the ASGI disconnect listener on
    # Starlette. Keep-alive and send timeouts take no task of their own.
    per_stream = 2
    streams = 20
    broadcaster = EventBroadcaster(config(keepalive_interval=0.2))
    registry = registry_for(broadcaster)
    async with serve_adapter(adapter, broadcaster) as served, contextlib.AsyncExitStack() as stack:
        before = len(asyncio.all_tasks())
        raws = [
            await stack.enter_async_context(open_raw(served.base_url, f"/events/s{i % 3}"))
            for i in range(streams)
        ]
        for raw in raws:
            assert await raw.read_chunk() == b"retry: 3000\n\n"
        assert len(asyncio.all_tasks()) - before <= per_stream * streams
        for raw in raws:  # every stream is kept alive by the one timer
            assert await raw.read_chunk() == b": ping\n\n"
        await stack.aclose()
        await wait_for(lambda: len(registry) == 0, 5)
        # With no stream left the timer stops at its next tick.
        await wait_for(lambda: registry._loop is None, 5)


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_stalled_client_dropped_after_send_timeout(adapter: str) -> None:
    send_timeout = 0.5
    broadcaster = EventBroadcaster(
        config(send_timeout=send_timeout, max_queue_size=100_000, max_queue_bytes=256 * 2**20)
    )
    big = "x" * 60_000
    async with serve_adapter(adapter, broadcaster) as served:
        async with open_raw(served.base_url, "/events/room", receive_buffer=4096) as raw:
            await raw.read_chunk()  # then never read again
            for _ in range(400):  # 24 MB: more than the socket buffers hold
                await broadcaster.publish("room", big)
                await anyio.lowlevel.checkpoint()
            published = time.monotonic()
            await wait_for(lambda: broadcaster.stats()["totalSubscribers"] == 0, 5)
            took = time.monotonic() - published
            assert open_streams(broadcaster) == 0
            # The server's side of the connection is gone, the client still there.
            await wait_for(lambda: established(served.base_url) == 0, 5, "the socket to close")
        assert took <= send_timeout + 0.2  # +0.2: polling here, loaded machine
        assert broadcaster.stats()["slowSubscriberDisconnects"] == 0


# -- batching -----------------------------------------------------------------------------------


async def test_queued_events_go_out_in_one_write(served: Served) -> None:
    async with open_raw(served.base_url, "/events/room") as raw:
        assert await raw.read_chunk() == b"retry: 3000\n\n"
        # publish never yields: the stream wakes once and finds all 20 queued
        published = [await served.broadcaster.publish("room", f"e{i}") for i in range(20)]
        chunk = await raw.read_chunk()
    assert chunk == b"".join(p.encode() for p in published)


async def test_a_burst_goes_out_in_far_fewer_writes_than_events(adapter: str) -> None:
    # The shipped defaults; ten clients of one room, as in the benchmark's burst.
    broadcaster = EventBroadcaster(config(retry_ms=None))
    count, clients = 300, 10
    async with serve_adapter(adapter, broadcaster) as served, contextlib.AsyncExitStack() as stack:
        raws = [
            await stack.enter_async_context(open_raw(served.base_url, "/events/room"))
            for _ in range(clients)
        ]
        await wait_for(lambda: broadcaster.subscriber_count("room") == clients)
        published: list[bytes] = []
        writes = [0] * clients

        async def read(index: int) -> None:
            expected = len(published)
            body = bytearray()
            while body.count(b"\n\n") < expected:
                body += await raws[index].read_chunk()
                writes[index] += 1
            assert bytes(body) == b"".join(published)

        async def burst() -> None:
            # One event per loop iteration: each wake-up finds one event
            # unless the stream holds its write while more keep coming.
            for i in range(count):
                published.append((await broadcaster.publish("room", f"e{i}")).encode())
                await anyio.lowlevel.checkpoint()

        await burst()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as task_group:
                for index in range(clients):
                    task_group.start_soon(read, index)
    # Held only while events kept coming, at most one flush window (1 ms)
    # each: the 300 events go out in a few writes, not 300.
    assert max(writes) <= count // 5, writes


async def test_replay_goes_out_in_the_first_write(served: Served) -> None:
    published = [await served.broadcaster.publish("room", f"e{i}") for i in range(10)]
    async with open_raw(served.base_url, "/events/room", {"Last-Event-ID": published[0].id}) as raw:
        chunk = await raw.read_chunk()
    assert chunk == b"retry: 3000\n\n" + b"".join(p.encode() for p in published[1:])


# -- slow subscribers ---------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_slow_subscriber_ends_cleanly_and_resumes_without_loss(adapter: str) -> None:
    broadcaster = EventBroadcaster(config(max_queue_size=5))
    async with serve_adapter(adapter, broadcaster) as served, httpx.AsyncClient(timeout=5) as c:
        url = served.url("/events/room")
        received: list[ServerSentEvent] = []
        rounds = 0
        last_id: str | None = None
        async with aconnect_sse(c, "GET", url) as source:
            stream = source.aiter_sse()
            await wait_for(lambda: broadcaster.subscriber_count("room") > 0)
            published = [await broadcaster.publish("room", f"e{i}") for i in range(50)]
            received += [sse async for sse in stream if sse.data]  # ends cleanly
        assert broadcaster.stats()["slowSubscriberDisconnects"] == 1
        assert 0 < len(received) < 50
        while len(received) < 50 and rounds < 5:
            rounds += 1
            last_id = received[-1].id
            headers = {"Last-Event-ID": last_id}
            async with aconnect_sse(c, "GET", url, headers=headers) as source:
                async for sse in source.aiter_sse():
                    assert sse.event != "gap"
                    if sse.data:
                        received.append(sse)
                    if len(received) == 50:
                        break
    assert [e.id for e in received] == [p.id for p in published]
    assert [e.data for e in received] == [f"e{i}" for i in range(50)]


# -- authorize, bad requests, limits --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("allowed", [True, False], ids=["allowed", "denied"])
async def test_authorize_hook(adapter: str, kind: str, allowed: bool) -> None:
    seen: list[tuple[str, str]] = []

    def check(request: Any, session_id: str) -> bool:
        seen.append((type(request).__module__.split(".")[0], session_id))
        return allowed and request.headers.get("authorization") == "Bearer ok"

    async def acheck(request: Any, session_id: str) -> bool:
        await anyio.lowlevel.checkpoint()
        return check(request, session_id)

    broadcaster = EventBroadcaster(config())
    hook = check if kind == "sync" else acheck
    async with serve_adapter(adapter, broadcaster, authorize=hook) as served:
        await broadcaster.publish("room", "secret")
        # an unknown id replays the history: what must not leak if denied
        headers = {"Authorization": "Bearer ok", "Last-Event-ID": "nope"}
        async with open_raw(served.base_url, "/events/room", headers) as raw:
            if allowed:
                assert raw.status == 200
                assert b"data: secret" in await raw.read_chunk()
            else:
                assert raw.status == 403
                body = await raw.read_body()
                assert b"data:" not in body
                assert b"retry:" not in body
                assert "text/event-stream" not in raw.headers.get("content-type", "")
        assert broadcaster.stats()["totalSubscribers"] == 0 or allowed
    assert seen == [(adapter, "room")]


@pytest.mark.parametrize("session_id", ["x" * 300, "a%01b"], ids=["too-long", "control-char"])
async def test_invalid_session_id_is_400(served: Served, session_id: str) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(served.url(f"/events/{session_id}"))
    assert response.status_code == 400
    assert "session_id" in response.text


@pytest.mark.parametrize("limit", ["sessions", "subscribers"])
async def test_limit_answers_200_with_jittered_retry(adapter: str, limit: str) -> None:
    retry_ms = 1000
    if limit == "sessions":
        cfg = config(max_sessions=1, retry_ms=retry_ms)
    else:
        cfg = config(max_subscribers_per_session=1, retry_ms=retry_ms)
    broadcaster = EventBroadcaster(cfg)
    async with serve_adapter(adapter, broadcaster) as served:
        await broadcaster.publish("room", "first")
        target = "/events/other" if limit == "sessions" else "/events/room"
        retries: set[int] = set()
        async with open_raw(served.base_url, "/events/room") as holder:
            await holder.read_chunk()
            for _ in range(6):
                async with open_raw(served.base_url, target) as raw:
                    assert raw.status == 200
                    assert raw.headers["content-type"] == SSE_HEADERS["content-type"]
                    body = (await raw.read_body()).decode()  # and the server ends it
                    retry = int(body.split("\n")[0].removeprefix("retry: "))
                    assert retry_ms <= retry <= 2 * retry_ms
                    assert int(raw.headers["retry-after"]) == -(-retry // 1000)
                    assert "data:" not in body
                    assert "max_" in body  # the comment says which limit
                    retries.add(retry)
    assert len(retries) > 1  # jittered


# -- ends: session closed, broadcaster closed -----------------------------------------------------


@pytest.mark.parametrize("how", ["close_session", "aclose"])
async def test_stream_ends_when_the_broadcaster_ends_it(served: Served, how: str) -> None:
    async with open_raw(served.base_url, "/events/room") as raw:
        await raw.read_chunk()
        event = await served.broadcaster.publish("room", "last")
        if how == "close_session":
            await served.broadcaster.close_session("room")
        else:
            await served.broadcaster.aclose()
        with anyio.fail_after(2):
            assert await raw.read_body() == event.encode()


# -- stats and metrics --------------------------------------------------------------------------


async def test_stats_and_metrics_endpoints(served: Served) -> None:
    await served.broadcaster.publish("room", "x")
    async with httpx.AsyncClient(timeout=5) as client, open_raw(served.base_url, "/events/room"):
        await wait_for(lambda: served.broadcaster.subscriber_count("room") > 0)
        stats = (await client.get(served.url("/stats"))).json()
        metrics = await client.get(served.url("/metrics"))
    assert stats["totalSessions"] == 1
    assert stats["totalSubscribers"] == 1
    assert stats["eventsPublished"] == 1
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = dict(
        line.split(" ") for line in metrics.text.splitlines() if not line.startswith("#")
    )
    assert samples["sse_broadcaster_sessions"] == "1"
    assert samples["sse_broadcaster_subscribers"] == "1"
    assert samples["sse_broadcaster_open_streams"] == "1"
    assert samples["sse_broadcaster_events_published_total"] == "1"
    for name in (
        "events_delivered_total",
        "events_dropped_total",
        "gaps_total",
        "replays_total",
        "expired_events_total",
        "process_resident_memory_bytes",
        "memory_estimate_bytes",
    ):
        assert f"sse_broadcaster_{name}" in samples
    assert "# TYPE sse_broadcaster_events_published_total counter" in metrics.text
    for name in ("process_resident_memory_bytes", "memory_estimate_bytes"):
        assert samples[f"sse_broadcaster_{name}"].isdigit()  # whole bytes


# -- imports -------------------------------------------------------------------------------------


def test_the_package_does_not_import_frameworks() -> None:
    code = (
        "import sys, sse_broadcaster; "
        "print(sorted(m for m in ('starlette', 'aiohttp', 'redis') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_missing_framework_names_the_extra(adapter: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == adapter or name.startswith(adapter + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, adapter, None)
    monkeypatch.delitem(sys.modules, f"sse_broadcaster.{adapter}", raising=False)
    with pytest.raises(ImportError, match=re.escape(f"pip install 'sse-broadcaster[{adapter}]'")):
        importlib.import_module(f"sse_broadcaster.{adapter}")
