"""subscribe_many / MultiSubscription: several sessions on one stream, one resume cursor.

Most tests run on the memory backend (asyncio and trio) and on a real
redis-server (asyncio: RedisBackend refuses trio), through the `open_broadcaster`
fixture.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sse_broadcaster import (
    BroadcasterClosedError,
    BroadcasterConfig,
    Event,
    EventBroadcaster,
    GapError,
    MultiSubscription,
    OverflowPolicy,
    SessionLimitError,
    SlowSubscriberError,
    SubscriberLimitError,
)
from sse_broadcaster._multi import (
    CURSOR_VERSION,
    encode_cursor,
    max_cursor_length,
    parse_cursor,
    session_tag,
)
from sse_broadcaster.backends import MemoryBackend
from sse_broadcaster.backends._base import Replay
from tests.support.core import assert_nothing_held
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.anyio

Opener = Callable[..., AbstractAsyncContextManager[EventBroadcaster]]


@pytest.fixture(
    params=[
        pytest.param(("asyncio", "memory"), id="asyncio-memory"),
        pytest.param(("trio", "memory"), id="trio-memory"),
        pytest.param(("asyncio", "redis"), id="asyncio-redis", marks=pytest.mark.redis),
    ]
)
def setup(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


memory_only = pytest.mark.parametrize(
    "setup",
    [
        pytest.param(("asyncio", "memory"), id="asyncio-memory"),
        pytest.param(("trio", "memory"), id="trio-memory"),
    ],
)


@pytest.fixture
def anyio_backend(setup: tuple[str, str]) -> str:
    return setup[0]


@pytest.fixture
def store(setup: tuple[str, str]) -> str:
    return setup[1]


@pytest.fixture
def open_broadcaster(store: str, request: pytest.FixtureRequest) -> Opener:
    """``open_broadcaster(config)``: an entered EventBroadcaster on the test's backend."""
    if store == "memory":

        def memory(config: BroadcasterConfig | None = None) -> EventBroadcaster:
            return EventBroadcaster(config)

        return memory
    from sse_broadcaster.redis import RedisBackend

    url = request.getfixturevalue("redis_server")
    prefix = f"t{uuid.uuid4().hex[:10]}"

    def on_redis(config: BroadcasterConfig | None = None) -> EventBroadcaster:
        backend = RedisBackend(
            url, prefix=prefix, attach_timeout=5.0, min_backoff=0.02, max_backoff=0.2
        )
        return EventBroadcaster(config, backend=backend)

    return on_redis


async def receive(multi: MultiSubscription, n: int, within: float = 5.0) -> list[Event]:
    events: list[Event] = []
    with anyio.fail_after(within):
        while len(events) < n:
            events.extend(await multi.receive_batch(n - len(events)))
    return events


