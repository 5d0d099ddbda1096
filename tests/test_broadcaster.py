"""EventBroadcaster: life cycle, publish, bad input, replay and gaps, limits, shutdown."""

from __future__ import annotations

import gc
import json
import random
import re
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from sse_broadcaster import (
    BackendUnavailableError,
    BroadcasterClosedError,
    BroadcasterConfig,
    BroadcasterError,
    Event,
    EventBroadcaster,
    EventTooLargeError,
    SessionLimitError,
    SubscriberLimitError,
    check_session_id,
)
from sse_broadcaster.backends import MemoryBackend

from .support.clock import FakeClock
from .support.core import assert_nothing_held, enter_concurrently

pytestmark = pytest.mark.anyio


def seq(event_id: str) -> int:
    """The integer after the last "-" of a memory-backend id."""
    return int(event_id.rpartition("-")[2])


def epoch(event_id: str) -> str:
    return event_id.rpartition("-")[0]


# -- life cycle ----------------------------------------------------------------------------


async def test_publish_and_subscribe_need_a_running_broadcaster() -> None:
    broadcaster = EventBroadcaster()
    assert repr(broadcaster) == "<EventBroadcaster not started backend=MemoryBackend subscribers=0>"
    not_running = re.escape(
        "the EventBroadcaster is not running: enter it first "
        "('async with broadcaster:' or the adapters' lifespan helper)"
    )
    with pytest.raises(BroadcasterClosedError, match=not_running):
        await broadcaster.publish("room", "x")
    subscription = broadcaster.subscribe("room")
    with pytest.raises(BroadcasterClosedError, match=not_running):
        await subscription.__aenter__()
    for call in (
        broadcaster.history("room"),
        broadcaster.close_session("room"),
        broadcaster.cleanup(),
    ):
        with pytest.raises(BroadcasterClosedError, match=not_running):
            await call

    async with broadcaster:
        assert broadcaster.running
        assert repr(broadcaster) == "<EventBroadcaster running backend=MemoryBackend subscribers=0>"
        await broadcaster.publish("room", "x")
    assert repr(broadcaster) == "<EventBroadcaster closed backend=MemoryBackend subscribers=0>"

    closed = re.escape("the EventBroadcaster is closed")
    with pytest.raises(BroadcasterClosedError, match=closed):
        await broadcaster.publish("room", "x")
    with pytest.raises(BroadcasterClosedError, match=closed):
        async with broadcaster.subscribe("room"):
            pass
    for call in (
        broadcaster.history("room"),
        broadcaster.close_session("room"),
        broadcaster.cleanup(),
    ):
        with pytest.raises(BroadcasterClosedError, match=closed):
            await call


async def test_entering_twice_raises() -> None:
    broadcaster = EventBroadcaster()
    once = re.escape("an EventBroadcaster can be entered only once")
    async with broadcaster:
        with pytest.raises(RuntimeError, match=once):
            await broadcaster.__aenter__()
        assert broadcaster.running  # the failed entry changed nothing
        await broadcaster.publish("room", "x")
    with pytest.raises(RuntimeError, match=once):
        await broadcaster.__aenter__()


async def test_aclose_before_entering_then_entering_raises() -> None:
    broadcaster = EventBroadcaster()
    await broadcaster.aclose()
    with pytest.raises(RuntimeError, match="entered only once"):
        await broadcaster.__aenter__()


async def test_aclose_is_idempotent_and_the_body_keeps_running() -> None:
    # Regression: aclose() used to cancel the task group that the body of
    # 'async with broadcaster:' runs in, silently skipping the rest of the body.
    reached = False
    async with EventBroadcaster() as broadcaster:
        await broadcaster.aclose()
        await broadcaster.aclose()
        await anyio.lowlevel.checkpoint()
        with pytest.raises(BroadcasterClosedError):
            await broadcaster.publish("room", "x")
        reached = True
    assert reached


async def test_an_error_in_the_body_propagates() -> None:
    broadcaster = EventBroadcaster()
    with pytest.raises(KeyError, match="boom"):
        async with broadcaster:
            raise KeyError("boom")
    assert not broadcaster.running


async def test_an_outer_cancellation_of_the_body_is_honoured() -> None:
    with anyio.move_on_after(0.01) as scope:
        async with EventBroadcaster() as broadcaster:
            await anyio.sleep(10)
    assert scope.cancelled_caught
    assert not broadcaster.running


