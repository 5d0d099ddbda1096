"""RedisBackend against a real redis-server: sharing, resume, trims, faults.

The multi-process cases run tests/support/redis_node.py in subprocesses, each with its
own EventBroadcaster on the same Redis. Fault tests print their figures
(published / acknowledged / delivered / gaps); run with ``-s`` to see them.
"""

from __future__ import annotations

import importlib
import json
import random
import subprocess
import sys
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio as aioredis

from sse_broadcaster import (
    BackendUnavailableError,
    BroadcasterConfig,
    Event,
    EventBroadcaster,
    EventTooLargeError,
    GapError,
    SessionLimitError,
    SubscriberLimitError,
)
from sse_broadcaster.redis import RedisBackend
from tests.support.core import assert_nothing_held, enter_concurrently
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

NODE = Path(__file__).parent / "support" / "redis_node.py"
ROOT = Path(__file__).parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def raw(redis_server: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client to look at Redis itself."""
    client = aioredis.Redis.from_url(redis_server, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def fast_backend(url: str, prefix: str, **kwargs: Any) -> RedisBackend:
    options: dict[str, Any] = {"attach_timeout": 5.0, "min_backoff": 0.02, "max_backoff": 0.2}
    options.update(kwargs)
    return RedisBackend(url, prefix=prefix, **options)


@asynccontextmanager
async def broadcaster_on(
    url: str, prefix: str, config: BroadcasterConfig | None = None, **kwargs: Any
) -> AsyncIterator[EventBroadcaster]:
    async with EventBroadcaster(config, backend=fast_backend(url, prefix, **kwargs)) as b:
        yield b


async def receive(sub: Any, n: int, within: float = 5.0) -> list[Event]:
    events: list[Event] = []
    with anyio.fail_after(within):
        while len(events) < n:
            events.append(await sub.receive())
    return events


def key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


# -- module and life cycle ----------------------------------------------------------------


async def test_missing_redis_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "sse_broadcaster.redis")
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match=r"pip install 'sse-broadcaster\[redis\]'"):
        importlib.import_module("sse_broadcaster.redis")


def test_importing_the_package_does_not_import_redis() -> None:
    code = "import sys, sse_broadcaster; print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_is_refused_at_start(redis_server: str) -> None:
    with pytest.raises(RuntimeError, match="asyncio only"):
        async with EventBroadcaster(backend=RedisBackend(redis_server)):
            pass


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of url and client"),
        ({"url": "redis://x", "prefix": ""}, "prefix must be"),
        ({"url": "redis://x", "attach_timeout": 0}, "attach_timeout must be a number > 0, got 0"),
        ({"url": "redis://x", "min_backoff": 2, "max_backoff": 1}, "max_backoff must be >="),
        ({"url": "redis://x", "max_buffered_messages": 0}, "max_buffered_messages must be"),
        ({"url": "redis://x", "max_buffered_bytes": 1.5}, "max_buffered_bytes must be an int"),
        ({"url": "redis://x", "max_pending_publishes": True}, "max_pending_publishes must"),
        ({"url": "redis://x", "max_pending_publish_bytes": -1}, "max_pending_publish_bytes"),
    ],
    ids=[
        "no-url",
        "empty-prefix",
        "attach-timeout",
        "backoff",
        "buffered-messages",
        "buffered-bytes",
        "pending-publishes",
        "pending-publish-bytes",
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisBackend(**kwargs)


@pytest.mark.parametrize("how", ["from_url-decoded-resp3", "host-port"])
async def test_client_argument(redis_server: str, prefix: str, how: str) -> None:
    if how == "host-port":
        url = urllib.parse.urlsplit(redis_server)
        client = aioredis.Redis(host=url.hostname or "127.0.0.1", port=url.port or 6379)
    else:
        client = aioredis.Redis.from_url(redis_server, decode_responses=True, protocol=3)
    try:
        backend = RedisBackend(client=client, prefix=prefix)
        async with EventBroadcaster(backend=backend) as b:
            async with b.subscribe("room") as sub:
                sent = await b.publish("room", "hello")
                [got] = await receive(sub, 1)
            assert got == sent
        assert await client.ping()  # the caller's client is left alone
    finally:
        await client.aclose()


# -- the RESP2 frames of the Pub/Sub and publishing connections --------------------------------

FRAMES = (
    b"*3\r\n$9\r\nsubscribe\r\n$4\r\nroom\r\n:1\r\n"
    b"*3\r\n$7\r\nmessage\r\n$4\r\nroom\r\n$13\r\n1-0\n1.5\n\n\nh\r\n\r\n"
    b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    b"+PONG\r\n"
    b"$-1\r\n"
    b"*0\r\n"
    b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
    b"-ERR wrong\r\n"
)


@pytest.mark.parametrize("reader", ["python", "hiredis"])
@pytest.mark.parametrize("chunk", [1, 3, 7, len(FRAMES)])
def test_frame_reader_parses_split_input(
    monkeypatch: pytest.MonkeyPatch, reader: str, chunk: int
) -> None:
    from redis.exceptions import NoScriptError, ResponseError

    from sse_broadcaster.redis import _frames

    if reader == "python":
        monkeypatch.setattr(_frames, "_hiredis", None)
    elif _frames._hiredis is None:  # the test extra installs it
        pytest.fail("hiredis is not installed: pip install -e '.[test]'")
    frames = _frames.frame_reader()
    got: list[Any] = []
    for i in range(0, len(FRAMES), chunk):
        frames.feed(FRAMES[i : i + chunk])
        while (reply := frames.gets()) is not False:
            got.append(reply)
    *plain, noscript, error = got
    assert plain == [
        [b"subscribe", b"room", 1],
        [b"message", b"room", b"1-0\n1.5\n\n\nh\r\n"],
        [b"pong", b""],
        b"PONG",
        None,
        [],
    ]
    assert isinstance(noscript, NoScriptError)
    assert type(error) is ResponseError
    assert str(error) == "wrong"  # as redis-py reports it


def test_pack_matches_redis_py() -> None:
    from redis.asyncio.connection import Connection

    from sse_broadcaster.redis._frames import pack

    commands = [("EVALSHA", "ab", 1, "k", "héllo\r\n", "", 500), ("PING",)]
    assert pack(commands) == b"".join(Connection().pack_commands(commands))


async def test_redis_py_reply_path_when_the_stream_is_not_reachable(
    redis_server: str,
    prefix: str,
    raw: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection class without an asyncio stream: redis-py's reader is used instead."""
    from sse_broadcaster.redis import _follower, _pipeline

    # Both the publishing and the Pub/Sub connection take redis-py's reply path.
    monkeypatch.setattr(_pipeline, "stream_of", lambda conn: None)
    monkeypatch.setattr(_follower, "stream_of", lambda conn: None)
    async with (
        broadcaster_on(redis_server, prefix) as a,
        broadcaster_on(redis_server, prefix) as b,
        b.subscribe("room") as sub,
    ):
        sent = [await a.publish("room", "1")]
        await raw.client_kill_filter(_type="pubsub")
        sent.append(await a.publish("room", "2"))
        assert await receive(sub, 2) == sent
        await raw.script_flush()
        sent.append(await a.publish("room", "3"))  # NOSCRIPT: loaded and sent again
        assert await receive(sub, 1) == sent[-1:]


async def test_script_cache_flush_is_handled(
    redis_server: str,
    prefix: str,
    raw: aioredis.Redis,
) -> None:
    async with broadcaster_on(redis_server, prefix) as a, a.subscribe("room") as sub:
        first = await a.publish("room", "1")
        await raw.script_flush()
        second = await a.publish("room", "2")
        assert await receive(sub, 2) == [first, second]
        assert [e.data for e in await a.history("room")] == ["1", "2"]


# -- publish, subscribe, replay -----------------------------------------------------------


async def test_round_trip_keeps_every_field(redis_server: str, prefix: str) -> None:
    clock_value = 1_700_000_000.25
    async with EventBroadcaster(
        backend=fast_backend(redis_server, prefix), clock=lambda: clock_value
    ) as b:
        async with b.subscribe("room") as sub:
            sent = [
                await b.publish("room", "line 1\nline 2\r\n", event="chat", retry=1500),
                await b.publish("room", {"text": "héllo ✓"}),
                await b.publish("room", ""),
            ]
            got = await receive(sub, 3)
        assert got == sent
        assert [e.encode() for e in got] == [e.encode() for e in sent]
        assert all(e.timestamp == clock_value for e in got)
        assert [key(e.id) for e in got] == sorted(key(e.id) for e in got)
        assert await b.history("room") == sent


async def test_events_cross_backends(redis_server: str, prefix: str) -> None:
    async with (
        broadcaster_on(redis_server, prefix) as a,
        broadcaster_on(redis_server, prefix) as b,
        a.subscribe("room") as sub_a,
        b.subscribe("room") as sub_b,
    ):
        sent = [await (a if i % 2 else b).publish("room", str(i)) for i in range(20)]
        assert await receive(sub_a, 20) == sent
        assert await receive(sub_b, 20) == sent
        assert b.stats()["backend"]["followedSessions"] == 1


async def test_replay_and_gap_rules(redis_server: str, prefix: str) -> None:
    config = BroadcasterConfig(max_history_per_session=5)
    async with broadcaster_on(redis_server, prefix, config) as a:
        sent = [await a.publish("room", str(i)) for i in range(8)]
        retained = sent[3:]
        cases: list[tuple[str | None, list[Event], bool]] = [
            (None, [], False),
            (sent[5].id, sent[6:], False),
            (sent[2].id, retained, False),  # the predecessor of the first retained entry
            (sent[7].id, [], False),
            (sent[1].id, retained, True),  # trimmed: older than what is retained
            ("garbage", retained, True),
            ("1-1", retained, True),  # from another incarnation
            ("99999999999999-0", retained, True),  # ahead of the stream
        ]
        for last_event_id, expected, gap in cases:
            async with a.subscribe("room", last_event_id=last_event_id) as sub:
                assert (sub.gap, sub.drain_nowait()) == (gap, expected), last_event_id
        async with a.subscribe("nowhere", last_event_id=sent[0].id) as sub:
            assert sub.gap
            assert sub.drain_nowait() == []
        assert await a.history("room", after=sent[5].id) == sent[6:]
        assert await a.history("room", after="garbage") == retained
        assert await a.history("nowhere") == []


async def test_handover_under_load_has_no_duplicate_or_hole(
    redis_server: str,
    prefix: str,
) -> None:
    """Subscribers attach on another node while events stream in: each sees a contiguous run."""
    total = 300
    async with (
        broadcaster_on(redis_server, prefix) as publisher,
        broadcaster_on(redis_server, prefix) as node,
    ):
        published: list[Event] = []
        results: list[tuple[int, list[Event]]] = []

        async def subscriber(start: int) -> None:
            last = published[start].id if start >= 0 else None
            async with node.subscribe("room", last_event_id=last) as sub:
                assert not sub.gap
                got: list[Event] = []
                with anyio.fail_after(20):
                    while not got or got[-1].data != str(total - 1):
                        got.append(await sub.receive())
                results.append((start, got))

        async with anyio.create_task_group() as tg:
            for i in range(total):
                published.append(await publisher.publish("room", str(i)))
                if i % 15 == 7:
                    tg.start_soon(subscriber, i - 3)
                if i % 40 == 9:
                    tg.start_soon(subscriber, -1)
                if i % 4 == 0:
                    await anyio.lowlevel.checkpoint()
        assert len(results) >= 25
        ids = [e.id for e in published]
        for start, got in results:
            got_ids = [e.id for e in got]
            if start >= 0:
                assert got_ids == ids[start + 1 :]
            else:  # a new subscriber: a contiguous tail, from wherever it joined
                assert got_ids == ids[ids.index(got_ids[0]) :]


async def test_event_too_large(redis_server: str, prefix: str, raw: aioredis.Redis) -> None:
    config = BroadcasterConfig(max_event_bytes=100)
    async with broadcaster_on(redis_server, prefix, config) as a:
        await a.publish("room", "x" * 70)
        with pytest.raises(EventTooLargeError, match="exceeds max_event_bytes=100"):
            await a.publish("room", "x" * 100)
    assert await raw.xlen(f"{prefix}:s:room") == 1


async def test_close_session_ends_subscribers_everywhere(
    redis_server: str,
    prefix: str,
    raw: aioredis.Redis,
) -> None:
    async with (
        broadcaster_on(redis_server, prefix) as a,
        broadcaster_on(redis_server, prefix) as b,
    ):
        async with b.subscribe("room") as sub:
            await a.publish("room", "1")
            assert await a.close_session("room")
            with anyio.fail_after(5):
                assert [e.data async for e in sub] == ["1"]
        assert await raw.exists(f"{prefix}:s:room") == 0
        assert not await a.close_session("room")
        assert b.stats()["backend"]["followedSessions"] == 0


async def test_max_subscribers_per_session_holds_under_concurrent_entries(
    redis_server: str,
    prefix: str,
) -> None:
    # #10.3: every entry awaited Redis between the limit check and registration,
    # so 50 concurrent entries with a limit of 5 were all admitted.
    config = BroadcasterConfig(max_subscribers_per_session=5)
    async with broadcaster_on(redis_server, prefix, config) as broadcaster:
        admitted, errors = await enter_concurrently(broadcaster, ["room"] * 50)
        assert admitted == 5
        assert len(errors) == 45
        assert all(isinstance(e, SubscriberLimitError) for e in errors), errors
        assert_nothing_held(broadcaster, "room")
        assert broadcaster.backend.counts().sessions == 0  # no longer followed
        admitted, errors = await enter_concurrently(broadcaster, ["room"] * 5)
        assert (admitted, errors) == (5, [])
        assert_nothing_held(broadcaster, "room")


async def test_max_sessions_holds_under_concurrent_entries(
    redis_server: str,
    prefix: str,
) -> None:
    sessions = [f"s{i}" for i in range(50)]
    async with broadcaster_on(redis_server, prefix, BroadcasterConfig(max_sessions=5)) as b:
        admitted, errors = await enter_concurrently(b, sessions)
        assert admitted == 5
        assert len(errors) == 45
        assert all(isinstance(e, SessionLimitError) for e in errors), errors
        assert_nothing_held(b, *sessions)
        assert b.backend.counts().sessions == 0


# -- trims and expiry, checked in Redis --------------------------------------------------------


async def test_trim_by_count(redis_server: str, prefix: str, raw: aioredis.Redis) -> None:
    config = BroadcasterConfig(max_history_per_session=5)
    async with broadcaster_on(redis_server, prefix, config) as a:
        sent = [await a.publish("room", str(i)) for i in range(12)]
        assert await raw.xlen(f"{prefix}:s:room") == 5
        assert await a.history("room") == sent[-5:]


async def test_trim_by_age(redis_server: str, prefix: str, raw: aioredis.Redis) -> None:
    config = BroadcasterConfig(event_ttl=0.4)
    stream = f"{prefix}:s:room"
    async with broadcaster_on(redis_server, prefix, config) as a:
        old = [await a.publish("room", str(i)) for i in range(3)]
        await anyio.sleep(0.5)
        # Trimming happens on publish; until then replay filters by age.
        assert await raw.xlen(stream) == 3
        assert await a.history("room") == []
        async with a.subscribe("room", last_event_id=old[0].id) as sub:
            assert sub.gap  # events after it aged out
        new = await a.publish("room", "new")
        assert await raw.xlen(stream) == 1
        assert await a.history("room") == [new]
        async with a.subscribe("room", last_event_id=old[-1].id) as sub:
            assert not sub.gap  # nothing after it was lost
            assert sub.drain_nowait() == [new]


async def test_key_expiry(redis_server: str, prefix: str, raw: aioredis.Redis) -> None:
    config = BroadcasterConfig(session_ttl=0.6)
    stream = f"{prefix}:s:room"
    async with broadcaster_on(redis_server, prefix, config) as a:
        first = await a.publish("room", "1")
        ttl = await raw.pttl(stream)
        assert 0 < ttl <= 600
        await anyio.sleep(0.8)
        assert await raw.exists(stream) == 0
        async with a.subscribe("room", last_event_id=first.id) as sub:
            assert sub.gap  # the session expired with its history
        # A session with a subscriber here is kept alive by the sweeps.
        async with a.subscribe("kept") as sub:
            await a.publish("kept", "x")
            for _ in range(4):
                await anyio.sleep(0.3)
                await a.cleanup()
            assert await raw.exists(f"{prefix}:s:kept") == 1
            assert a.stats()["totalEvents"] == 1


async def test_sweeps_count_aged_events_and_expired_sessions(
    redis_server: str,
    prefix: str,
    raw: aioredis.Redis,
) -> None:
    config = BroadcasterConfig(event_ttl=0.3, session_ttl=0.8)
    async with broadcaster_on(redis_server, prefix, config) as a:
        async with a.subscribe("room"):
            for i in range(3):
                await a.publish("room", str(i))
            await anyio.sleep(0.4)
            metrics = await a.cleanup()
            # Trimmed from the followed stream but its last entry, which the next
            # publish names as its predecessor (replay hides it by age).
            assert metrics.expired_events_cleaned == 2
            assert await raw.xlen(f"{prefix}:s:room") == 1
            assert await a.history("room") == []
        await a.publish("other", "x")  # published to, never followed here
        await a.cleanup()  # no longer follows "room": its stream expires
        assert a.stats()["cleanup"]["sessionsExpired"] == 0
        await anyio.sleep(1.0)
        assert await raw.exists(f"{prefix}:s:room", f"{prefix}:s:other") == 0
        await a.cleanup()
        cleanup = a.stats()["cleanup"]
        assert (cleanup["expiredEventsCleaned"], cleanup["sessionsExpired"]) == (2, 2)
        await a.cleanup()  # each expiry counts once
        assert a.stats()["cleanup"]["sessionsExpired"] == 2


def test_watched_expiries_are_bounded_and_looked_up_once_due() -> None:
    from sse_broadcaster.redis._sweeps import Expiries

    expiries = Expiries(limit=2)
    for name, deadline in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        expiries.renewed(name, deadline)
    assert len(expiries) == 2  # "a", due soonest, was forgotten
    assert expiries.due(2.5, most=10) == ["b"]
    expiries.renewed("b", 4.0)  # renewed here while Redis answered: not due any more
    assert expiries.checked(["b"], [-2], 2.5) == 0
    assert expiries.due(3.5, most=10) == ["c"]
    assert expiries.checked(["c"], [500], 3.5) == 0  # renewed elsewhere: due at 4.0
    assert expiries.due(3.9, most=10) == []
    assert expiries.due(4.0, most=1) == ["b"]
    assert expiries.checked(["b", "c"], [-2, -2], 4.0) == 2
    assert len(expiries) == 0


async def test_sessions_renewed_elsewhere_or_closed_do_not_count_as_expired(
    redis_server: str,
    prefix: str,
) -> None:
    config = BroadcasterConfig(session_ttl=0.6)
    async with (
        broadcaster_on(redis_server, prefix, config) as a,
        broadcaster_on(redis_server, prefix, config) as b,
    ):
        await a.publish("kept", "1")
        await a.publish("closed", "1")
        await a.close_session("closed")
        for _ in range(4):  # "kept" stays alive through b's publishes
            await anyio.sleep(0.3)
            await b.publish("kept", "more")
            await a.cleanup()
        assert a.stats()["cleanup"]["sessionsExpired"] == 0
        await anyio.sleep(0.8)
        await a.cleanup()
        await b.cleanup()
        # Both processes kept "kept" alive, so each counts its expiry.
        assert a.stats()["cleanup"]["sessionsExpired"] == 1
        assert b.stats()["cleanup"]["sessionsExpired"] == 1


async def test_stats_shape(redis_server: str, prefix: str) -> None:
    async with broadcaster_on(redis_server, prefix) as a, a.subscribe("room"):
        await a.publish("room", "1")
        await a.cleanup()
        backend = a.stats()["backend"]
        assert backend["type"] == "redis"
        assert backend["connected"] is True
        assert backend["reconnects"] == 0
        assert backend["recoveredEvents"] == 0
        assert backend["published"] == 1
        assert isinstance(backend["usedMemory"], int)
        sessions, events, estimate = a.backend.counts()
        assert (sessions, events) == (1, 1)
        assert estimate > 0
        json.dumps(a.stats())


# -- outages, in process ------------------------------------------------------------------------


async def test_outage_in_process(private_redis: RedisServer, prefix: str) -> None:
    url = private_redis.url
    async with (
        broadcaster_on(url, prefix, attach_timeout=0.5) as a,
        broadcaster_on(url, prefix, attach_timeout=0.5) as b,
    ):
        async with b.subscribe("room") as sub:
            sent = await a.publish("room", "before")
            assert await receive(sub, 1) == [sent]
            private_redis.kill()
            with anyio.fail_after(5):
                while b.stats()["backend"]["connected"]:
                    await anyio.sleep(0.01)
            start = anyio.current_time()
            with pytest.raises(BackendUnavailableError, match="Redis is unavailable"):
                await a.publish("room", "during")
            assert anyio.current_time() - start < 1  # no hidden retries with backoff
            with pytest.raises(BackendUnavailableError, match="could not subscribe"):
                async with b.subscribe("other"):
                    pass
            with pytest.raises(BackendUnavailableError):
                await a.history("room")
            assert b.stats()["backend"]["followedSessions"] == 1
            private_redis.start()
            with anyio.fail_after(10), pytest.raises(GapError, match="may have been lost"):
                async for _ in sub:
                    pass
        async with b.subscribe("room", last_event_id=sent.id) as sub:
            assert sub.gap
            after = await a.publish("room", "after")
            assert await receive(sub, 1) == [after]
        backend = b.stats()["backend"]
        assert backend["connected"] is True
        assert backend["reconnects"] >= 1
        assert backend["gapsSignalled"] == 1


async def test_a_silent_connection_is_detected(private_redis: RedisServer, prefix: str) -> None:
    url = private_redis.url
    client = aioredis.Redis.from_url(url)
    try:
        async with (
            broadcaster_on(url, prefix, health_check_interval=0.2, socket_timeout=0.5) as a,
            broadcaster_on(url, prefix) as b,
            a.subscribe("room") as sub,
        ):
            # Redis answers nothing for a second: the pings go unanswered, and after
            # three intervals of silence the connection counts as lost.
            await client.client_pause(1000, all=True)
            await anyio.sleep(1.1)
            sent = await b.publish("room", "after the pause")
            assert await receive(sub, 1, within=10) == [sent]
            assert a.stats()["backend"]["reconnects"] >= 1
    finally:
        await client.aclose()


async def test_publish_survives_a_closed_idle_connection(
    redis_server: str,
    prefix: str,
    raw: aioredis.Redis,
) -> None:
    async with broadcaster_on(redis_server, prefix) as a:
        await a.publish("room", "1")
        # Redis closes the publishing connection (as its idle `timeout` would): the
        # next publish notices before sending and opens a new one.
        assert await raw.client_kill_filter(_type="normal", skipme=True) >= 1
        await anyio.sleep(0.05)
        assert (await a.publish("room", "2")).data == "2"
        assert [e.data for e in await a.history("room")] == ["1", "2"]


async def test_pubsub_kill_recovers_from_stream(
    redis_server: str,
    prefix: str,
    raw: aioredis.Redis,
) -> None:
    async with (
        broadcaster_on(redis_server, prefix) as a,
        broadcaster_on(redis_server, prefix) as b,
        b.subscribe("room") as sub,
    ):
        sent = [await a.publish("room", str(i)) for i in range(5)]
        assert await receive(sub, 5) == sent
        await raw.client_kill_filter(_type="pubsub")
        # Published while b's Pub/Sub connection is down: only the stream has them.
        sent += [await a.publish("room", str(i)) for i in range(5, 30)]
        assert await receive(sub, 25) == sent[5:]
        sent += [await a.publish("room", "after")]
        assert await receive(sub, 1) == sent[-1:]
        backend = b.stats()["backend"]
        assert backend["reconnects"] >= 1
        assert backend["recoveredEvents"] >= 1


async def test_churn_during_pubsub_kills_has_no_duplicate_or_hole(
    redis_server: str,
    prefix: str,
    raw: aioredis.Redis,
) -> None:
    """Subscribers come and go on one node while its Pub/Sub connection is killed."""
    rng = random.Random(5)
    sessions = [f"room-{i}" for i in range(4)]
    per_session = 300
    published: dict[str, list[str]] = {s: [] for s in sessions}
    results: list[tuple[str, str | None, list[str]]] = []

    async def subscriber(node: EventBroadcaster, session: str) -> None:
        ids = published[session]
        last = rng.choice(ids[-20:]) if ids and rng.random() < 0.7 else None
        limit = rng.randrange(5, 60)
        got: list[str] = []
        async with node.subscribe(session, last_event_id=last) as sub:
            assert not sub.gap
            with anyio.fail_after(20):
                while len(got) < limit and (not got or got[-1] != "end"):
                    event = await sub.receive()
                    got.append(event.id if event.data != "end" else "end")
        results.append((session, last, [i for i in got if i != "end"]))

    async with (
        broadcaster_on(redis_server, prefix) as publisher,
        broadcaster_on(redis_server, prefix) as node,
        anyio.create_task_group() as tg,
    ):
        for i in range(per_session):
            for session in sessions:
                published[session].append((await publisher.publish(session, str(i))).id)
            if i % 5 == 0:
                tg.start_soon(subscriber, node, rng.choice(sessions))
            if i % 30 == 15:
                await raw.client_kill_filter(_type="pubsub")
            await anyio.sleep(0.002)
        for session in sessions:
            await publisher.publish(session, "end")
    # Checked once every publish has returned: an event can arrive before its
    # publish call does.
    assert len(results) == per_session // 5
    for session, last, got in results:
        ids = published[session]
        if got:
            start = ids.index(got[0])
            assert got == ids[start : start + len(got)], "duplicate or hole"
            if last is not None:
                assert ids[start - 1] == last
    backend = node.stats()["backend"]
    assert backend["reconnects"] >= 3
    assert backend["gapsSignalled"] == 0


# -- bounded buffers and recovery at scale ------------------------------------------------------


def slow_reads(backend: RedisBackend, delay: float, times: int) -> list[int]:
    """Delay the next `times` stream reads (attach and recovery) by `delay` s.

    Widens the window in which Pub/Sub messages are buffered; everything else,
    the reads included, runs on the real Redis. Returns a one-item list counting
    the delayed reads.
    """
    done = [0]
    streams = backend._streams
    assert streams is not None
    read, read_many = streams.read, streams.read_many

    async def pause() -> None:
        if done[0] < times:
            done[0] += 1
            await anyio.sleep(delay)

    async def slow_read(*args: Any) -> Any:
        await pause()
        return await read(*args)

    async def slow_read_many(*args: Any) -> Any:
        await pause()
        return await read_many(*args)

    streams.read = slow_read  # type: ignore[method-assign]
    streams.read_many = slow_read_many  # type: ignore[method-assign]
    return done


async def kill_pubsub_during_a_slow_read(
    broadcaster: EventBroadcaster, raw: aioredis.Redis
) -> None:
    """Kill the node's Pub/Sub connection with its next stream read delayed.

    Returns once the node has reconnected and its recovery read is in flight, so
    that what is published next arrives on Pub/Sub and is buffered meanwhile.
    """
    delayed = slow_reads(broadcaster.backend, 0.3, times=1)  # type: ignore[arg-type]
    await raw.client_kill_filter(_type="pubsub")
    with anyio.fail_after(5):
        while broadcaster.stats()["backend"]["reconnects"] < 1 or not delayed[0]:
            await anyio.sleep(0.005)


async def recovered(b: EventBroadcaster) -> dict[str, Any]:
    """The backend's stats once its recovery after the last reconnection is over."""
    with anyio.fail_after(10):
        while b.stats()["backend"]["lastRecoverySeconds"] is None:
            await anyio.sleep(0.005)
    stats: dict[str, Any] = b.stats()["backend"]
    return stats


async def publish_during(a: EventBroadcaster, session: str, n: int, out: list[Event]) -> None:
    for i in range(n):
        out.append(await a.publish(session, f"during {i}"))
        await anyio.sleep(0.002)


@pytest.mark.parametrize("bound", ["messages", "bytes"])
async def test_buffer_overflow_in_recovery_rereads_the_stream(
    redis_server: str,
    prefix: str,
    raw: aioredis.Redis,
    bound: str,
) -> None:
    """Past the buffer's bound during a recovery, the stream is read again: no loss."""
    limits = {"max_buffered_messages": 5} if bound == "messages" else {"max_buffered_bytes": 1500}
    async with (
        broadcaster_on(redis_server, prefix) as a,
        broadcaster_on(redis_server, prefix, **limits) as b,
        b.subscribe("room") as sub,
    ):
        sent = [await a.publish("room", "before")]
        assert await receive(sub, 1) == sent
        await kill_pubsub_during_a_slow_read(b, raw)
        # The recovery's read is in flight: these arrive on Pub/Sub meanwhile.
        await publish_during(a, "room", 40, sent)
        sent.append(await a.publish("room", "after"))
        assert await receive(sub, len(sent) - 1) == sent[1:]
        stats = await recovered(b)
        assert stats["bufferOverflows"] >= 1
        assert stats["gapsSignalled"] == 0
        assert stats["pendingMessages"] == 0
        assert stats["pendingBytes"] == 0
        assert stats["lastRecoverySeconds"] is not None
        figures(
            f"buffer-overflow-{bound}",
            published=len(sent),
            delivered=len(sent),
            overflows=stats["bufferOverflows"],
            recovered=stats["recoveredEvents"],
            gaps=stats["gapsSignalled"],
        )


async def test_buffer_overflow_in_attach_rereads_the_stream(
    redis_server: str,
    prefix: str,
) -> None:
    async with (
        broadcaster_on(redis_server, prefix) as a,
        broadcaster_on(redis_server, prefix, max_buffered_messages=3) as b,
    ):
        first = await a.publish("room", "first")
        slow_reads(b.backend, 0.3, times=1)  # type: ignore[arg-type]
        sent: list[Event] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_during, a, "room", 30, sent)
            async with b.subscribe("room", last_event_id=first.id) as sub:
                # The replay and the re-read hand over with no duplicate and no hole.
                got = await receive(sub, 30, within=10)
        assert got == sent
        assert b.stats()["backend"]["bufferOverflows"] >= 1