def by_session(events: Sequence[Event]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for event in events:
        grouped.setdefault(event.session_id, []).append(event.data)
    return grouped


async def publish_each(
    broadcaster: EventBroadcaster, sessions: Sequence[str], stop: int, start: int = 0
) -> None:
    for i in range(start, stop):
        for session_id in sessions:
            await broadcaster.publish(session_id, f"{session_id}{i}")


async def collect(multi: MultiSubscription, into: list[Event]) -> None:
    async for event in multi:
        into.append(event)


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    with anyio.fail_after(within):
        while not condition():
            await anyio.sleep(0.005)


# -- receiving ---------------------------------------------------------------------------


async def test_interleaving_keeps_each_session_in_publish_order(open_broadcaster: Opener) -> None:
    async with open_broadcaster() as broadcaster:
        async with broadcaster.subscribe_many(["a", "b", "c"]) as multi:
            assert (multi.session_ids, multi.gaps) == (("a", "b", "c"), frozenset())
            pattern = "aabcacbbbacca"
            for i, session_id in enumerate(pattern):
                await broadcaster.publish(session_id, f"{session_id}{i}")
            events = await receive(multi, len(pattern))
            expected: dict[str, list[str]] = {}
            for i, session_id in enumerate(pattern):
                expected.setdefault(session_id, []).append(f"{session_id}{i}")
            assert by_session(events) == expected
            assert all(e.data.startswith(e.session_id) for e in events)
            assert multi.drain_nowait() == []
        assert_nothing_held(broadcaster, "a", "b", "c")


@memory_only
async def test_sessions_are_merged_by_timestamp() -> None:
    now = [1000.0]

    def clock() -> float:
        now[0] += 1
        return now[0]

    async with (
        EventBroadcaster(clock=clock) as broadcaster,
        broadcaster.subscribe_many(["a", "b", "c"]) as multi,
    ):
        pattern = "abcabbcaacb"
        for i, session_id in enumerate(pattern):
            await broadcaster.publish(session_id, str(i))
        events = multi.drain_nowait(3) + multi.drain_nowait(1)
        events += await multi.receive_batch()
        assert [e.data for e in events] == [str(i) for i in range(len(pattern))]
        for i, session_id in enumerate(pattern[:4]):
            await broadcaster.publish(session_id, str(i))
        assert [(await multi.receive()).data for _ in range(4)] == ["0", "1", "2", "3"]


@memory_only
async def test_a_clock_going_back_keeps_each_session_in_order() -> None:
    now = [1000.0]

    def clock() -> float:
        now[0] -= 1
        return now[0]

    async with EventBroadcaster(clock=clock) as broadcaster:
        async with broadcaster.subscribe_many(["a", "b"]) as multi:
            await publish_each(broadcaster, ["a", "b"], 4)
            events = multi.drain_nowait(3) + multi.drain_nowait()
        assert by_session(events) == {"a": ["a0", "a1", "a2", "a3"], "b": ["b0", "b1", "b2", "b3"]}


async def test_a_waiting_receiver_wakes_for_any_session(open_broadcaster: Opener) -> None:
    async with (
        open_broadcaster() as broadcaster,
        broadcaster.subscribe_many(["a", "b", "c"]) as multi,
    ):
        for session_id in ("c", "a", "b"):
            got: list[Event] = []

            async def receiver() -> None:
                got.extend(await multi.receive_batch())  # noqa: B023

            async with anyio.create_task_group() as tg:
                tg.start_soon(receiver)
                await anyio.sleep(0.01)
                # One parked task at most: a second receiver is refused.
                with pytest.raises(anyio.BusyResourceError):
                    await multi.receive()
                await broadcaster.publish(session_id, "x")
                with anyio.fail_after(5):
                    while not got:
                        await anyio.sleep(0.005)
            assert [(e.session_id, e.data) for e in got] == [(session_id, "x")]


async def test_interrupt_returns_an_empty_batch_once(open_broadcaster: Opener) -> None:
    async with (
        open_broadcaster() as broadcaster,
        broadcaster.subscribe_many(["a", "b"]) as multi,
    ):
        multi._interrupt()
        assert await multi.receive_batch() == []
        got: list[list[Event]] = []
        async with anyio.create_task_group() as tg:

            async def receiver() -> None:
                got.append(await multi.receive_batch())

            tg.start_soon(receiver)
            await anyio.sleep(0.01)
            multi._interrupt()
        assert got == [[]]
        await broadcaster.publish("b", "1")
        assert [e.data for e in await receive(multi, 1)] == ["1"]


@memory_only
async def test_misuse() -> None:
    async with EventBroadcaster() as broadcaster:
        multi = broadcaster.subscribe_many(["a", "b"])
        message = re.escape("enter the multi-subscription first: 'async with multi:'")
        with pytest.raises(RuntimeError, match=message):
            await multi.receive()
        with pytest.raises(RuntimeError, match=message):
            multi.receive_nowait()
        async with multi:
            with pytest.raises(anyio.WouldBlock):
                multi.receive_nowait()
            with pytest.raises(
                ValueError, match=re.escape("max_events must be None or >= 1, got 0")
            ):
                await multi.receive_batch(0)
            with pytest.raises(
                ValueError, match=re.escape("max_bytes must be None or >= 1, got 0")
            ):
                await multi.receive_batch(max_bytes=0)
            with pytest.raises(RuntimeError, match="entered only once"):
                await multi.__aenter__()
            assert "sessions=2 open" in repr(multi)
        assert multi.closed
        with pytest.raises(anyio.ClosedResourceError):
            await multi.receive()
        with pytest.raises(RuntimeError, match="entered only once"):
            await multi.__aenter__()
        assert_nothing_held(broadcaster, "a", "b")


# -- the cursor ----------------------------------------------------------------------------


async def test_cursor_round_trip_resumes_every_session_exactly(open_broadcaster: Opener) -> None:
    sessions = ["a", "b", "c"]
    async with open_broadcaster() as broadcaster:
        async with broadcaster.subscribe_many(sessions) as multi:
            await publish_each(broadcaster, sessions, 5)
            first = await receive(multi, 7)
            cursor = multi.cursor
        assert cursor.startswith(CURSOR_VERSION)
        await publish_each(broadcaster, sessions, 8, 5)  # while the client is away
        async with broadcaster.subscribe_many(sessions, cursor=cursor) as multi:
            assert multi.gaps == frozenset()
            await publish_each(broadcaster, sessions, 10, 8)  # live, after the resume
            rest = await receive(multi, 3 * 10 - 7)
            with anyio.move_on_after(0.1):
                extra = await multi.receive_batch()
                pytest.fail(f"unexpected {extra}")
            # A cursor taken again resumes again, with nothing left to replay.
            cursor = multi.cursor
        async with broadcaster.subscribe_many(sessions, cursor=cursor) as multi:
            assert (multi.gaps, multi.drain_nowait()) == (frozenset(), [])
        received = by_session(first + rest)
        for session_id in sessions:
            assert received[session_id] == [f"{session_id}{i}" for i in range(10)], session_id


async def test_a_quiet_session_event_during_the_disconnect_is_replayed(
    open_broadcaster: Opener,
) -> None:
    async with open_broadcaster() as broadcaster:
        old = await broadcaster.publish("quiet-old", "before")
        sessions = ["busy", "quiet-new", "quiet-old"]
        async with broadcaster.subscribe_many(sessions) as multi:
            await broadcaster.publish("busy", "1")
            assert [e.data for e in await receive(multi, 1)] == ["1"]
            cursor = multi.cursor
        # Events published to the sessions that had none while connected: they
        # are after the positions the sessions had at entry.
        new = await broadcaster.publish("quiet-new", "away")
        missed = await broadcaster.publish("quiet-old", "away")
        async with broadcaster.subscribe_many(sessions, cursor=cursor) as multi:
            assert multi.gaps == frozenset()
            # Replays are queued on entry; "before" is not among them.
            assert multi.drain_nowait() == [new, missed]
            with anyio.move_on_after(0.1):
                pytest.fail(f"unexpected {await multi.receive_batch()}")
        assert old not in await broadcaster.history("quiet-old", after=old.id)


async def test_quiet_sessions_replay_exactly(open_broadcaster: Opener) -> None:
    async with open_broadcaster() as broadcaster:
        await broadcaster.publish("quiet-old", "before")
        sessions = ["busy", "quiet-new", "quiet-old"]
        async with broadcaster.subscribe_many(sessions) as multi:
            cursor = multi.cursor  # before any event
        new = await broadcaster.publish("quiet-new", "away")
        missed = await broadcaster.publish("quiet-old", "away")
        async with broadcaster.subscribe_many(sessions, cursor=cursor) as multi:
            assert multi.gaps == frozenset()
            events = await receive(multi, 2)
            assert sorted(events, key=lambda e: e.session_id) == [new, missed]
            with anyio.move_on_after(0.1):
                pytest.fail(f"unexpected {await multi.receive_batch()}")


async def test_reordered_sessions_resume_exactly_and_an_added_one_has_a_gap(
    open_broadcaster: Opener,
) -> None:
    async with open_broadcaster() as broadcaster:
        async with broadcaster.subscribe_many(["a", "b"]) as multi:
            await publish_each(broadcaster, ["a", "b"], 2)
            await receive(multi, 4)
            cursor = multi.cursor
        await publish_each(broadcaster, ["a", "b", "c"], 3, 2)
        # The tags bind positions to sessions: order does not matter.
        async with broadcaster.subscribe_many(["c", "b", "a"], cursor=cursor) as multi:
            assert multi.gaps == {"c"}
            assert by_session(multi.drain_nowait()) == {"a": ["a2"], "b": ["b2"], "c": ["c2"]}


def _tagged(session_id: str, position: str) -> str:
    return session_tag(session_id) + position


BAD_CURSORS = {
    "plain-event-id": lambda ids: ids["a"],
    "foreign-sessions": lambda ids: encode_cursor([(session_tag("x"), ids["a"])]),
    "malformed-entry": lambda ids: "m1." + _tagged("a", ids["a"]) + ",zz",
    "bad-character": lambda ids: "m1." + _tagged("a", ids["a"] + "\u00e9"),
    "empty-entry": lambda ids: "m1." + _tagged("a", ids["a"]) + ",",
    "uppercase-tag": lambda ids: "m1." + _tagged("a", ids["a"]).upper(),
    "over-long": lambda ids: "m1." + _tagged("a", ids["a"]) + "," + "x" * 5000,
    "old-version": lambda ids: "m0." + _tagged("a", ids["a"]) + "," + _tagged("b", ids["b"]),
    "next-version": lambda ids: "m2." + _tagged("a", ids["a"]) + "," + _tagged("b", ids["b"]),
    "no-entries": lambda ids: "m1.",
    "position-too-long": lambda ids: "m1." + _tagged("a", "1" * 65),
}


@pytest.mark.parametrize("kind", list(BAD_CURSORS))
async def test_a_bad_cursor_resumes_every_session_with_a_gap(
    open_broadcaster: Opener, kind: str
) -> None:
    async with open_broadcaster() as broadcaster:
        sent = {s: [await broadcaster.publish(s, f"{s}{i}") for i in range(3)] for s in "ab"}
        cursor = BAD_CURSORS[kind]({s: events[0].id for s, events in sent.items()})
        async with broadcaster.subscribe_many(["a", "b"], cursor=cursor) as multi:
            assert multi.gaps == {"a", "b"}
            # Nothing received yet of a replay with a gap: the positions are
            # unknown, so a reconnect now would replay it all again, with the gap.
            assert multi.cursor == "m1."
            events = multi.drain_nowait()
            assert by_session(events) == {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"]}
            assert multi.cursor == "m1." + ",".join(
                [_tagged("a", sent["a"][2].id), _tagged("b", sent["b"][2].id)]
            )
        assert_nothing_held(broadcaster, "a", "b")


async def test_an_entry_twice_or_a_shared_tag_is_a_gap_for_that_session(
    open_broadcaster: Opener,
) -> None:
    async with open_broadcaster() as broadcaster:
        a = [await broadcaster.publish("a", str(i)) for i in range(3)]
        b = [await broadcaster.publish("b", str(i)) for i in range(3)]
        cursor = "m1." + ",".join(
            [_tagged("a", a[0].id), _tagged("a", a[1].id), _tagged("b", b[1].id)]
        )
        async with broadcaster.subscribe_many(["a", "b"], cursor=cursor) as multi:
            assert multi.gaps == {"a"}
            assert multi.drain_nowait() == [*a, b[2]]


async def test_an_empty_cursor_is_a_new_subscriber(open_broadcaster: Opener) -> None:
    async with open_broadcaster() as broadcaster:
        await broadcaster.publish("a", "old")
        async with broadcaster.subscribe_many(["a"], cursor="") as multi:
            assert (multi.gaps, multi.drain_nowait()) == (frozenset(), [])


# -- limits and clean-up ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("session_ids", "error", "message"),
    [
        pytest.param(
            [], ValueError, "session_ids must name at least one session, got none", id="empty"
        ),
        pytest.param(
            [f"s{i}" for i in range(4)],
            ValueError,
            "session_ids names 4 sessions: max_sessions_per_subscription=3",
            id="too-many",
        ),
        pytest.param(
            ["a", "b", "a"], ValueError, "session_ids names session 'a' more than once", id="twice"
        ),
        pytest.param(["a", "bad\nid"], ValueError, "control characters", id="bad-id"),
        pytest.param("abc", TypeError, "session_ids must be a sequence of session ids", id="str"),
    ],
)
def test_bad_session_lists(session_ids: Any, error: type[Exception], message: str) -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig(max_sessions_per_subscription=3))
    with pytest.raises(error, match=re.escape(message)):
        broadcaster.subscribe_many(session_ids)