async def test_a_backend_that_fails_to_start_leaves_it_not_running() -> None:
    class Failing:
        async def start(self, hub: object) -> None:
            raise OSError("no backend")

    broadcaster = EventBroadcaster(backend=Failing())  # type: ignore[arg-type]
    with pytest.raises(OSError, match="no backend"):
        await broadcaster.__aenter__()
    assert not broadcaster.running


# -- publish ---------------------------------------------------------------------------------


async def test_publish_assigns_increasing_ids_per_session() -> None:
    clock = FakeClock()
    async with EventBroadcaster(clock=clock) as broadcaster:
        assert broadcaster.clock is clock
        a1 = await broadcaster.publish("a", "1")
        clock.now += 1
        a2 = await broadcaster.publish("a", "2", event="chat", retry=10)
        b1 = await broadcaster.publish("b", "1")
    assert (seq(a1.id), seq(a2.id), seq(b1.id)) == (1, 2, 1)
    assert epoch(a1.id) == epoch(a2.id) != epoch(b1.id)
    assert a2 == Event(a2.id, "a", "2", "chat", 10, clock.now)
    assert a1.timestamp == clock.now - 1
    assert a2.encode() == f"id: {a2.id}\nevent: chat\nretry: 10\ndata: 2\n\n".encode()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param("text", "text", id="str"),
        pytest.param(b"caf\xc3\xa9", "caf\u00e9", id="bytes"),
        pytest.param(bytearray(b"ab"), "ab", id="bytearray"),
        pytest.param(memoryview(b"ab"), "ab", id="memoryview"),
        pytest.param({"text": "hi", "n": [1, 2]}, '{"text":"hi","n":[1,2]}', id="dict-compact"),
        pytest.param({"t": "\u00e9\u2603"}, '{"t":"\u00e9\u2603"}', id="json-non-ascii"),
        pytest.param([1, None, True], "[1,null,true]", id="list"),
        pytest.param(42, "42", id="int"),
        pytest.param(None, "null", id="None"),
    ],
)
async def test_publish_serialises_data(data: object, expected: str) -> None:
    async with EventBroadcaster() as broadcaster:
        event = await broadcaster.publish("room", data)
    assert event.data == expected


async def test_publish_keeps_a_str_subclass_as_it_is() -> None:
    class Markup(str):
        pass

    async with EventBroadcaster() as broadcaster:
        event = await broadcaster.publish("room", Markup("<b>hi</b>"))
    assert event.data == "<b>hi</b>"
    assert event.encode() == f"id: {event.id}\ndata: <b>hi</b>\n\n".encode()


async def test_publish_uses_a_custom_json_dumps() -> None:
    async with EventBroadcaster(
        json_dumps=lambda obj: json.dumps(obj, sort_keys=True)
    ) as broadcaster:
        event = await broadcaster.publish("room", {"b": 1, "a": 2})
    assert event.data == '{"a": 2, "b": 1}'


async def test_invalid_utf8_bytes_are_rejected() -> None:
    async with EventBroadcaster() as broadcaster:
        with pytest.raises(
            ValueError,
            match=re.escape(
                "data bytes are not valid UTF-8: 'utf-8' codec can't decode byte 0xff "
                "in position 1: invalid start byte"
            ),
        ):
            await broadcaster.publish("room", b"a\xffb")
        assert broadcaster.stats()["totalSessions"] == 0


async def test_non_json_serialisable_data_is_rejected() -> None:
    async with EventBroadcaster() as broadcaster:
        with pytest.raises(
            TypeError,
            match=re.escape(
                "data must be str, bytes or JSON-serialisable, got object: "
                "Object of type object is not JSON serializable"
            ),
        ):
            await broadcaster.publish("room", object())
        with pytest.raises(
            TypeError, match=re.escape("got set: Object of type set is not JSON serializable")
        ):
            await broadcaster.publish("room", {1, 2})
        assert broadcaster.stats()["totalSessions"] == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=repr)
async def test_non_finite_floats_are_not_json(value: float) -> None:
    # Regression: json.dumps wrote NaN / Infinity, which JSON.parse in a browser rejects.
    async with EventBroadcaster() as broadcaster:
        message = (
            "data must be str, bytes or JSON-serialisable, got dict: "
            "Out of range float values are not JSON compliant"
        )
        # Newer Pythons append the value to json's message.
        with pytest.raises(TypeError, match=f"^{re.escape(message)}(: {re.escape(repr(value))})?$"):
            await broadcaster.publish("room", {"x": value})