async def test_buffer_overflow_beyond_history_ends_with_gap(
    redis_server: str,
    prefix: str,
    raw: aioredis.Redis,
) -> None:
    """When the re-read finds history trimmed past the cursor, subscribers get GapError."""
    config = BroadcasterConfig(max_history_per_session=5)
    async with (
        broadcaster_on(redis_server, prefix, config) as a,
        broadcaster_on(redis_server, prefix, config, max_buffered_messages=3) as b,
    ):
        async with b.subscribe("room") as sub:
            before = await a.publish("room", "before")
            assert await receive(sub, 1) == [before]
            await kill_pubsub_during_a_slow_read(b, raw)
            await publish_during(a, "room", 20, [])
            with anyio.fail_after(10), pytest.raises(GapError, match="may have been lost"):
                async for _ in sub:
                    pass
        async with b.subscribe("room", last_event_id=before.id) as sub:
            assert sub.gap
            assert len(sub.drain_nowait()) == 5
        assert b.stats()["backend"]["gapsSignalled"] == 1


async def test_close_during_an_overflowed_recovery_ends_the_session(
    redis_server: str,
    prefix: str,
    raw: aioredis.Redis,
) -> None:
    async with (
        broadcaster_on(redis_server, prefix) as a,
        broadcaster_on(redis_server, prefix, max_buffered_messages=3) as b,
        b.subscribe("room") as sub,
    ):
        before = await a.publish("room", "before")
        assert await receive(sub, 1) == [before]
        await kill_pubsub_during_a_slow_read(b, raw)
        await publish_during(a, "room", 10, [])
        assert await a.close_session("room")
        with anyio.fail_after(10):
            rest = [event async for event in sub]  # ends without an error
        assert len(rest) <= 10
        assert b.stats()["backend"]["bufferOverflows"] >= 1
        assert b.stats()["backend"]["followedSessions"] == 0


