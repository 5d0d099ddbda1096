"""Subscription: receiving, batches, cancellation, overflow policies, weakref abandonment."""

from __future__ import annotations

import contextlib
import gc
import random
import re
import weakref
from typing import Any

import anyio
import pytest

from sse_broadcaster import (
    BroadcasterConfig,
    Event,
    EventBroadcaster,
    GapError,
    OverflowPolicy,
    SessionLimitError,
    SlowSubscriberError,
    SubscriberLimitError,
    Subscription,
)
from sse_broadcaster._lowlevel import _AnyioParker, make_parker
from sse_broadcaster.backends import MemoryBackend

pytestmark = pytest.mark.anyio


def seq(event_id: str) -> int:
    return int(event_id.rpartition("-")[2])


async def test_entering_twice_raises() -> None:
    async with EventBroadcaster() as broadcaster:
        sub = broadcaster.subscribe("room")
        async with sub:
            with pytest.raises(
                RuntimeError, match=re.escape("a subscription can be entered only once")
            ):
                await sub.__aenter__()
            assert broadcaster.stats()["totalSubscribers"] == 1
        with pytest.raises(
            RuntimeError, match=re.escape("a subscription can be entered only once")
        ):
            await sub.__aenter__()
        assert broadcaster.stats()["totalSubscribers"] == 0


async def test_receiving_before_entering_raises() -> None:
    async with EventBroadcaster() as broadcaster:
        sub = broadcaster.subscribe("room")
        message = re.escape("enter the subscription first: 'async with subscription:'")
        with pytest.raises(RuntimeError, match=message):
            sub.receive_nowait()
        with pytest.raises(RuntimeError, match=message):
            await sub.receive()
        assert sub.drain_nowait() == []
        await sub.aclose()  # closing one that was never entered is harmless
        assert sub.closed


async def test_receive_nowait() -> None:
    async with EventBroadcaster() as broadcaster, broadcaster.subscribe("room") as sub:
        assert repr(sub) == "<Subscription session_id='room' open queued=0 dropped=0 gap=False>"
        with pytest.raises(anyio.WouldBlock):
            sub.receive_nowait()
        first = await broadcaster.publish("room", "1")
        second = await broadcaster.publish("room", "2")
        assert sub.queued == 2
        assert sub.receive_nowait() is first
        assert sub.receive_nowait() is second
        with pytest.raises(anyio.WouldBlock):
            sub.receive_nowait()
        third = await broadcaster.publish("room", "3")
        await broadcaster.close_session("room")
        assert repr(sub) == "<Subscription session_id='room' ending queued=1 dropped=0 gap=False>"
        assert sub.receive_nowait() is third  # queued events survive the end
        assert repr(sub).startswith("<Subscription session_id='room' ending")
        with pytest.raises(anyio.EndOfStream):
            sub.receive_nowait()
        assert sub.closed
        with pytest.raises(anyio.ClosedResourceError):
            sub.receive_nowait()


async def test_receive_after_close_raises_closed_resource_error() -> None:
    async with EventBroadcaster() as broadcaster:
        sub = await broadcaster.subscribe("room").__aenter__()
        await broadcaster.publish("room", "dropped by close")
        sub.close()
        sub.close()  # idempotent
        assert sub.closed
        assert sub.queued == 0
        with pytest.raises(anyio.ClosedResourceError):
            await sub.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await sub.receive_batch()
        assert sub.drain_nowait() == []  # never raises
        assert broadcaster.stats()["totalSubscribers"] == 0
        await sub.aclose()


async def test_receive_waits_for_a_live_event() -> None:
    async with EventBroadcaster() as broadcaster, broadcaster.subscribe("room") as sub:
        async with anyio.create_task_group() as tg:
            tg.start_soon(broadcaster.publish, "room", "later")
            event = await sub.receive()
        assert event.data == "later"


async def test_receive_batch() -> None:
    async with EventBroadcaster() as broadcaster, broadcaster.subscribe("room") as sub:
        events = [await broadcaster.publish("room", str(i)) for i in range(5)]
        assert await sub.receive_batch(2) == events[:2]
        assert await sub.receive_batch() == events[2:]
        # Waits until there is at least one event.
        async with anyio.create_task_group() as tg:
            tg.start_soon(broadcaster.publish, "room", "later")
            [later] = await sub.receive_batch()
        assert later.data == "later"
        await broadcaster.close_session("room")
        with pytest.raises(anyio.EndOfStream):
            await sub.receive_batch()