async def test_json_dumps_must_return_str() -> None:
    async with EventBroadcaster(json_dumps=lambda obj: b"{}") as broadcaster:  # type: ignore[arg-type,return-value]
        with pytest.raises(TypeError, match=re.escape("json_dumps must return a str, got bytes")):
            await broadcaster.publish("room", {})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param(
            {"event": "a\nb"}, "event must not contain CR, LF or NUL, got 'a\\nb'", id="event-LF"
        ),
        pytest.param(
            {"event": "a\rb"}, "event must not contain CR, LF or NUL, got 'a\\rb'", id="event-CR"
        ),
        pytest.param(
            {"event": "a\0b"}, "event must not contain CR, LF or NUL, got 'a\\x00b'", id="event-NUL"
        ),
        pytest.param(
            {"event": ""}, "event must be a non-empty name or None, got ''", id="event-empty"
        ),
        pytest.param(
            {"retry": -1}, "retry must be an int >= 0 or None, got -1", id="retry-negative"
        ),
    ],
)
async def test_bad_event_fields_are_rejected_without_leaving_a_session(
    kwargs: dict[str, Any], message: str
) -> None:
    async with EventBroadcaster() as broadcaster:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            await broadcaster.publish("new", "x", **kwargs)
        # Regression: the refused event used to leave an empty session behind.
        assert broadcaster.stats()["totalSessions"] == 0
        # On an existing session the id sequence has no hole.
        first = await broadcaster.publish("old", "x")
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            await broadcaster.publish("old", "x", **kwargs)
        second = await broadcaster.publish("old", "x")
        assert seq(second.id) == seq(first.id) + 1
        assert broadcaster.stats()["totalSessions"] == 1


async def test_data_with_lone_surrogate_is_rejected() -> None:
    async with EventBroadcaster() as broadcaster:
        with pytest.raises(ValueError, match=r"^data is not encodable as UTF-8"):
            await broadcaster.publish("room", "a\udc80")
        assert broadcaster.stats()["totalSessions"] == 0


BAD_SESSION_IDS = [
    pytest.param("", "session_id must not be empty", id="empty"),
    pytest.param("x" * 257, "session_id must be at most 256 characters, got 257", id="too-long"),
    pytest.param(
        "\u00e9" * 300,
        "session_id must be at most 256 characters, got 300",
        id="too-long-non-ascii",
    ),
    pytest.param(
        "a\nb", "session_id must not contain control characters, got '\\n' in 'a\\nb'", id="LF"
    ),
    pytest.param(
        "a\rb", "session_id must not contain control characters, got '\\r' in 'a\\rb'", id="CR"
    ),
    pytest.param(
        "a\0", "session_id must not contain control characters, got '\\x00' in 'a\\x00'", id="NUL"
    ),
    pytest.param(
        "\tx", "session_id must not contain control characters, got '\\t' in '\\tx'", id="tab"
    ),
    pytest.param(
        "a\x7f", "session_id must not contain control characters, got '\\x7f' in 'a\\x7f'", id="DEL"
    ),
    pytest.param(
        "a\x85",
        "session_id must not contain control characters, got '\\x85' in 'a\\x85'",
        id="C1-NEL",
    ),
]


@pytest.mark.parametrize(("session_id", "message"), BAD_SESSION_IDS)
def test_check_session_id_names_what_is_wrong(session_id: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_session_id(session_id)


@pytest.mark.parametrize("session_id", ["a", "x" * 256, "room-1/\u00e9 \U0001f600"])
def test_check_session_id_returns_a_good_id(session_id: str) -> None:
    assert check_session_id(session_id) is session_id


def test_check_session_id_wants_a_str() -> None:
    with pytest.raises(TypeError, match=r"^session_id must be a str, got bytes$"):
        check_session_id(b"room")


@pytest.mark.parametrize(("session_id", "message"), BAD_SESSION_IDS)
async def test_bad_session_id_is_rejected_by_publish(session_id: str, message: str) -> None:
    async with EventBroadcaster() as broadcaster:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            await broadcaster.publish(session_id, "x")
        assert broadcaster.stats()["totalSessions"] == 0


@pytest.mark.parametrize(("session_id", "message"), BAD_SESSION_IDS)
async def test_bad_session_id_is_rejected_by_subscribe(session_id: str, message: str) -> None:
    async with EventBroadcaster() as broadcaster:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            broadcaster.subscribe(session_id)
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            await broadcaster.history(session_id)
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            await broadcaster.close_session(session_id)
        assert broadcaster.stats()["totalSessions"] == 0


@pytest.mark.parametrize("session_id", [5, None, b"room"], ids=["int", "None", "bytes"])
async def test_session_id_must_be_str(session_id: object) -> None:
    message = f"session_id must be a str, got {type(session_id).__name__}"
    async with EventBroadcaster() as broadcaster:
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            await broadcaster.publish(session_id, "x")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            broadcaster.subscribe(session_id)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "session_id",
    ["x" * 256, "r\u00e9union \u2603", "a b/c:d"],
    ids=["max-length", "unicode", "punctuation"],
)
async def test_good_session_ids_are_accepted(session_id: str) -> None:
    async with EventBroadcaster() as broadcaster:
        event = await broadcaster.publish(session_id, "x")
        async with broadcaster.subscribe(session_id, last_event_id=event.id) as sub:
            await broadcaster.publish(session_id, "y")
            assert (await sub.receive()).data == "y"