async def test_pending_publishes_are_bounded(redis_server: str, prefix: str) -> None:
    async with broadcaster_on(redis_server, prefix, max_pending_publishes=3) as a:
        outcomes: list[str] = []

        async def one(i: int) -> None:
            try:
                await a.publish("room", str(i))
            except BackendUnavailableError as exc:
                outcomes.append("refused" if "max_pending_publishes=3" in str(exc) else repr(exc))
            else:
                outcomes.append("stored")

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, i)
        assert sorted(outcomes) == ["refused"] * 7 + ["stored"] * 3
        assert len(await a.history("room")) == 3  # the refused ones were not stored
        backend = a.stats()["backend"]
        assert backend["publishesRefused"] == 7
        assert backend["pendingPublishes"] == 0
        # One publish is always admitted when none waits, whatever its size.
        async with broadcaster_on(redis_server, prefix, max_pending_publish_bytes=10) as b:
            assert (await b.publish("room", "x" * 100)).data == "x" * 100


async def test_sweep_stops_following_sessions_without_subscribers(
    redis_server: str,
    prefix: str,
) -> None:
    async with broadcaster_on(redis_server, prefix) as a:
        async with a.subscribe("room"):
            pass
        # As if the detach had been missed: follow a session nobody here subscribes to.
        a.backend._sessions.follow(a, "orphan")  # type: ignore[attr-defined]
        assert a.backend.counts()[0] == 1
        await a.cleanup()
        assert a.backend.counts()[0] == 0


