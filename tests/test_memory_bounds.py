"""Memory bounds: history by count, age and bytes, the eviction index, flat RSS under a slow reader.

The RSS tests measure this process, so they run in-process and one after the
other (pytest runs them sequentially; do not spread this file over workers).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import random

import anyio
import anyio.lowlevel
import pytest

from sse_broadcaster import (
    BroadcasterClosedError,
    BroadcasterConfig,
    Event,
    EventBroadcaster,
    OverflowPolicy,
    SlowSubscriberError,
)
from sse_broadcaster._metrics import process_memory_mb
from sse_broadcaster.backends import MemoryBackend

from .support.clock import FakeClock

pytestmark = pytest.mark.anyio


def seq(event_id: str) -> int:
    return int(event_id.rpartition("-")[2])


# -- history bounds ---------------------------------------------------------------------------


async def test_history_is_bounded_per_session_by_count() -> None:
    async with EventBroadcaster(BroadcasterConfig(max_history_per_session=5)) as broadcaster:
        events = [await broadcaster.publish("a", str(i)) for i in range(12)]
        other = [await broadcaster.publish("b", str(i)) for i in range(3)]
        assert await broadcaster.history("a") == events[-5:]
        assert await broadcaster.history("b") == other
        assert broadcaster.stats()["totalEvents"] == 8


async def test_no_history_still_delivers_live() -> None:
    async with EventBroadcaster(BroadcasterConfig(max_history_per_session=0)) as broadcaster:
        first = await broadcaster.publish("a", "1")
        async with broadcaster.subscribe("a", last_event_id=first.id) as sub:
            assert not sub.gap  # nothing was published after it
            live = await broadcaster.publish("a", "2")
            assert await sub.receive() is live
        assert await broadcaster.history("a") == []
        await broadcaster.publish("a", "3")
        async with broadcaster.subscribe("a", last_event_id=first.id) as sub:
            assert sub.gap  # 2 and 3 were never retained
            assert sub.queued == 0
        assert broadcaster.stats()["totalEvents"] == 0


async def test_expired_events_are_not_replayed_before_a_sweep() -> None:
    clock = FakeClock()
    async with EventBroadcaster(BroadcasterConfig(event_ttl=60.0), clock=clock) as broadcaster:
        stale = await broadcaster.publish("a", "stale")
        clock.now += 30
        fresh = await broadcaster.publish("a", "fresh")
        clock.now += 30
        assert await broadcaster.history("a") == [fresh]
        assert await broadcaster.history("a", after=stale.id) == [fresh]
        async with broadcaster.subscribe("a", last_event_id="unknown") as sub:
            assert sub.drain_nowait() == [fresh]
        assert broadcaster.stats()["totalEvents"] == 2  # still held until the sweep
        await broadcaster.cleanup()
        assert broadcaster.stats()["totalEvents"] == 1


async def test_history_bytes_evict_the_oldest_first_across_sessions() -> None:
    async with EventBroadcaster() as broadcaster:
        size = (await broadcaster.publish("probe", "x" * 100)).size
    config = BroadcasterConfig(max_event_bytes=size, max_history_bytes=3 * size)
    async with EventBroadcaster(config) as broadcaster:
        a1 = await broadcaster.publish("a", "x" * 100)
        b1 = await broadcaster.publish("b", "x" * 100)
        a2 = await broadcaster.publish("a", "x" * 100)
        assert broadcaster.stats()["backend"]["historyBytes"] == 3 * size
        b2 = await broadcaster.publish("b", "x" * 100)  # evicts a1, the oldest of all
        assert await broadcaster.history("a") == [a2]
        assert await broadcaster.history("b") == [b1, b2]
        c1 = await broadcaster.publish("c", "x" * 100)  # evicts b1
        assert await broadcaster.history("b") == [b2]
        assert await broadcaster.history("c") == [c1]
        stats = broadcaster.stats()
        assert stats["backend"]["historyBytes"] == 3 * size
        assert stats["totalEvents"] == 3
        # Resuming right after an evicted event has no gap while its successor is retained.
        async with broadcaster.subscribe("a", last_event_id=a1.id) as sub:
            assert not sub.gap
            assert sub.drain_nowait() == [a2]
        async with broadcaster.subscribe("b", last_event_id=b1.id) as sub:
            assert not sub.gap
        async with broadcaster.subscribe("b", last_event_id="x-0") as sub:
            assert sub.gap


async def test_history_bounds_match_a_reference_model() -> None:
    """Random sessions and sizes under all three history bounds at once, against a model."""
    rng = random.Random(7)
    per_session = 7
    limit = 20_000
    config = BroadcasterConfig(
        max_event_bytes=1024, max_history_per_session=per_session, max_history_bytes=limit
    )
    retained: dict[str, collections.deque[Event]] = collections.defaultdict(collections.deque)
    order: collections.deque[Event] = collections.deque()  # publish order, may hold evicted ones
    alive: set[int] = set()
    total = 0
    async with EventBroadcaster(config) as broadcaster:
        for step in range(5000):
            session = f"s{rng.randrange(25)}"
            event = await broadcaster.publish(session, "y" * rng.randrange(0, 900))
            history = retained[session]
            if len(history) == per_session:
                evicted = history.popleft()
                alive.discard(id(evicted))
                total -= evicted.size
            history.append(event)
            order.append(event)
            alive.add(id(event))
            total += event.size
            while total > limit:
                oldest = order.popleft()
                if id(oldest) in alive:
                    alive.discard(id(oldest))
                    retained[oldest.session_id].popleft()
                    total -= oldest.size
            if step % 500 == 0 or step == 4999:
                for name, expected in retained.items():
                    assert await broadcaster.history(name) == list(expected), (step, name)
                assert broadcaster.stats()["backend"]["historyBytes"] == total
            if rng.random() < 0.01:
                victim = f"s{rng.randrange(25)}"
                await broadcaster.close_session(victim)
                for gone in retained.pop(victim, ()):
                    alive.discard(id(gone))
                    total -= gone.size


async def test_eviction_index_stays_bounded() -> None:
    """100k events over many sessions with a small per-session history: stale entries go."""
    rng = random.Random(3)
    sessions = 200
    per_session = 10
    config = BroadcasterConfig(max_history_per_session=per_session)
    backend = MemoryBackend()
    async with EventBroadcaster(config, backend=backend) as broadcaster:
        largest = 0
        for i in range(100_000):
            await broadcaster.publish(f"s{rng.randrange(sessions)}", "x")
            if i % 250 == 0:
                retained = broadcaster.stats()["totalEvents"]
                largest = max(largest, len(backend._index))
                assert len(backend._index) <= max(2 * retained, retained + 1025), i
        retained = broadcaster.stats()["totalEvents"]
        assert retained == sessions * per_session
        assert largest <= 2 * retained
        # Eviction by bytes still finds the oldest retained events after compactions.
        for name in ("s0", "s1"):
            history = await broadcaster.history(name)
            assert len(history) == per_session
            assert [seq(e.id) for e in history] == list(
                range(seq(history[0].id), seq(history[0].id) + per_session)
            )


async def test_closing_sessions_compacts_the_index() -> None:
    backend = MemoryBackend()
    async with EventBroadcaster(backend=backend) as broadcaster:
        for i in range(3000):
            await broadcaster.publish(f"s{i % 3000}", "x")
        for i in range(2990):
            await broadcaster.close_session(f"s{i}")
        assert broadcaster.stats()["totalEvents"] == 10
        assert len(backend._index) <= 10 + 1025


# -- a slow consumer keeps memory flat ---------------------------------------------------------

EVENTS = 200_000
PAYLOAD = "x" * 1024
GROWTH_LIMIT_MB = 8.0


def _trim_heap() -> None:
    """Collect garbage and give free heap pages back to the OS, so RSS deltas mean something.

    Without it, memory freed by an earlier test is reused and any growth is hidden.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    malloc_trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if malloc_trim is not None:  # glibc
        malloc_trim(0)