async def test_data_over_max_event_bytes() -> None:
    config = BroadcasterConfig(max_event_bytes=100)
    async with EventBroadcaster(config) as broadcaster:
        kept = await broadcaster.publish("room", "small")
        async with broadcaster.subscribe("room") as sub:
            big = "x" * 100
            size = len(f"id: {epoch(kept.id)}-2\ndata: {big}\n\n".encode())
            with pytest.raises(
                EventTooLargeError,
                match=re.escape(f"event of {size} bytes encoded exceeds max_event_bytes=100"),
            ) as info:
                await broadcaster.publish("room", big)
            assert isinstance(info.value, ValueError)
            assert isinstance(info.value, BroadcasterError)
            # Nothing accepted before is lost, and the id sequence has no hole.
            after = await broadcaster.publish("room", "after")
            assert seq(after.id) == 2
            assert await broadcaster.history("room") == [kept, after]
            assert await sub.receive() is after
            # Multi-byte characters count by their UTF-8 size.
            with pytest.raises(EventTooLargeError):
                await broadcaster.publish("room", "\u2603" * 30)
        # No session is left behind for a refused first event.
        with pytest.raises(EventTooLargeError):
            await broadcaster.publish("other", big)
        assert broadcaster.stats()["totalSessions"] == 1
        assert broadcaster.stats()["totalEvents"] == 2


async def test_event_exactly_at_max_event_bytes_is_accepted() -> None:
    async with EventBroadcaster(BroadcasterConfig(max_event_bytes=100)) as broadcaster:
        first = await broadcaster.publish("room", "")
        overhead = first.size  # len("id: <epoch>-1\ndata: \n\n"); "-2" is as long
        event = await broadcaster.publish("room", "x" * (100 - overhead))
        assert event.size == 100


# -- subscribe, replay and gaps -------------------------------------------------------------


async def test_replay_after_last_event_id_then_live() -> None:
    async with EventBroadcaster() as broadcaster:
        events = [await broadcaster.publish("room", str(i)) for i in range(5)]
        async with broadcaster.subscribe("room", last_event_id=events[2].id) as sub:
            assert not sub.gap
            assert sub.replayed == 2
            assert sub.last_event_id == events[2].id
            live = await broadcaster.publish("room", "5")
            assert [await sub.receive() for _ in range(3)] == [events[3], events[4], live]
        stats = broadcaster.stats()
        assert (stats["replays"], stats["replayedEvents"], stats["gaps"]) == (1, 2, 0)


async def test_subscribe_without_last_event_id_gets_only_live_events() -> None:
    async with EventBroadcaster() as broadcaster:
        await broadcaster.publish("room", "old")
        async with broadcaster.subscribe("room") as sub:
            assert (sub.gap, sub.replayed, sub.queued) == (False, 0, 0)
            live = await broadcaster.publish("room", "new")
            assert await sub.receive() is live


async def test_empty_last_event_id_counts_as_none() -> None:
    async with EventBroadcaster() as broadcaster:
        await broadcaster.publish("room", "old")
        async with broadcaster.subscribe("room", last_event_id="") as sub:
            assert sub.last_event_id is None
            assert (sub.gap, sub.queued) == (False, 0)


async def test_last_event_id_of_the_latest_event_replays_nothing() -> None:
    async with EventBroadcaster() as broadcaster:
        last = await broadcaster.publish("room", "x")
        async with broadcaster.subscribe("room", last_event_id=last.id) as sub:
            assert (sub.gap, sub.queued) == (False, 0)