async def test_recovery_of_300_sessions_after_client_kill(
    redis_server: str,
    prefix: str,
    raw: aioredis.Redis,
) -> None:
    """CLIENT KILL with 300 followed sessions: every event arrives; recovery is pipelined."""
    n = 300
    sessions = [f"room-{i}" for i in range(n)]
    async with (
        broadcaster_on(redis_server, prefix) as a,
        broadcaster_on(redis_server, prefix) as b,
    ):
        sent: dict[str, list[Event]] = {s: [] for s in sessions}
        got: dict[str, list[Event]] = {s: [] for s in sessions}
        complete = anyio.Event()
        remaining = [n]

        async def follow(session: str, entered: anyio.Event) -> None:
            async with b.subscribe(session) as sub:
                entered.set()
                async for event in sub:
                    got[session].append(event)
                    if event.data == "end":
                        remaining[0] -= 1
                        if not remaining[0]:
                            complete.set()
                        return

        async with anyio.create_task_group() as tg:
            for session in sessions:
                entered = anyio.Event()
                tg.start_soon(follow, session, entered)
                await entered.wait()
            for session in sessions:
                sent[session].append(await a.publish(session, "before"))
            killed = anyio.current_time()
            assert await raw.client_kill_filter(_type="pubsub") >= 1
            # Published while b resubscribes: most reach b only through its recovery.
            for i in range(3):
                for session in sessions:
                    sent[session].append(await a.publish(session, str(i)))
            for session in sessions:
                sent[session].append(await a.publish(session, "end"))
            with anyio.fail_after(30):
                await complete.wait()
            elapsed = anyio.current_time() - killed
        for session in sessions:
            assert got[session] == sent[session], session
        stats = await recovered(b)
        assert stats["reconnects"] >= 1
        assert stats["gapsSignalled"] == 0
        assert stats["lastRecoverySeconds"] is not None
        assert stats["lastRecoverySeconds"] < 5
        figures(
            "recovery-300-sessions",
            sessions=n,
            published=sum(len(v) for v in sent.values()),
            delivered=sum(len(v) for v in got.values()),
            recovered=stats["recoveredEvents"],
            recovery_s=f"{stats['lastRecoverySeconds']:.3f}",
            kill_to_last_delivery_s=f"{elapsed:.3f}",
            gaps=stats["gapsSignalled"],
        )