async def _warm_up(config: BroadcasterConfig) -> None:
    async with EventBroadcaster(config) as broadcaster, broadcaster.subscribe("warm-up") as sub:
        for i in range(3000):
            await broadcaster.publish("warm-up", PAYLOAD)
            if i % 100 == 0:
                sub.drain_nowait()


async def _publish_all(
    broadcaster: EventBroadcaster, naive: collections.deque[bytes] | None = None
) -> None:
    for i in range(EVENTS):
        event = await broadcaster.publish("room", PAYLOAD)
        if naive is not None:
            naive.append(event.encode())
        if i % 300 == 0:
            await anyio.lowlevel.checkpoint()  # let other tasks run, as a real producer would


@pytest.mark.parametrize("policy", list(OverflowPolicy), ids=str)
async def test_a_subscriber_that_never_reads_keeps_rss_flat(policy: OverflowPolicy) -> None:
    config = BroadcasterConfig(overflow_policy=policy)
    await _warm_up(config)
    _trim_heap()
    before = process_memory_mb()
    async with EventBroadcaster(config) as broadcaster, broadcaster.subscribe("room") as sub:
        await _publish_all(broadcaster)
        gc.collect()
        growth = process_memory_mb() - before  # measured while the subscriber holds its queue
        print(f"RSS growth with {policy.value}: {growth:.1f} MB")
        assert growth < GROWTH_LIMIT_MB, f"{policy.value}: RSS grew {growth:.1f} MB"

        assert sub.queued <= config.max_queue_size
        queued = sub.drain_nowait()
        assert sum(e.size for e in queued) <= config.max_queue_bytes
        assert queued == sorted(queued, key=lambda e: seq(e.id))
        stats = broadcaster.stats()
        if policy is OverflowPolicy.DISCONNECT:
            assert sub.dropped == 0
            assert seq(queued[0].id) == 1
            assert seq(queued[-1].id) == len(queued)
            assert stats["slowSubscriberDisconnects"] == 1
            with pytest.raises(SlowSubscriberError):
                await sub.receive()
        else:
            assert sub.dropped == EVENTS - len(queued)
            assert stats["eventsDropped"] == sub.dropped
            if policy is OverflowPolicy.DROP_NEWEST:
                assert seq(queued[0].id) == 1
            else:
                assert seq(queued[-1].id) == EVENTS
        assert stats["totalEvents"] == config.max_history_per_session