def test_bad_cursor_type() -> None:
    with pytest.raises(TypeError, match=re.escape("cursor must be a str or None, got 5")):
        EventBroadcaster().subscribe_many(["a"], cursor=5)  # type: ignore[arg-type]


async def test_the_maximum_is_allowed(open_broadcaster: Opener) -> None:
    config = BroadcasterConfig(max_sessions_per_subscription=16)
    sessions = [f"room-{i}" for i in range(16)]
    async with open_broadcaster(config) as broadcaster:
        async with broadcaster.subscribe_many(sessions) as multi:
            for session_id in sessions:
                await broadcaster.publish(session_id, "x")
            assert len(await receive(multi, 16)) == 16
            assert all(broadcaster.subscriber_count(s) == 1 for s in sessions)
            cursor = multi.cursor
        assert_nothing_held(broadcaster, *sessions)
        assert len(cursor) <= max_cursor_length(16)


async def test_a_failed_entry_closes_the_sessions_entered_before(
    open_broadcaster: Opener,
) -> None:
    config = BroadcasterConfig(max_subscribers_per_session=1)
    async with open_broadcaster(config) as broadcaster:
        async with broadcaster.subscribe("b"):
            multi = broadcaster.subscribe_many(["a", "b", "c"])
            with pytest.raises(SubscriberLimitError, match="session 'b' has 1 subscribers"):
                await multi.__aenter__()
            assert multi.closed
            assert broadcaster.subscriber_count("a") == 0
            assert broadcaster.subscriber_count("b") == 1
            assert broadcaster.stats()["totalSubscribers"] == 1
        assert_nothing_held(broadcaster, "a", "b", "c")