def _bad_ids(current_epoch: str) -> list[str]:
    return [
        "garbage",
        "-",
        "-5",
        "42",
        "abc-xyz",
        f"{current_epoch}-",
        f"{current_epoch}-x",
        f"{current_epoch}-1e3",
        f"{current_epoch}--1",
        f"{current_epoch}- 1",
        f"{current_epoch}-\u0663",  # ARABIC-INDIC DIGIT THREE: isdigit() but not ASCII
        f"{current_epoch}-{'9' * 25}",  # absurdly long
        f"{current_epoch}-999",  # ahead of the session
        f"{current_epoch}x-1",  # another epoch
        "ffffff1-1",  # looks right, another run
        f"{current_epoch}-1\0",
        "\u2603",
        " " * 300,
    ]


async def test_unknown_or_malformed_last_event_id_sets_gap_and_replays_everything() -> None:
    async with EventBroadcaster() as broadcaster:
        events = [await broadcaster.publish("room", str(i)) for i in range(3)]
        for bad in _bad_ids(epoch(events[0].id)):
            async with broadcaster.subscribe("room", last_event_id=bad) as sub:
                assert sub.gap, bad
                assert sub.drain_nowait() == events, bad
            assert await broadcaster.history("room", after=bad) == events
        assert broadcaster.stats()["gaps"] == len(_bad_ids(""))


async def test_last_event_id_must_be_str_or_none() -> None:
    async with EventBroadcaster() as broadcaster:
        with pytest.raises(
            TypeError, match=re.escape("last_event_id must be a str or None, got 5")
        ):
            broadcaster.subscribe("room", last_event_id=5)  # type: ignore[arg-type]


async def test_last_event_id_older_than_history_sets_gap() -> None:
    async with EventBroadcaster(BroadcasterConfig(max_history_per_session=3)) as broadcaster:
        events = [await broadcaster.publish("room", str(i)) for i in range(1, 11)]
        async with broadcaster.subscribe(
            "room", last_event_id=events[5].id
        ) as sub:  # n=6: 7 evicted
            assert sub.gap
            assert sub.drain_nowait() == events[7:]
        async with broadcaster.subscribe("room", last_event_id=events[6].id) as sub:  # n=7: exact
            assert not sub.gap
            assert sub.drain_nowait() == events[7:]


async def test_last_event_id_of_a_gone_session_or_earlier_run_sets_gap() -> None:
    async with EventBroadcaster() as first_run:
        old = await first_run.publish("room", "old")
    async with EventBroadcaster() as broadcaster:
        async with broadcaster.subscribe("room", last_event_id=old.id) as sub:
            assert sub.gap  # the session does not exist here
        new = await broadcaster.publish("room", "new")
        async with broadcaster.subscribe("room", last_event_id=old.id) as sub:
            assert sub.gap  # same n, another epoch
            assert sub.drain_nowait() == [new]
        await broadcaster.close_session("room")
        again = await broadcaster.publish("room", "again")
        assert seq(again.id) == 1
        assert epoch(again.id) != epoch(new.id)
        async with broadcaster.subscribe("room", last_event_id=new.id) as sub:
            assert sub.gap  # the session was closed and came back: a new epoch
            assert sub.drain_nowait() == [again]


async def test_replay_handover_has_no_duplicate_and_no_hole() -> None:
    """Publish continuously while subscribers join at random moments with a last id."""
    rng = random.Random(20240501)
    total = 3000
    subscribers = 40
    config = BroadcasterConfig(max_history_per_session=total, max_queue_size=total)
    published: list[Event] = []
    entered = 0
    results: list[tuple[str | None, list[str]]] = []

    async def subscriber(broadcaster: EventBroadcaster, delay_events: int, resume: bool) -> None:
        nonlocal entered
        while len(published) < delay_events:
            await anyio.lowlevel.checkpoint()
        # Resume from a random recent id (the latest one included), or join live.
        last_id = rng.choice(published[-200:]).id if resume and published else None
        async with broadcaster.subscribe("room", last_event_id=last_id) as sub:
            entered += 1
            assert not sub.gap
            received = [event.id async for event in sub]
        results.append((last_id, received))

    async with EventBroadcaster(config) as broadcaster, anyio.create_task_group() as tg:
        for i in range(subscribers):
            tg.start_soon(subscriber, broadcaster, rng.randrange(1, total - 500), i % 4 != 0)
        for i in range(total):
            published.append(await broadcaster.publish("room", str(i)))
            if rng.random() < 0.05:
                await anyio.lowlevel.checkpoint()
        while entered < subscribers:
            await anyio.lowlevel.checkpoint()
        await broadcaster.close_session("room")  # ends every subscription after its queue

    assert len(results) == subscribers
    for last_id, received in results:
        numbers = [seq(i) for i in received]
        assert numbers, last_id
        assert numbers == list(range(numbers[0], total + 1)), "duplicate or hole"
        if last_id is not None:
            assert numbers[0] == seq(last_id) + 1
    assert any(last_id is None for last_id, _ in results)
    assert any(last_id is not None for last_id, _ in results)