async def test_interrupt_makes_receive_batch_return_nothing_once() -> None:
    # The adapters' watchdog wakes a stream's task this way to send a keep-alive.
    async with EventBroadcaster() as broadcaster, broadcaster.subscribe("room") as sub:
        async with anyio.create_task_group() as tg:
            got: list[list[Any]] = []

            async def receive() -> None:
                got.append(await sub.receive_batch())

            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            sub._interrupt()
        assert got == [[]]
        sub._interrupt()  # nobody waits: the next call returns at once, once
        assert await sub.receive_batch() == []
        event = await broadcaster.publish("room", "e")
        sub._interrupt()
        assert await sub.receive_batch() == [event]  # events come first
        assert await sub.receive_batch() == []  # the interrupt is still owed
        await broadcaster.close_session("room")
        sub._interrupt()
        with pytest.raises(anyio.EndOfStream):  # the end wins over an interrupt
            await sub.receive_batch()


async def test_receive_batch_includes_replay_then_live_in_order() -> None:
    async with EventBroadcaster() as broadcaster:
        events = [await broadcaster.publish("room", str(i)) for i in range(3)]
        async with broadcaster.subscribe("room", last_event_id=events[0].id) as sub:
            events.append(await broadcaster.publish("room", "3"))
            assert sub.replayed == 2
            # In memory the live event is queued by publish itself; a shared backend
            # (tests/test_redis_parity.py) delivers it from its reader a moment later.
            with anyio.move_on_after(5):
                while sub.queued < 3:
                    await anyio.sleep(0.01)
            assert sub.queued == 3
            assert await sub.receive_batch() == events[1:]


async def test_ending_keeps_replayed_and_live_events_in_order() -> None:
    async with EventBroadcaster() as broadcaster:
        events = [await broadcaster.publish("room", str(i)) for i in range(3)]
        async with broadcaster.subscribe("room", last_event_id=events[0].id) as sub:
            events.append(await broadcaster.publish("room", "3"))
            await broadcaster.close_session("room")
            assert [event async for event in sub] == events[1:]


async def test_drain_nowait() -> None:
    async with EventBroadcaster() as broadcaster:
        events = [await broadcaster.publish("room", str(i)) for i in range(3)]
        async with broadcaster.subscribe("room", last_event_id=events[0].id) as sub:
            assert sub.drain_nowait(0) == []
            live = [await broadcaster.publish("room", str(i)) for i in range(3, 6)]
            assert sub.drain_nowait(1) == events[1:2]
            assert sub.drain_nowait() == [events[2], *live]
            assert sub.drain_nowait() == []
            assert sub.queued == 0
            more = [await broadcaster.publish("room", str(i)) for i in range(6, 9)]
            assert sub.drain_nowait(2) == more[:2]
            assert sub.drain_nowait(5) == more[2:]
            await broadcaster.close_session("room")
            assert sub.drain_nowait() == []  # never raises, even after the end


async def test_async_for_ends_after_queued_events() -> None:
    async with EventBroadcaster() as broadcaster, broadcaster.subscribe("room") as sub:
        events = [await broadcaster.publish("room", str(i)) for i in range(3)]
        await broadcaster.close_session("room")
        assert [event async for event in sub] == events


@pytest.mark.parametrize("how", ["move_on_after", "cancel_from_another_task"])
async def test_cancelling_a_waiting_receive_leaves_the_subscription_usable(how: str) -> None:
    async with EventBroadcaster() as broadcaster, broadcaster.subscribe("room") as sub:
        if how == "move_on_after":
            with anyio.move_on_after(0.01) as scope:
                await sub.receive()
            assert scope.cancelled_caught
        else:
            async with anyio.create_task_group() as tg:

                async def receiver(
                    *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                ) -> None:
                    task_status.started()
                    await sub.receive()

                await tg.start(receiver)
                await anyio.sleep(0.001)
                tg.cancel_scope.cancel()
        first = await broadcaster.publish("room", "1")
        assert await sub.receive() is first
        async with anyio.create_task_group() as tg:
            tg.start_soon(broadcaster.publish, "room", "2")
            assert (await sub.receive()).data == "2"
        # A receiver cancelled right after an event woke it does not lose the event:
        # it either returned it or left it queued.
        got = []

        async def waiter() -> None:
            got.append(await sub.receive())

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.001)
            third = await broadcaster.publish("room", "3")
            tg.cancel_scope.cancel()
        assert got + sub.drain_nowait() == [third]