async def test_session_limit_at_entry_leaks_nothing(open_broadcaster: Opener) -> None:
    config = BroadcasterConfig(max_sessions=2)
    async with open_broadcaster(config) as broadcaster:
        with pytest.raises(SessionLimitError, match="max_sessions=2"):
            async with broadcaster.subscribe_many(["a", "b", "c"]):
                pytest.fail("entered")
        assert_nothing_held(broadcaster, "a", "b", "c")
        async with broadcaster.subscribe_many(["a", "b"]) as multi:
            await broadcaster.publish("a", "1")
            assert len(await receive(multi, 1)) == 1


async def test_cancelled_entry_leaks_nothing(open_broadcaster: Opener) -> None:
    async with open_broadcaster() as broadcaster:
        for delay in (0, 0.0005, 0.002, 0.01):
            multi = broadcaster.subscribe_many(["a", "b", "c", "d"])
            with anyio.move_on_after(delay):
                async with multi:
                    await anyio.sleep_forever()
            assert multi.closed
            assert_nothing_held(broadcaster, "a", "b", "c", "d")


# -- one session ends --------------------------------------------------------------------------


async def test_a_closed_session_ends_the_stream_after_what_was_queued(
    open_broadcaster: Opener,
) -> None:
    async with open_broadcaster() as broadcaster:
        async with broadcaster.subscribe_many(["a", "b"]) as multi:
            await publish_each(broadcaster, ["a", "b"], 2)
            await wait_until(lambda: multi.queued == 4)
            await broadcaster.close_session("b")
            with anyio.fail_after(5):
                events = [event async for event in multi]
            assert by_session(events) == {"a": ["a0", "a1"], "b": ["b0", "b1"]}
            assert multi.ended_session == "b"
            assert multi.closed
            # The other session no longer counts a subscriber from here.
            assert broadcaster.subscriber_count("a") == 0
            cursor = multi.cursor
        await broadcaster.publish("a", "a2")
        async with broadcaster.subscribe_many(["a", "b"], cursor=cursor) as multi:
            assert multi.gaps == {"b"}  # its history is gone
            assert [e.data for e in await receive(multi, 1)] == ["a2"]
        assert_nothing_held(broadcaster, "a", "b")