async def test_an_unbounded_queue_shows_the_growth_that_the_bounds_prevent() -> None:
    """The control: the same workload into a plain unbounded queue. A check that can fail.

    It runs last in this file so that the memory it frees is not reused by the
    tests above; and it gives its pages back to the OS when done.
    """
    config = BroadcasterConfig()
    await _warm_up(config)
    _trim_heap()
    before = process_memory_mb()
    naive: collections.deque[bytes] = collections.deque()
    try:
        async with EventBroadcaster(config) as broadcaster:
            await _publish_all(broadcaster, naive)
        gc.collect()
        growth = process_memory_mb() - before
        print(f"RSS growth with a plain unbounded queue: {growth:.1f} MB")
        assert len(naive) == EVENTS
        assert growth > 100, f"the unbounded queue grew only {growth:.1f} MB"
    finally:
        naive.clear()
        _trim_heap()


async def test_no_history_bytes_limit_bounds_by_count_only() -> None:
    config = BroadcasterConfig(max_history_bytes=None, max_history_per_session=3)
    async with EventBroadcaster(config) as broadcaster:
        events = [await broadcaster.publish("a", "x" * 1000) for _ in range(5)]
        assert await broadcaster.history("a") == events[-3:]


async def test_compaction_drops_entries_of_an_earlier_incarnation_of_a_session() -> None:
    """A closed session's index entries stay stale after the id comes back with a new epoch."""
    backend = MemoryBackend()
    config = BroadcasterConfig(max_history_per_session=1000)
    async with EventBroadcaster(config, backend=backend) as broadcaster:
        for _ in range(1000):
            await broadcaster.publish("s", "old")
        await broadcaster.close_session("s")  # 1000 stale entries: not yet compacted
        reborn = await broadcaster.publish("s", "new")
        others = [
            await broadcaster.publish("t", str(i)) for i in range(1100)
        ]  # evictions add stale ones
        assert await broadcaster.history("s") == [reborn]
        assert await broadcaster.history("t") == others[-1000:]
        retained = broadcaster.stats()["totalEvents"]
        assert retained == 1001
        assert len(backend._index) <= retained + 1025


async def test_a_backend_that_is_not_running_refuses_work() -> None:
    backend = MemoryBackend()
    with pytest.raises(BroadcasterClosedError, match="the backend is not running"):
        await backend.publish("room", "x", None, None)
    async with EventBroadcaster(backend=backend):
        pass
    with pytest.raises(BroadcasterClosedError, match="the backend is not running"):
        await backend.sweep()
    assert backend.counts() == (0, 0, 0)