# -- history and sessions --------------------------------------------------------------------


async def test_history_after() -> None:
    async with EventBroadcaster() as broadcaster:
        assert await broadcaster.history("nobody") == []
        events = [await broadcaster.publish("room", str(i)) for i in range(4)]
        assert await broadcaster.history("room") == events
        assert await broadcaster.history("room", after=None) == events
        assert await broadcaster.history("room", after="") == events
        assert await broadcaster.history("room", after=events[1].id) == events[2:]
        assert await broadcaster.history("room", after=events[3].id) == []
        assert await broadcaster.history("room", after="unknown") == events
        assert await broadcaster.history("nobody", after=events[0].id) == []


async def test_close_session_ends_subscriptions_and_drops_history() -> None:
    async with EventBroadcaster() as broadcaster:
        assert await broadcaster.close_session("nobody") is False
        await broadcaster.publish("room", "old")
        await broadcaster.publish("other", "kept")
        async with broadcaster.subscribe("room") as sub:
            queued = await broadcaster.publish("room", "queued")
            assert await broadcaster.close_session("room") is True
            # The queued event is still received, then the iteration ends.
            assert [e async for e in sub] == [queued]
            assert sub.closed
        assert await broadcaster.history("room") == []
        assert [e.data for e in await broadcaster.history("other")] == ["kept"]
        stats = broadcaster.stats()
        assert (stats["totalSessions"], stats["totalEvents"], stats["totalSubscribers"]) == (
            1,
            1,
            0,
        )
        # A session that only has subscribers (no history) also counts as existing.
        async with broadcaster.subscribe("empty") as sub:
            assert await broadcaster.close_session("empty") is True


async def test_max_sessions() -> None:
    async with EventBroadcaster(BroadcasterConfig(max_sessions=2)) as broadcaster:
        await broadcaster.publish("a", "x")  # holds a slot by its history
        async with broadcaster.subscribe("b"):
            pass
        await broadcaster.publish("b", "x")  # holds a slot by its history
        message = re.escape("cannot create session 'c': max_sessions=2 reached")
        with pytest.raises(SessionLimitError, match=f"^{message}$"):
            await broadcaster.publish("c", "x")
        with pytest.raises(SessionLimitError, match=f"^{message}$"):
            async with broadcaster.subscribe("c"):
                pass
        # Existing sessions keep working; closing one makes room.
        await broadcaster.publish("a", "y")
        await broadcaster.publish("b", "y")
        assert await broadcaster.close_session("a")
        await broadcaster.publish("c", "x")
        assert broadcaster.stats()["totalSessions"] == 2


async def test_max_subscribers_per_session() -> None:
    config = BroadcasterConfig(max_subscribers_per_session=2)
    async with EventBroadcaster(config) as broadcaster:
        first = await broadcaster.subscribe("room").__aenter__()
        async with broadcaster.subscribe("room"):
            message = re.escape(
                "session 'room' has 2 subscribers: max_subscribers_per_session=2 reached"
            )
            with pytest.raises(SubscriberLimitError, match=f"^{message}$"):
                async with broadcaster.subscribe("room"):
                    pass
            async with broadcaster.subscribe("other"):  # the limit is per session
                pass
            await first.aclose()
            async with broadcaster.subscribe("room") as third:
                event = await broadcaster.publish("room", "x")
                assert await third.receive() is event
        assert broadcaster.stats()["totalSubscribers"] == 0


class _YieldingBackend(MemoryBackend):
    """A MemoryBackend whose attach awaits first, as a shared backend's (Redis) does."""

    def __init__(self, fail: str | None = None) -> None:
        super().__init__()
        self.fail = fail

    async def attach(self, session_id: str, last_event_id: str | None, register: Any) -> Any:
        await anyio.sleep(0.01)
        if self.fail == "before-register":
            raise BackendUnavailableError("attach failed")
        if self.fail == "after-register":
            register()
            raise BackendUnavailableError("attach failed after register")
        return await super().attach(session_id, last_event_id, register)