async def test_a_slow_session_disconnects_the_stream_and_resumes_with_no_hole(
    open_broadcaster: Opener,
) -> None:
    config = BroadcasterConfig(max_queue_size=3, overflow_policy=OverflowPolicy.DISCONNECT)
    async with open_broadcaster(config) as broadcaster:
        async with broadcaster.subscribe_many(["a", "b"]) as multi:
            await broadcaster.publish("a", "a0")
            for i in range(6):
                await broadcaster.publish("b", f"b{i}")
            await wait_until(lambda: broadcaster.stats()["slowSubscriberDisconnects"] == 1)
            received: list[Event] = []
            with anyio.fail_after(5), pytest.raises(SlowSubscriberError, match="session 'b'"):
                await collect(multi, received)
            assert multi.ended_session == "b"
            cursor = multi.cursor
        assert by_session(received) == {"a": ["a0"], "b": ["b0", "b1", "b2"]}
        async with broadcaster.subscribe_many(["a", "b"], cursor=cursor) as multi:
            assert multi.gaps == frozenset()
            assert by_session(await receive(multi, 3)) == {"b": ["b3", "b4", "b5"]}
        assert_nothing_held(broadcaster, "a", "b")


async def test_a_drop_policy_applies_per_session(open_broadcaster: Opener) -> None:
    config = BroadcasterConfig(max_queue_size=2, overflow_policy=OverflowPolicy.DROP_OLDEST)
    async with (
        open_broadcaster(config) as broadcaster,
        broadcaster.subscribe_many(["a", "b"]) as multi,
    ):
        await broadcaster.publish("a", "a0")
        for i in range(5):
            await broadcaster.publish("b", f"b{i}")
        await wait_until(lambda: broadcaster.stats()["eventsDropped"] == 3)
        events = await receive(multi, 3)
        assert by_session(events) == {"a": ["a0"], "b": ["b3", "b4"]}