# -- several OS processes -----------------------------------------------------------------------


class Node:
    """A tests/support/redis_node.py subprocess and the reports it sent."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self.reports: list[dict[str, Any]] = []
        self._changed = anyio.Event()

    async def read_reports(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self.reports.append(json.loads(line))
            self._changed.set()
            self._changed = anyio.Event()

    async def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(json.dumps(command).encode() + b"\n")

    def of(self, tag: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.reports if r["tag"] == tag and (kind is None or r["type"] == kind)]

    def events(self, tag: str) -> list[str]:
        return [r["id"] for r in self.of(tag, "event")]

    async def wait(self, predicate: Callable[[], object], within: float = 20) -> None:
        with anyio.fail_after(within):
            while not predicate():
                await self._changed.wait()

    async def stats(self) -> dict[str, Any]:
        tag = f"stats-{uuid.uuid4().hex[:6]}"
        await self.send(op="stats", tag=tag)
        await self.wait(lambda: self.of(tag))
        stats: dict[str, Any] = self.of(tag)[0]["stats"]
        return stats


@asynccontextmanager
async def node(url: str, prefix: str, **options: Any) -> AsyncIterator[Node]:
    options = {
        "url": url,
        "prefix": prefix,
        "backend": {"attach_timeout": 5.0, "min_backoff": 0.02, "max_backoff": 0.2},
        **options,
    }
    process = await anyio.open_process(
        [sys.executable, str(NODE), json.dumps(options)], stderr=None, cwd=ROOT
    )
    async with process, anyio.create_task_group() as tg:
        n = Node(process)
        tg.start_soon(n.read_reports)
        try:
            await n.wait(lambda: n.of("node", "ready"))
            yield n
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await n.send(op="quit")
                    with anyio.move_on_after(10):
                        await process.wait()
                finally:
                    if process.returncode is None:
                        process.kill()
                tg.cancel_scope.cancel()


def figures(name: str, **values: object) -> None:
    print(f"\n[redis-figures] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


async def test_two_processes_deliver_in_order(redis_server: str, prefix: str) -> None:
    async with node(redis_server, prefix) as a, node(redis_server, prefix) as b:
        await a.send(op="subscribe", tag="sa", session="room")
        await b.send(op="subscribe", tag="sb", session="room")
        await a.wait(lambda: a.of("sa", "entered"))
        await b.wait(lambda: b.of("sb", "entered"))
        for i in range(40):
            publisher = a if i % 2 else b
            await publisher.send(op="publish", tag=f"p{i}", session="room")
            await publisher.wait(lambda: publisher.of(f"p{i}", "done"))  # noqa: B023
        acked = [(a if i % 2 else b).of(f"p{i}", "ack")[0]["id"] for i in range(40)]
        await a.wait(lambda: len(a.events("sa")) >= 40)
        await b.wait(lambda: len(b.events("sb")) >= 40)
        assert a.events("sa") == acked
        assert b.events("sb") == acked
        figures("two-processes", published=40, acknowledged=len(acked), delivered=80, gaps=0)


async def test_resume_on_another_process(redis_server: str, prefix: str) -> None:
    async with node(redis_server, prefix) as a, node(redis_server, prefix) as b:
        await a.send(op="subscribe", tag="s1", session="room", limit=8)
        await a.wait(lambda: a.of("s1", "entered"))
        await a.send(op="publish", tag="p", session="room", count=20)
        await a.wait(lambda: a.of("p", "done") and a.of("s1", "end"))
        acked = [r["id"] for r in a.of("p", "ack")]
        seen = a.events("s1")
        assert seen == acked[:8]
        await b.send(op="subscribe", tag="s2", session="room", last_event_id=seen[-1])
        await b.wait(lambda: b.of("s2", "entered"))
        assert b.of("s2", "entered")[0]["gap"] is False
        assert b.of("s2", "entered")[0]["replayed"] == 12
        await a.send(op="publish", tag="q", session="room", count=5)
        await a.wait(lambda: a.of("q", "done"))
        acked += [r["id"] for r in a.of("q", "ack")]
        await b.wait(lambda: len(b.events("s2")) >= 17)
        assert seen + b.events("s2") == acked


async def test_client_kill_pubsub_loses_no_acknowledged_event(
    redis_server: str,
    prefix: str,
    raw: aioredis.Redis,
) -> None:
    async with node(redis_server, prefix) as a, node(redis_server, prefix) as b:
        await a.send(op="subscribe", tag="s", session="room")
        await a.wait(lambda: a.of("s", "entered"))
        await b.send(op="publish", tag="p", session="room", count=400, interval=0.002)
        kills = 0
        for _ in range(4):
            await anyio.sleep(0.15)
            kills += await raw.client_kill_filter(_type="pubsub")
        await b.wait(lambda: b.of("p", "done"))
        acked = [r["id"] for r in b.of("p", "ack")]
        await a.wait(lambda: len(a.events("s")) >= len(acked))
        assert a.events("s") == acked
        stats = (await a.stats())["backend"]
        assert kills >= 1
        assert stats["reconnects"] >= 1
        figures(
            "client-kill-pubsub",
            published=400,
            acknowledged=len(acked),
            delivered=len(a.events("s")),
            recovered=stats["recoveredEvents"],
            reconnects=stats["reconnects"],
            kills=kills,
            gaps=len([r for r in a.of("s", "end") if r["error"]]),
        )


async def test_redis_restart_signals_gap(private_redis: RedisServer, prefix: str) -> None:
    url = private_redis.url
    async with node(url, prefix) as a, node(url, prefix) as b:
        await a.send(op="subscribe", tag="s", session="room")
        await a.wait(lambda: a.of("s", "entered"))
        await b.send(op="publish", tag="p", session="room", count=150, interval=0.01)
        await b.wait(lambda: len(b.of("p", "ack")) >= 40)
        private_redis.kill()
        await b.wait(lambda: len(b.of("p", "nack")) >= 10)
        private_redis.start()
        await b.wait(lambda: b.of("p", "done"))
        await a.wait(lambda: a.of("s", "end"))
        [end] = a.of("s", "end")
        assert end["error"] == "GapError"
        acks, nacks = b.of("p", "ack"), b.of("p", "nack")
        assert {r["error"] for r in nacks} == {"BackendUnavailableError"}
        assert len(acks) + len(nacks) == 150
        delivered = a.events("s")
        acked = [r["id"] for r in acks]
        # Delivered events were all acknowledged, in order; none is duplicated.
        assert delivered == acked[: len(delivered)]
        last = delivered[-1]
        await a.send(op="subscribe", tag="s2", session="room", last_event_id=last)
        await a.wait(lambda: a.of("s2", "entered"))
        assert a.of("s2", "entered")[0]["gap"] is True
        stats = (await a.stats())["backend"]
        assert stats["gapsSignalled"] == 1
        figures(
            "redis-restart",
            published=150,
            acknowledged=len(acks),
            refused=len(nacks),
            delivered_before_gap=len(delivered),
            gaps=stats["gapsSignalled"],
            resubscribe_gap=a.of("s2", "entered")[0]["gap"],
            replayed_after_restart=a.of("s2", "entered")[0]["replayed"],
        )