@pytest.mark.parametrize("backend", ["memory", "yielding"])
async def test_max_subscribers_per_session_holds_under_concurrent_entries(backend: str) -> None:
    # #10.3: the limit was checked before the backend's attach awaited, so with
    # one that awaits (Redis) 50 concurrent entries were all admitted.
    config = BroadcasterConfig(max_subscribers_per_session=5)
    chosen = MemoryBackend() if backend == "memory" else _YieldingBackend()
    async with EventBroadcaster(config, backend=chosen) as broadcaster:
        admitted, errors = await enter_concurrently(broadcaster, ["room"] * 50)
        assert admitted == 5
        assert len(errors) == 45
        assert all(isinstance(e, SubscriberLimitError) for e in errors), errors
        assert "max_subscribers_per_session=5 reached" in str(errors[0])
        assert_nothing_held(broadcaster, "room")
        # The slots are free again.
        admitted, errors = await enter_concurrently(broadcaster, ["room"] * 5)
        assert (admitted, errors) == (5, [])
        assert_nothing_held(broadcaster, "room")


async def test_the_limit_message_counts_subscriptions_still_entering() -> None:
    config = BroadcasterConfig(max_subscribers_per_session=2)
    async with EventBroadcaster(config, backend=_YieldingBackend()) as broadcaster:
        _, errors = await enter_concurrently(broadcaster, ["room"] * 3)
        assert [str(e) for e in errors] == [
            "session 'room' has 0 subscribers and 2 entering: max_subscribers_per_session=2 reached"
        ]


@pytest.mark.parametrize("fail", ["before-register", "after-register"])
async def test_a_failed_entry_gives_its_slot_back(fail: str) -> None:
    backend = _YieldingBackend(fail)
    config = BroadcasterConfig(max_subscribers_per_session=5)
    async with EventBroadcaster(config, backend=backend) as broadcaster:
        _, errors = await enter_concurrently(broadcaster, ["room"] * 10)
        assert len(errors) == 10
        assert sum(isinstance(e, BackendUnavailableError) for e in errors) == 5
        assert sum(isinstance(e, SubscriberLimitError) for e in errors) == 5
        assert_nothing_held(broadcaster, "room")
        backend.fail = None
        admitted, errors = await enter_concurrently(broadcaster, ["room"] * 10)
        assert (admitted, len(errors)) == (5, 5)
        assert_nothing_held(broadcaster, "room")


@pytest.mark.parametrize("backend", ["memory", "yielding"])
async def test_max_sessions_holds_under_concurrent_entries(backend: str) -> None:
    config = BroadcasterConfig(max_sessions=5)
    chosen = MemoryBackend() if backend == "memory" else _YieldingBackend()
    async with EventBroadcaster(config, backend=chosen) as broadcaster:
        admitted, errors = await enter_concurrently(broadcaster, [f"s{i}" for i in range(50)])
        assert admitted == 5
        assert len(errors) == 45
        assert all(isinstance(e, SessionLimitError) for e in errors), errors
        # The five admitted have left and never had an event: their slots are free.
        assert broadcaster.stats()["totalSessions"] == 0
        assert_nothing_held(broadcaster, *(f"s{i}" for i in range(50)))


async def test_subscriber_count() -> None:
    async with EventBroadcaster() as broadcaster:
        assert broadcaster.subscriber_count("room") == 0
        async with broadcaster.subscribe("room"), broadcaster.subscribe("room"):
            assert broadcaster.subscriber_count("room") == 2
            assert broadcaster.subscriber_count("other") == 0
        assert broadcaster.subscriber_count("room") == 0


async def test_disconnect_subscribers_keeps_history_so_clients_resume() -> None:
    async with EventBroadcaster() as broadcaster:
        assert broadcaster.disconnect_subscribers("room") == 0
        first = await broadcaster.publish("room", "1")
        async with broadcaster.subscribe("room") as a, broadcaster.subscribe("room") as b:
            queued = await broadcaster.publish("room", "2")
            assert broadcaster.disconnect_subscribers("room") == 2
            assert broadcaster.subscriber_count("room") == 0
            assert [e async for e in a] == [queued]  # what was queued, then the end
            assert [e async for e in b] == [queued]
        later = await broadcaster.publish("room", "3")
        async with broadcaster.subscribe("room", last_event_id=first.id) as resumed:
            assert not resumed.gap
            assert [e.data for e in resumed.drain_nowait()] == ["2", "3"]
            assert resumed.drain_nowait() == []
        assert later.data == "3"
        with pytest.raises(ValueError, match="session_id must not be empty"):
            broadcaster.disconnect_subscribers("")