async def test_close_from_another_task_wakes_the_receiver() -> None:
    async with EventBroadcaster() as broadcaster:
        sub = await broadcaster.subscribe("room").__aenter__()
        result: list[BaseException] = []

        async def receiver() -> None:
            try:
                await sub.receive()
            except anyio.ClosedResourceError as exc:
                result.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(receiver)
            await anyio.sleep(0.001)
            await sub.aclose()
        assert len(result) == 1


# -- overflow policies ----------------------------------------------------------------------


async def test_drop_newest_keeps_the_first_events() -> None:
    config = BroadcasterConfig(max_queue_size=3, overflow_policy="drop_newest")  # type: ignore[arg-type]
    async with EventBroadcaster(config) as broadcaster, broadcaster.subscribe("room") as sub:
        events = [await broadcaster.publish("room", str(i)) for i in range(5)]
        assert (sub.queued, sub.dropped) == (3, 2)
        assert sub.drain_nowait() == events[:3]
        live = await broadcaster.publish("room", "5")
        assert await sub.receive() is live  # it keeps going
        assert broadcaster.stats()["eventsDropped"] == 2


async def test_drop_oldest_keeps_the_latest_events() -> None:
    config = BroadcasterConfig(max_queue_size=3, overflow_policy=OverflowPolicy.DROP_OLDEST)
    async with EventBroadcaster(config) as broadcaster, broadcaster.subscribe("room") as sub:
        events = [await broadcaster.publish("room", str(i)) for i in range(5)]
        assert (sub.queued, sub.dropped) == (3, 2)
        assert sub.drain_nowait() == events[2:]
        live = await broadcaster.publish("room", "5")
        assert await sub.receive() is live
        assert broadcaster.stats()["eventsDropped"] == 2


async def _collect(sub: Subscription, into: list[Event]) -> None:
    async for event in sub:
        into.append(event)


async def test_disconnect_raises_after_the_queued_events_and_resume_replays_the_rest() -> None:
    config = BroadcasterConfig(max_queue_size=3)
    assert config.overflow_policy is OverflowPolicy.DISCONNECT
    async with EventBroadcaster(config) as broadcaster:
        async with broadcaster.subscribe("room") as sub:
            events = [await broadcaster.publish("room", str(i)) for i in range(5)]
            assert broadcaster.stats()["totalSubscribers"] == 0  # detached at once
            assert sub.dropped == 0
            received: list[Event] = []
            queued_bytes = sum(e.size for e in events[:3])
            message = re.escape(
                "subscriber of session 'room' fell behind: its queue reached 3 events / "
                f"{queued_bytes} bytes (max_queue_size=3, max_queue_bytes=1048576)"
            )
            with pytest.raises(SlowSubscriberError, match=f"^{message}$"):
                await _collect(sub, received)  # async for: the queued events, then the error
            assert received == events[:3]
            assert sub.closed
        assert broadcaster.stats()["slowSubscriberDisconnects"] == 1
        # Reconnecting with the last delivered id replays the rest from history.
        async with broadcaster.subscribe("room", last_event_id=received[-1].id) as again:
            assert not again.gap
            assert again.drain_nowait() == events[3:]


async def test_queue_bytes_are_counted_by_encoded_size() -> None:
    # "\u00e9" is one character and two UTF-8 bytes: a count by characters would fit
    # twice as many events as the byte bound allows.
    data = "\u00e9" * 100
    async with EventBroadcaster() as broadcaster:
        size = (await broadcaster.publish("probe", data)).size
    config = BroadcasterConfig(
        max_event_bytes=size,
        max_queue_bytes=3 * size + size // 2,
        overflow_policy="drop_newest",  # type: ignore[arg-type]
    )
    async with EventBroadcaster(config) as broadcaster, broadcaster.subscribe("room") as sub:
        events = [await broadcaster.publish("room", data) for _ in range(6)]
        assert {e.size for e in events} == {size}
        assert (sub.queued, sub.dropped) == (3, 3)
        assert sub.drain_nowait() == events[:3]