async def test_disconnecting_one_session_ends_the_stream_and_resumes_with_no_gap(
    open_broadcaster: Opener,
) -> None:
    async with open_broadcaster() as broadcaster:
        async with broadcaster.subscribe_many(["a", "b"]) as multi:
            await publish_each(broadcaster, ["a", "b"], 1)
            await wait_until(lambda: multi.queued == 2)
            assert broadcaster.disconnect_subscribers("a") == 1
            with anyio.fail_after(5):
                assert by_session([e async for e in multi]) == {"a": ["a0"], "b": ["b0"]}
            assert multi.ended_session == "a"
            cursor = multi.cursor
        await publish_each(broadcaster, ["a", "b"], 2, 1)
        async with broadcaster.subscribe_many(["a", "b"], cursor=cursor) as multi:
            assert multi.gaps == frozenset()
            assert by_session(multi.drain_nowait()) == {"a": ["a1"], "b": ["b1"]}
        assert_nothing_held(broadcaster, "a", "b")


@memory_only
async def test_entering_a_broadcaster_not_running_leaks_nothing() -> None:
    broadcaster = EventBroadcaster()
    with pytest.raises(BroadcasterClosedError, match="not running"):
        async with broadcaster.subscribe_many(["a", "b"]):
            pytest.fail("entered")
    assert_nothing_held(broadcaster, "a", "b")


async def test_closing_the_broadcaster_ends_the_stream(open_broadcaster: Opener) -> None:
    async with open_broadcaster() as broadcaster:
        multi = broadcaster.subscribe_many(["a", "b"])
        await multi.__aenter__()
        await broadcaster.publish("a", "1")
        await wait_until(lambda: multi.queued == 1)
    with anyio.fail_after(5):
        assert [e.data async for e in multi] == ["1"]
    assert multi.ended_session == "a"
    await multi.aclose()


async def test_closing_while_receiving(open_broadcaster: Opener) -> None:
    async with open_broadcaster() as broadcaster:
        multi = broadcaster.subscribe_many(["a", "b"])

        async def receiver() -> None:
            with pytest.raises(anyio.ClosedResourceError):
                await multi.receive()

        async with multi, anyio.create_task_group() as tg:
            tg.start_soon(receiver)
            await anyio.sleep(0.01)
            await multi.aclose()
        assert_nothing_held(broadcaster, "a", "b")


# -- backends ------------------------------------------------------------------------------------


class _NoPositionBackend(MemoryBackend):
    """A backend that does not report positions (as third-party ones may not)."""

    async def attach(self, session_id: str, last_event_id: str | None, register: Any) -> Replay:
        replay = await super().attach(session_id, last_event_id, register)
        return Replay(replay.events, replay.gap)


@memory_only
async def test_a_backend_without_positions_resumes_with_a_gap() -> None:
    async with EventBroadcaster(backend=_NoPositionBackend()) as broadcaster:
        async with broadcaster.subscribe_many(["a", "b"]) as multi:
            event = await broadcaster.publish("a", "1")
            assert await receive(multi, 1) == [event]
            cursor = multi.cursor
        assert cursor == "m1." + session_tag("a") + event.id
        missed = await broadcaster.publish("b", "1")
        async with broadcaster.subscribe_many(["a", "b"], cursor=cursor) as multi:
            assert multi.gaps == {"b"}
            assert multi.drain_nowait() == [missed]


@memory_only
async def test_memory_positions_mark_the_epoch() -> None:
    async with EventBroadcaster() as broadcaster:
        async with broadcaster.subscribe("new") as sub:
            assert sub.position is not None
            assert sub.position.endswith("-0")
        await broadcaster.close_session("new")
        event = await broadcaster.publish("new", "1")
        # The session was created again: the old marker is from another epoch.
        async with broadcaster.subscribe("new", last_event_id=sub.position) as again:
            assert again.gap
            assert again.drain_nowait() == [event]
            assert again.position == event.id