# -- stats -------------------------------------------------------------------------------------


async def test_stats_shape() -> None:
    clock = FakeClock()
    async with EventBroadcaster(clock=clock) as broadcaster:
        stats = broadcaster.stats()
        assert stats["cleanup"]["lastCleanupTime"] is None
        events = [await broadcaster.publish("a", "x"), await broadcaster.publish("b", "y")]
        async with broadcaster.subscribe("a") as sub:
            events.append(await broadcaster.publish("a", "z"))
            await broadcaster.cleanup()
            stats = broadcaster.stats()
            assert sub.queued == 1
    json.dumps(stats)  # JSON-ready
    assert list(stats)[:5] == [
        "memoryUsageMB",
        "totalSessions",
        "totalSubscribers",
        "totalEvents",
        "cleanup",
    ]
    assert isinstance(stats["memoryUsageMB"], float)
    assert stats["memoryUsageMB"] > 0
    assert (stats["totalSessions"], stats["totalSubscribers"], stats["totalEvents"]) == (2, 1, 3)
    assert stats["cleanup"] == {
        "expiredEventsCleaned": 0,
        "deadQueuesCleaned": 0,
        "sessionsExpired": 0,
        "lastCleanupTime": clock.now,
        "cleanupCount": 1,
    }
    assert (stats["eventsPublished"], stats["eventsDelivered"], stats["eventsDropped"]) == (3, 1, 0)
    assert stats["backend"] == {
        "type": "memory",
        "sessions": 2,
        "retainedEvents": 3,
        "historyBytes": sum(e.size for e in events),
        "runBytes": 0,
        "sessionsReleased": 0,
        "releasedSessionsRemembered": 0,
    }
    assert set(stats) >= {"replays", "replayedEvents", "gaps", "memoryPressure"}
    assert stats["runs"] == {
        "running": 0,
        "retained": 0,
        "started": 0,
        "finished": 0,
        "failed": 0,
        "cancelled": 0,
        "expired": 0,
        "transcriptBytes": 0,
    }


# -- shutdown ------------------------------------------------------------------------------------

SUBSCRIBERS = 1000


async def _consume(
    broadcaster: EventBroadcaster, index: int, ready: list[int], ended: list[int]
) -> None:
    async with broadcaster.subscribe(f"room-{index % 10}") as sub:
        ready.append(index)
        async for _ in sub:
            pass
    ended.append(index)  # reached only when the iteration ended normally


async def _wait_for(condition: Any) -> None:
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.001)


async def test_aclose_ends_1000_subscriptions_within_1s() -> None:
    ready: list[int] = []
    ended: list[int] = []
    async with EventBroadcaster() as broadcaster:
        async with anyio.create_task_group() as tg:
            for i in range(SUBSCRIBERS):
                tg.start_soon(_consume, broadcaster, i, ready, ended)
            await _wait_for(lambda: len(ready) == SUBSCRIBERS)
            await broadcaster.publish("room-0", "last words")
            assert broadcaster.stats()["totalSubscribers"] == SUBSCRIBERS
            started = time.monotonic()
            await broadcaster.aclose()
        elapsed = time.monotonic() - started
    assert len(ended) == SUBSCRIBERS  # every task ended its iteration normally
    assert elapsed < 1.0, f"{SUBSCRIBERS} subscriptions took {elapsed:.3f}s to end"


async def test_leaving_async_with_ends_1000_subscriptions_within_1s() -> None:
    ready: list[int] = []
    ended: list[int] = []
    async with anyio.create_task_group() as tg:
        async with EventBroadcaster() as broadcaster:
            for i in range(SUBSCRIBERS):
                tg.start_soon(_consume, broadcaster, i, ready, ended)
            await _wait_for(lambda: len(ready) == SUBSCRIBERS)
            started = time.monotonic()
        await _wait_for(lambda: len(ended) == SUBSCRIBERS)
        elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"{SUBSCRIBERS} subscriptions took {elapsed:.3f}s to end"
    gc.collect()
    assert broadcaster.stats()["totalSubscribers"] == 0