async def test_drop_oldest_by_bytes_drops_enough_to_fit() -> None:
    async with EventBroadcaster() as broadcaster:
        small = (await broadcaster.publish("probe", "x")).size
    config = BroadcasterConfig(
        max_event_bytes=200, max_queue_bytes=200, overflow_policy=OverflowPolicy.DROP_OLDEST
    )
    async with EventBroadcaster(config) as broadcaster, broadcaster.subscribe("room") as sub:
        smalls = [await broadcaster.publish("room", "x") for _ in range(200 // small)]
        big = await broadcaster.publish("room", "y" * (200 - small - 5))
        queued = sub.drain_nowait()
        assert queued[-1] is big
        assert sum(e.size for e in queued) <= 200
        assert sub.dropped == len(smalls) + 1 - len(queued)
        assert sub.dropped >= 1


@pytest.mark.parametrize("policy", [OverflowPolicy.DROP_NEWEST, OverflowPolicy.DROP_OLDEST])
async def test_queue_bytes_bound_each_subscriber_as_a_model_queue(policy: OverflowPolicy) -> None:
    # The fan-out counts each queue's bytes against the session's running total
    # (_SubscriberRef.mark): subscribers that joined late, took their queue at
    # different times or dropped different events must each hold exactly what a
    # model holds: a bounded inbox, and the batch the consumer took out of it.
    rng = random.Random(14)
    config = BroadcasterConfig(
        max_event_bytes=400, max_queue_bytes=1000, max_queue_size=8, overflow_policy=policy
    )
    async with EventBroadcaster(config) as broadcaster, contextlib.AsyncExitStack() as stack:
        subs: list[Subscription] = []
        models: list[tuple[list[Event], list[Event]]] = []  # (batch, inbox)
        for step in range(400):
            if step % 40 == 0:
                subs.append(await stack.enter_async_context(broadcaster.subscribe("room")))
                models.append(([], []))
            event = await broadcaster.publish("room", "x" * rng.randrange(1, 300))
            for sub, (batch, inbox) in zip(subs, models, strict=True):
                if policy is OverflowPolicy.DROP_NEWEST:
                    if len(inbox) < 8 and sum(e.size for e in inbox) + event.size <= 1000:
                        inbox.append(event)
                else:
                    inbox.append(event)
                    while len(inbox) > 8 or sum(e.size for e in inbox) > 1000:
                        inbox.pop(0)
                assert sub._inbox is not None
                assert sub._inbox.bytes == sum(e.size for e in inbox)
                if rng.random() < 0.2:
                    limit = rng.choice([None, 1, 3])
                    expected: list[Event] = []
                    while limit is None or len(expected) < limit:
                        if not batch:
                            if not inbox:
                                break
                            batch += inbox  # taken whole (the consumer's swap)
                            inbox.clear()
                        expected.append(batch.pop(0))
                    assert sub.drain_nowait(max_events=limit) == expected
                    assert sub._inbox.bytes == sum(e.size for e in inbox)
        for sub, (batch, inbox) in zip(subs, models, strict=True):
            assert sub.drain_nowait() == batch + inbox
        assert sum(sub.dropped for sub in subs) > 100  # the bounds were exercised


# -- abandonment -----------------------------------------------------------------------------


async def _enter_and_abandon(
    broadcaster: EventBroadcaster, session_id: str
) -> weakref.ref[Subscription]:
    sub = broadcaster.subscribe(session_id)
    await sub.__aenter__()
    await broadcaster.publish(session_id, "queued for nobody")
    return weakref.ref(sub)


async def test_abandoned_subscription_is_collected_and_counted_by_the_next_sweep() -> None:
    async with EventBroadcaster() as broadcaster:
        ref = await _enter_and_abandon(broadcaster, "room")
        async with broadcaster.subscribe("room") as kept:
            gc.collect()
            assert ref() is None  # the broadcaster holds it only weakly
            assert broadcaster.stats()["totalSubscribers"] == 2  # not swept yet
            event = await broadcaster.publish("room", "after")  # skips the dead entry
            assert kept.drain_nowait()[-1] is event
            metrics = await broadcaster.cleanup()
            assert metrics.dead_queues_cleaned == 1
            stats = broadcaster.stats()
            assert stats["cleanup"]["deadQueuesCleaned"] == 1
            assert stats["totalSubscribers"] == 1
        # A second sweep does not count it again.
        await broadcaster.cleanup()
        stats = broadcaster.stats()
        assert (stats["cleanup"]["deadQueuesCleaned"], stats["totalSubscribers"]) == (1, 0)


async def test_abandoned_last_subscriber_frees_its_session_for_expiry() -> None:
    async with EventBroadcaster() as broadcaster:
        ref = await _enter_and_abandon(broadcaster, "room")
        gc.collect()
        assert ref() is None
        assert broadcaster.subscriber_count("room") == 1
        await broadcaster.cleanup()
        assert broadcaster.subscriber_count("room") == 0
        assert broadcaster.stats()["totalSubscribers"] == 0


async def test_abandoned_subscription_then_close_session_keeps_counts_right() -> None:
    # Regression: a collected subscription whose session was closed (or the broadcaster
    # closed) before a sweep was never subtracted from totalSubscribers.
    async with EventBroadcaster() as broadcaster:
        ref = await _enter_and_abandon(broadcaster, "room")
        gc.collect()
        assert ref() is None
        await broadcaster.close_session("room")
        assert broadcaster.stats()["totalSubscribers"] == 0
        await broadcaster.cleanup()
        stats = broadcaster.stats()
        assert (stats["totalSubscribers"], stats["cleanup"]["deadQueuesCleaned"]) == (0, 1)


async def test_abandoned_subscription_then_aclose_keeps_counts_right() -> None:
    broadcaster = EventBroadcaster()
    async with broadcaster:
        await _enter_and_abandon(broadcaster, "room")
        gc.collect()
    assert broadcaster.stats()["totalSubscribers"] == 0


async def test_a_subscription_being_iterated_is_not_collected() -> None:
    async with EventBroadcaster() as broadcaster:
        received: list[str] = []

        async def consume() -> None:
            async with broadcaster.subscribe("room") as sub:
                async for event in sub:
                    received.append(event.data)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.sleep(0.001)
            gc.collect()
            await broadcaster.cleanup()
            assert broadcaster.stats()["totalSubscribers"] == 1
            await broadcaster.publish("room", "x")
            await broadcaster.close_session("room")
        assert received == ["x"]
        assert broadcaster.stats()["cleanup"]["deadQueuesCleaned"] == 0


async def test_receive_batch_rejects_max_events_below_one() -> None:
    # Regression: receive_batch(0) waited forever, even with events queued.
    async with EventBroadcaster() as broadcaster, broadcaster.subscribe("room") as sub:
        await broadcaster.publish("room", "x")
        for bad in (0, -1):
            with pytest.raises(
                ValueError, match=re.escape(f"max_events must be None or >= 1, got {bad}")
            ):
                await sub.receive_batch(bad)
        assert len(await sub.receive_batch(1)) == 1


async def test_a_second_concurrent_receiver_is_refused() -> None:
    async with EventBroadcaster() as broadcaster, broadcaster.subscribe("room") as sub:
        async with anyio.create_task_group() as tg:
            got: list[str] = []

            async def first() -> None:
                got.append((await sub.receive()).data)

            tg.start_soon(first)
            await anyio.sleep(0.001)
            with pytest.raises(anyio.BusyResourceError):
                await sub.receive()
            await broadcaster.publish("room", "x")
        assert got == ["x"]


# -- the backend seam: live events and endings that arrive while a subscriber attaches ----------


class _RacyBackend(MemoryBackend):
    """Runs `action` after registering the subscriber and before its replay is handed over,
    as a shared backend (Redis) may when its reader delivers during attach."""

    def __init__(self, action: Any) -> None:
        super().__init__()
        self.action = action

    async def attach(self, session_id: str, last_event_id: str | None, register: Any) -> Any:
        replay = await super().attach(session_id, last_event_id, register)
        await self.action(self, session_id)
        return replay


async def test_live_event_delivered_during_attach_follows_the_replay() -> None:
    async def publish_live(backend: MemoryBackend, session_id: str) -> None:
        await backend.publish(session_id, "live", None, None)

    async with EventBroadcaster(backend=_RacyBackend(publish_live)) as broadcaster:
        first = await broadcaster.publish("room", "1")
        second = await broadcaster.publish("room", "2")
        async with broadcaster.subscribe("room", last_event_id=first.id) as sub:
            received = sub.drain_nowait()
        assert [e.data for e in received] == ["2", "live"]
        assert received[0] is second


async def test_session_ended_during_attach_delivers_the_replay_then_the_error() -> None:
    async def lose(backend: MemoryBackend, session_id: str) -> None:
        assert backend._hub is not None
        backend._hub.end_session(session_id, GapError("history lost"))

    async with EventBroadcaster(backend=_RacyBackend(lose)) as broadcaster:
        first = await broadcaster.publish("room", "1")
        second = await broadcaster.publish("room", "2")
        async with broadcaster.subscribe("room", last_event_id=first.id) as sub:
            assert await sub.receive() is second
            with pytest.raises(GapError, match="history lost"):
                await sub.receive()
        assert broadcaster.stats()["totalSubscribers"] == 0


# -- the wake-up primitive -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["native", "anyio-fallback"])
async def test_parker(kind: str) -> None:
    parker = make_parker() if kind == "native" else _AnyioParker()
    parker.unpark()  # nobody waits: a no-op, and no wake-up is remembered
    woken: list[bool] = []

    async def sleeper() -> None:
        await parker.park()
        woken.append(True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        await anyio.sleep(0.001)
        assert woken == []
        parker.unpark()
        parker.unpark()  # twice before it runs: still one wake-up
    assert woken == [True]
    # A cancelled park leaves the parker reusable.
    with anyio.move_on_after(0.001):
        await parker.park()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        await anyio.sleep(0.001)
        parker.unpark()
    assert woken == [True, True]


# -- counts stay right under random operations -------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
async def test_subscriber_counts_under_random_operations(seed: int) -> None:
    """Publish, subscribe, close, abandon, overflow, close sessions and sweep at random:
    totalSubscribers always equals the subscriptions still attached."""
    rng = random.Random(seed)
    clock = [1_700_000_000.0]
    config = BroadcasterConfig(
        max_queue_size=rng.choice([1, 2, 5]),
        max_history_per_session=rng.choice([0, 1, 3]),
        overflow_policy=rng.choice(list(OverflowPolicy)),
        event_ttl=rng.choice([None, 5.0]),
        session_ttl=10.0,
        max_sessions=rng.choice([None, 3]),
        max_subscribers_per_session=rng.choice([None, 2]),
    )
    subs: list[Subscription] = []
    async with EventBroadcaster(config, clock=lambda: clock[0]) as broadcaster:
        for _ in range(150):
            op = rng.random()
            session_id = f"s{rng.randrange(4)}"
            try:
                if op < 0.35:
                    await broadcaster.publish(session_id, "x" * rng.randrange(5))
                elif op < 0.5:
                    last_id = rng.choice([None, "junk"])
                    subs.append(
                        await broadcaster.subscribe(session_id, last_event_id=last_id).__aenter__()
                    )
                elif op < 0.6 and subs:
                    await subs.pop(rng.randrange(len(subs))).aclose()
                elif op < 0.65 and subs:
                    del subs[rng.randrange(len(subs))]  # abandoned without closing
                    gc.collect()
                elif op < 0.8 and subs:
                    # GapError: history evicted a replay not taken yet (docs/replay.md).
                    ended = (
                        anyio.EndOfStream,
                        anyio.ClosedResourceError,
                        SlowSubscriberError,
                        GapError,
                    )
                    with contextlib.suppress(anyio.WouldBlock, *ended):
                        rng.choice(subs).receive_nowait()
                elif op < 0.85:
                    await broadcaster.close_session(session_id)
                else:
                    clock[0] += rng.choice([0, 1, 6, 11])
                    await broadcaster.cleanup()
            except (SessionLimitError, SubscriberLimitError):
                pass
            attached = sum(1 for sub in subs if not sub.closed and sub._ref is not None)
            await broadcaster.cleanup()
            assert broadcaster.stats()["totalSubscribers"] == attached
    assert broadcaster.stats()["totalSubscribers"] == 0


def test_a_parked_subscriber_wakes_on_uvloop() -> None:
    # uvloop's loops make their own futures: the parker takes the other path
    # (_lowlevel._AsyncioParker), which the asyncio-backed tests never reach.
    import uvloop  # requirements/test.txt installs it (uvicorn[standard])

    from sse_broadcaster._lowlevel import _AsyncioParker, make_parker

    async def main() -> list[str]:
        assert type(make_parker()) is _AsyncioParker
        async with (
            EventBroadcaster() as broadcaster,
            broadcaster.subscribe("room") as sub,
            anyio.create_task_group() as tg,
        ):
            received: list[str] = []

            async def consume() -> None:
                async for event in sub:  # parks: nothing is queued yet
                    received.append(event.data)
                    if len(received) == 3:
                        return

            tg.start_soon(consume)
            for data in ("a", "b", "c"):
                await anyio.sleep(0.01)
                await broadcaster.publish("room", data)
        return received

    assert uvloop.run(main()) == ["a", "b", "c"]