@pytest.mark.parametrize("setup", [pytest.param(("asyncio", "redis"), id="asyncio-redis")])
@pytest.mark.redis
async def test_redis_empty_stream_position(open_broadcaster: Opener) -> None:
    config = BroadcasterConfig(max_history_per_session=3)
    async with open_broadcaster(config) as broadcaster:
        async with broadcaster.subscribe("room") as sub:
            assert sub.position == "0-0"
        async with broadcaster.subscribe("room", last_event_id="0-0") as sub:
            assert (sub.gap, sub.drain_nowait()) == (False, [])
        sent = [await broadcaster.publish("room", str(i)) for i in range(3)]
        async with broadcaster.subscribe("room", last_event_id="0-0") as sub:
            assert (sub.gap, sub.drain_nowait(), sub.position) == (False, sent, sent[-1].id)
        await broadcaster.publish("room", "3")  # trims the first entry
        async with broadcaster.subscribe("room", last_event_id="0-0") as sub:
            assert sub.gap
            assert len(sub.drain_nowait()) == 3


@pytest.mark.parametrize("setup", [pytest.param(("asyncio", "redis"), id="asyncio-redis")])
@pytest.mark.redis
async def test_redis_gap_ends_the_stream_and_names_the_session(
    private_redis: RedisServer,
) -> None:
    from sse_broadcaster.redis import RedisBackend

    backend = RedisBackend(private_redis.url, attach_timeout=5.0, min_backoff=0.02, max_backoff=0.2)
    async with EventBroadcaster(backend=backend) as broadcaster:
        async with broadcaster.subscribe_many(["a", "b"]) as multi:
            await broadcaster.publish("a", "1")
            await receive(multi, 1)
            private_redis.kill()
            await wait_until(lambda: not broadcaster.stats()["backend"]["connected"])
            private_redis.start()
            with anyio.fail_after(10), pytest.raises(GapError, match="events of session 'a'"):
                async for _ in multi:
                    pass
            assert multi.ended_session == "a"
            cursor = multi.cursor
        async with broadcaster.subscribe_many(["a", "b"], cursor=cursor) as multi:
            # a's last id is gone with the data; b was empty and still is.
            assert multi.gaps == {"a"}
        assert_nothing_held(broadcaster, "a", "b")


# -- the cursor format ---------------------------------------------------------------------------


def test_cursor_format() -> None:
    assert session_tag("room-1") == session_tag("room-1")
    assert re.fullmatch("[0-9a-f]{8}", session_tag("room-1"))
    tags = [session_tag(s) for s in ("a", "b")]
    cursor = encode_cursor([(tags[0], "abc123-4"), (tags[1], None)])
    assert cursor == f"m1.{tags[0]}abc123-4"
    assert parse_cursor(cursor, ["b", "a"], 16) == {"b": None, "a": "abc123-4"}
    # Positions an SSE id could not carry, or too long, are left out.
    assert encode_cursor([(tags[0], "a,b"), (tags[1], "x" * 65)]) == "m1."
    assert max_cursor_length(16) == 3 + 16 * 73 - 1
    # Any valid session id has a tag, a lone surrogate included.
    assert re.fullmatch("[0-9a-f]{8}", session_tag("room-\ud800"))


@given(st.text(max_size=300))
def test_parsing_never_raises(text: str) -> None:
    resolved = parse_cursor(text, ["a", "b"], 4)
    assert set(resolved) == {"a", "b"}


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z0-9_-]{1,20}", fullmatch=True),
            st.from_regex(r"[0-9A-Za-z._~-]{1,64}", fullmatch=True),
        ),
        min_size=1,
        max_size=16,
        unique_by=lambda pair: pair[0],
    )
)
def test_cursor_round_trip_and_sse_safety(pairs: list[tuple[str, str]]) -> None:
    cursor = encode_cursor((session_tag(s), p) for s, p in pairs)
    # A valid SSE id: printable ASCII, no CR/LF/NUL, no leading or trailing space.
    assert re.fullmatch(r"[!-~]+", cursor)
    assert len(cursor) <= max_cursor_length(len(pairs))
    sessions = [s for s, _ in pairs]
    if len({session_tag(s) for s in sessions}) == len(sessions):
        assert parse_cursor(cursor, sessions, 16) == dict(pairs)
