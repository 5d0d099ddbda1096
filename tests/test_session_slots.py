"""Sessions hold a max_sessions slot only while they have a subscriber or an event (#10.6)."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from sse_broadcaster import (
    BackendUnavailableError,
    BroadcasterConfig,
    Event,
    EventBroadcaster,
    SessionLimitError,
    Subscription,
)
from sse_broadcaster.backends.memory import MemoryBackend

from .support.clock import FakeClock
from .support.servers import RawStream, open_raw, run_uvicorn, wait_for

pytestmark = pytest.mark.anyio


def rooms(n: int, seed: int) -> list[str]:
    """`n` distinct random room names, as an attacker would send them."""
    rng = random.Random(seed)
    return [f"room-{rng.getrandbits(64):016x}-{i}" for i in range(n)]


def sessions(broadcaster: EventBroadcaster) -> int:
    return int(broadcaster.stats()["totalSessions"])


def backend_stats(broadcaster: EventBroadcaster) -> dict[str, Any]:
    stats: dict[str, Any] = broadcaster.stats()["backend"]
    return stats


# -- the scenario of #10.6, at a small scale -----------------------------------------------------


async def test_a_publish_burst_locks_new_rooms_out_only_until_its_events_expire() -> None:
    clock = FakeClock()
    config = BroadcasterConfig(
        max_sessions=100, event_ttl=300.0, session_ttl=1800.0, cleanup_interval=60.0
    )
    async with EventBroadcaster(config, clock=clock) as broadcaster:
        burst = rooms(100, seed=1)
        for room in burst:
            await broadcaster.publish(room, "x")
        assert sessions(broadcaster) == 100
        # The burst's events are retained, so the burst's sessions hold their slots.
        message = "max_sessions=100 reached"
        with pytest.raises(SessionLimitError, match=message):
            await broadcaster.publish("late-room", "x")
        with pytest.raises(SessionLimitError, match=message):
            async with broadcaster.subscribe("late-room"):
                pass
        # Existing rooms still work.
        last = await broadcaster.publish(burst[0], "y")

        # Past event_ttl (far from session_ttl), a sweep releases what holds nothing.
        clock.advance(config.event_ttl + config.cleanup_interval)
        await broadcaster.cleanup()
        assert sessions(broadcaster) == 0
        stats = broadcaster.stats()
        assert stats["totalEvents"] == 0
        assert stats["cleanup"]["expiredEventsCleaned"] == 101
        assert stats["cleanup"]["sessionsExpired"] == 0  # session_ttl did not pass
        assert stats["backend"]["sessionsReleased"] == 100
        for room in rooms(99, seed=2):
            await broadcaster.publish(room, "new")
        # A burst room comes back too, and a client that saw its last event resumes.
        async with broadcaster.subscribe(burst[0], last_event_id=last.id) as sub:
            assert not sub.gap
            assert sessions(broadcaster) == 100


async def test_new_rooms_are_accepted_once_the_burst_expired_even_before_a_sweep() -> None:
    clock = FakeClock()
    config = BroadcasterConfig(max_sessions=100, event_ttl=300.0, session_ttl=1800.0)
    async with EventBroadcaster(config, clock=clock) as broadcaster:
        for room in rooms(100, seed=3):
            await broadcaster.publish(room, "x")
        clock.advance(config.event_ttl)
        # At the limit, a new session first expires what is past event_ttl (no sweep ran).
        async with broadcaster.subscribe("late-room") as sub:
            assert not sub.gap
            assert sessions(broadcaster) == 1
        assert sessions(broadcaster) == 0
        # The sweep still counts the events expired in between, once.
        await broadcaster.cleanup()
        assert broadcaster.stats()["cleanup"]["expiredEventsCleaned"] == 100
        await broadcaster.cleanup()
        assert broadcaster.stats()["cleanup"]["expiredEventsCleaned"] == 100


async def test_subscribing_to_many_random_rooms_holds_only_the_open_subscriptions() -> None:
    config = BroadcasterConfig(max_sessions=10)
    async with EventBroadcaster(config) as broadcaster:
        window: list[AsyncExitStack] = []
        highest = 0
        for room in rooms(1000, seed=4):
            # Like GET requests whose clients leave without any event published:
            # at most five streams are open at a time.
            inner = AsyncExitStack()
            await inner.enter_async_context(broadcaster.subscribe(room))
            window.append(inner)
            if len(window) > 5:
                await window.pop(0).aclose()
            open_now = broadcaster.stats()["totalSubscribers"]
            assert sessions(broadcaster) == open_now
            highest = max(highest, sessions(broadcaster))
        assert highest == 5
        for inner in window:
            await inner.aclose()
        assert sessions(broadcaster) == 0
        assert backend_stats(broadcaster)["sessionsReleased"] == 1000


# -- when a session lets go of its slot -----------------------------------------------------------


async def test_the_last_subscriber_leaving_an_empty_session_releases_it() -> None:
    async with EventBroadcaster() as broadcaster:
        first = broadcaster.subscribe("room")
        await first.__aenter__()
        async with broadcaster.subscribe("room"):
            assert sessions(broadcaster) == 1
        assert sessions(broadcaster) == 1  # one subscriber is left
        await first.aclose()
        assert sessions(broadcaster) == 0
        assert backend_stats(broadcaster)["sessionsReleased"] == 1
        # Nothing was published, but its subscribers were given its empty
        # position ("<epoch>-0", which a multi-session cursor carries): kept.
        assert backend_stats(broadcaster)["releasedSessionsRemembered"] == 1
        # A session with history keeps it when its subscribers leave.
        async with broadcaster.subscribe("kept"):
            await broadcaster.publish("kept", "x")
        assert sessions(broadcaster) == 1


async def test_an_abandoned_subscription_releases_its_session_at_the_next_sweep() -> None:
    async with EventBroadcaster() as broadcaster:
        sub = broadcaster.subscribe("room")
        await sub.__aenter__()
        del sub  # never closed: the garbage collector takes it
        import gc

        gc.collect()
        assert sessions(broadcaster) == 1
        await broadcaster.cleanup()
        assert sessions(broadcaster) == 0
        assert broadcaster.stats()["cleanup"]["deadQueuesCleaned"] == 1


class _FailingAfterAttach(MemoryBackend):
    """Attaches (creating the session and registering), then fails."""

    async def attach(self, session_id: str, last_event_id: str | None, register: Any) -> Any:
        await super().attach(session_id, last_event_id, register)
        raise BackendUnavailableError("attach failed after register")


async def test_a_subscribe_that_fails_leaves_no_session() -> None:
    async with EventBroadcaster(backend=_FailingAfterAttach()) as broadcaster:
        with pytest.raises(BackendUnavailableError, match="after register"):
            async with broadcaster.subscribe("room"):
                pass
        assert sessions(broadcaster) == 0
        assert broadcaster.stats()["totalSubscribers"] == 0


async def test_a_refused_publish_leaves_no_session() -> None:
    async with EventBroadcaster(BroadcasterConfig(max_event_bytes=64)) as broadcaster:
        with pytest.raises(ValueError, match="max_event_bytes=64"):
            await broadcaster.publish("room", "x" * 100)
        with pytest.raises(ValueError, match="must not contain CR, LF or NUL"):
            await broadcaster.publish("room", "x", event="bad\nname")
        assert sessions(broadcaster) == 0


async def test_expiry_of_the_last_event_releases_a_session_without_subscribers() -> None:
    clock = FakeClock()
    config = BroadcasterConfig(event_ttl=10.0)
    async with EventBroadcaster(config, clock=clock) as broadcaster:
        await broadcaster.publish("alone", "x")
        await broadcaster.publish("watched", "x")
        async with broadcaster.subscribe("watched"):
            clock.advance(10)
            await broadcaster.cleanup()
            # "watched" retains nothing now but has a subscriber: it keeps its slot.
            assert sessions(broadcaster) == 1
            assert await broadcaster.history("alone") == []
        assert sessions(broadcaster) == 0  # and releases it when the subscriber leaves


async def test_history_byte_eviction_releases_the_sessions_it_empties() -> None:
    config = BroadcasterConfig(max_event_bytes=100, max_history_bytes=300)
    async with EventBroadcaster(config) as broadcaster:
        async with broadcaster.subscribe("watched"):
            await broadcaster.publish("watched", "w" * 70)
            await broadcaster.publish("a", "a" * 70)
            await broadcaster.publish("b", "b" * 70)
            assert sessions(broadcaster) == 3
            # Two more evict the three oldest events: "a" and "watched" are empty,
            # and only "a" (no subscriber) lets go of its slot.
            await broadcaster.publish("c", "c" * 70)
            await broadcaster.publish("c", "c" * 70)
            assert await broadcaster.history("watched") == []
            assert await broadcaster.history("a") == []
            assert sessions(broadcaster) == 3  # watched, b, c
        assert sessions(broadcaster) == 2  # b, c


async def test_without_history_a_session_holds_a_slot_only_while_someone_listens() -> None:
    config = BroadcasterConfig(max_history_per_session=0, max_sessions=2)
    async with EventBroadcaster(config) as broadcaster:
        for room in rooms(50, seed=5):
            await broadcaster.publish(room, "x")  # delivered to nobody, kept nowhere
        assert sessions(broadcaster) == 0
        async with broadcaster.subscribe("a") as sub:
            live = await broadcaster.publish("a", "1")
            assert await sub.receive() is live
            assert sessions(broadcaster) == 1


# -- ids and gaps after a release -----------------------------------------------------------------


async def test_a_released_session_keeps_its_numbering_so_only_real_losses_are_gaps() -> None:
    clock = FakeClock()
    config = BroadcasterConfig(event_ttl=10.0, session_ttl=100.0)
    async with EventBroadcaster(config, clock=clock) as broadcaster:
        events = [await broadcaster.publish("room", str(i)) for i in range(3)]
        clock.advance(10)
        await broadcaster.cleanup()
        assert sessions(broadcaster) == 0
        assert backend_stats(broadcaster)["releasedSessionsRemembered"] == 1
        # The latest id missed nothing: no gap. An older one missed expired events.
        async with broadcaster.subscribe("room", last_event_id=events[-1].id) as sub:
            assert not sub.gap
            assert sub.drain_nowait() == []
        async with broadcaster.subscribe("room", last_event_id=events[0].id) as sub:
            assert sub.gap
        # Coming back continues the numbering in the same epoch.
        following = await broadcaster.publish("room", "3")
        assert following.id.rpartition("-")[0] == events[0].id.rpartition("-")[0]
        assert following.id.endswith("-4")
        async with broadcaster.subscribe("room", last_event_id=events[-1].id) as sub:
            assert not sub.gap
            assert sub.drain_nowait() == [following]


async def test_a_session_released_with_no_event_ever_published_resumes_from_its_position() -> None:
    async with EventBroadcaster() as broadcaster:
        other = await broadcaster.publish("other", "x")
        async with broadcaster.subscribe("room") as first:
            position = first.position
        assert position is not None
        assert position.endswith("-0")
        assert sessions(broadcaster) == 1  # "other" only: "room" was released
        assert backend_stats(broadcaster)["releasedSessionsRemembered"] == 1
        # An id of another session is no position of this one: a gap.
        async with broadcaster.subscribe("room", last_event_id=other.id) as sub:
            assert sub.gap
        # Its own empty position: nothing was missed, and what came since replays.
        event = await broadcaster.publish("room", "while away")
        async with broadcaster.subscribe("room", last_event_id=position) as sub:
            assert not sub.gap
            assert await sub.receive() == event
        async with broadcaster.subscribe("room") as sub:
            assert not sub.gap


async def test_no_history_keeps_a_latest_id_free_of_gaps_across_releases() -> None:
    config = BroadcasterConfig(max_history_per_session=0)
    async with EventBroadcaster(config) as broadcaster:
        async with broadcaster.subscribe("a") as sub:
            seen = await broadcaster.publish("a", "1")
            assert await sub.receive() is seen
        assert sessions(broadcaster) == 0
        async with broadcaster.subscribe("a", last_event_id=seen.id) as sub:
            assert not sub.gap  # nothing was published while away
        await broadcaster.publish("a", "2")  # nobody listens: lost
        async with broadcaster.subscribe("a", last_event_id=seen.id) as sub:
            assert sub.gap


async def test_released_sessions_are_forgotten_after_session_ttl_and_when_closed() -> None:
    clock = FakeClock()
    config = BroadcasterConfig(event_ttl=10.0, session_ttl=100.0)
    async with EventBroadcaster(config, clock=clock) as broadcaster:
        a = await broadcaster.publish("a", "x")
        b = await broadcaster.publish("b", "x")
        clock.advance(10)
        await broadcaster.cleanup()
        assert backend_stats(broadcaster)["releasedSessionsRemembered"] == 2
        # close_session forgets a released session: its ids read as a gap from now on.
        assert await broadcaster.close_session("b") is True
        assert await broadcaster.close_session("b") is False
        async with broadcaster.subscribe("b", last_event_id=b.id) as sub:
            assert sub.gap
        clock.advance(100)
        await broadcaster.cleanup()
        assert backend_stats(broadcaster)["releasedSessionsRemembered"] == 0
        async with broadcaster.subscribe("a", last_event_id=a.id) as sub:
            assert sub.gap  # as for a session expired by session_ttl
        assert broadcaster.stats()["cleanup"]["sessionsExpired"] == 0


async def test_released_sessions_remembered_are_bounded_by_max_sessions() -> None:
    config = BroadcasterConfig(max_history_per_session=0, max_sessions=3)
    async with EventBroadcaster(config) as broadcaster:
        ids = {room: (await broadcaster.publish(room, "x")).id for room in rooms(10, seed=6)}
        assert sessions(broadcaster) == 0
        assert backend_stats(broadcaster)["releasedSessionsRemembered"] == 3
        names = list(ids)
        async with broadcaster.subscribe(names[0], last_event_id=ids[names[0]]) as sub:
            assert sub.gap  # forgotten first: a gap, as after session_ttl
        async with broadcaster.subscribe(names[-1], last_event_id=ids[names[-1]]) as sub:
            assert not sub.gap


async def test_subscription_limits_still_hold_after_releases() -> None:
    config = BroadcasterConfig(max_sessions=1, max_subscribers_per_session=1)
    async with EventBroadcaster(config) as broadcaster:
        for _ in range(3):
            async with broadcaster.subscribe("a") as sub:
                assert isinstance(sub, Subscription)
                with pytest.raises(SessionLimitError):
                    async with broadcaster.subscribe("b"):
                        pass
            async with broadcaster.subscribe("b"):
                pass


async def test_random_operations_keep_only_sessions_that_hold_something() -> None:
    """Every session left holds a subscriber or an event; resumes lose nothing silently."""
    clock = FakeClock()
    config = BroadcasterConfig(
        max_sessions=8,
        max_history_per_session=3,
        max_event_bytes=100,
        max_history_bytes=600,
        event_ttl=10.0,
        session_ttl=50.0,
    )
    backend = MemoryBackend()
    rng = random.Random(7)
    names = [f"r{i}" for i in range(12)]
    async with EventBroadcaster(config, backend=backend, clock=clock) as broadcaster:
        open_subs: list[Subscription] = []
        expected: dict[Subscription, list[Event]] = {}
        resumes = {True: 0, False: 0}  # resumes of a session held or remembered, or not
        last_seen: dict[str, str] = {}  # room -> id of the latest event published to it
        for _ in range(3000):
            action = rng.random()
            room = rng.choice(names)
            try:
                if action < 0.4:
                    event = await broadcaster.publish(room, "x" * rng.randrange(1, 60))
                    last_seen[room] = event.id
                    for sub in open_subs:
                        if sub.session_id == room:
                            expected[sub].append(event)
                elif action < 0.6:
                    sub = broadcaster.subscribe(room)
                    await sub.__aenter__()
                    open_subs.append(sub)
                    expected[sub] = []
                elif action < 0.75 and open_subs:
                    sub = open_subs.pop(rng.randrange(len(open_subs)))
                    # Live delivery is whole across releases and sweeps of other sessions.
                    assert sub.drain_nowait() == expected.pop(sub)
                    await sub.aclose()
                elif action < 0.85 and room in last_seen:
                    # A client that saw the latest event: no gap while the backend holds or
                    # remembers the session (it forgets after session_ttl, or the oldest
                    # first past max_sessions remembered).
                    epoch = last_seen[room].rpartition("-")[0]
                    held = backend._sessions.get(room)
                    remembered = backend._released_ids.get(room)
                    known = (held is not None and held.epoch == epoch) or (
                        remembered is not None and remembered[0] == epoch
                    )
                    async with broadcaster.subscribe(room, last_event_id=last_seen[room]) as sub:
                        assert sub.gap is not known
                        assert sub.drain_nowait() == []
                    resumes[known] += 1
                elif action < 0.95:
                    clock.advance(rng.choice([0.5, 3.0, 11.0]))
                else:
                    await broadcaster.cleanup()
            except SessionLimitError:
                assert len(backend._sessions) == config.max_sessions
            for session_id, session in backend._sessions.items():
                assert session.history or broadcaster.subscriber_count(session_id), session_id
            assert len(backend._released_ids) <= config.max_sessions
        assert resumes[True] > 50
        assert resumes[False] > 5
        assert backend_stats(broadcaster)["sessionsReleased"] > 100
        for sub in open_subs:
            await sub.aclose()
        clock.advance(config.event_ttl)
        await broadcaster.cleanup()
        assert sessions(broadcaster) == 0


# -- the per-client example of docs/configuration.md, on a real uvicorn ---------------------------


def _docs_example() -> dict[str, Any]:
    """Run the code of 'Limits per client' in docs/configuration.md; its globals."""
    text = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text("utf-8")
    section = text.split("## Limits per client", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(code, "docs/configuration.md", "exec"), namespace)
    return namespace


async def _read_until(stream: RawStream, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        chunk = await stream.read_chunk()
        assert chunk, f"the stream ended before {marker!r}: {seen!r}"
        seen += chunk
    return seen


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_per_client_example_refuses_one_client_past_its_limit_only(
    anyio_backend: str,
) -> None:
    example = _docs_example()
    app, broadcaster = example["app"], example["broadcaster"]
    limit = example["MAX_STREAMS_PER_CLIENT"]
    guard = app.routes[0].endpoint
    assert limit == 3
    alice = {"X-Client": "alice"}
    async with run_uvicorn(app) as running, httpx.AsyncClient(timeout=10) as http:
        url = running.base_url
        # Nobody listens yet: a POST does not create the room.
        refused = await http.post(f"{url}/publish/a0", content=b"hi")
        assert (refused.status_code, refused.text) == (404, "no one listens to this room")
        assert broadcaster.stats()["totalSessions"] == 0
        async with AsyncExitStack() as streams:
            mine = [
                await streams.enter_async_context(open_raw(url, f"/events/a{i}", alice))
                for i in range(limit)
            ]
            assert [s.status for s in mine] == [200] * limit
            async with open_raw(url, "/events/a9", alice) as over:
                assert over.status == 429
                assert await over.read_body() == b"too many open streams"
            async with open_raw(url, "/events/b0", {"X-Client": "bob"}) as bob:
                assert bob.status == 200  # another client is not affected
                assert broadcaster.stats()["totalSessions"] == limit + 1
            # A stream of alice's ends: she may open another one.
            await mine.pop().aclose()
            await wait_for(lambda: guard.open["alice"] == limit - 1, 10, "the stream to end")
            replacement = await streams.enter_async_context(open_raw(url, "/events/a8", alice))
            assert replacement.status == 200
            # A room someone listens to takes events.
            published = await http.post(f"{url}/publish/a0", content="héllo".encode())
            assert published.status_code == 204
            assert b"data: h\xc3\xa9llo\n" in await _read_until(mine[0], b"h\xc3\xa9llo")
            bad = await http.post(f"{url}/publish/a0", content=b"\xff")
            assert bad.status_code == 400
            assert "not valid UTF-8" in bad.text
        await wait_for(lambda: not guard.open, 10, "every stream to end")
        # Every room was left, none retains an event but a0: only a0 holds a slot.
        await wait_for(
            lambda: broadcaster.stats()["totalSessions"] == 1, 10, "the rooms to be released"
        )


async def test_a_refused_publish_to_a_released_session_keeps_its_numbering() -> None:
    config = BroadcasterConfig(max_history_per_session=0, max_event_bytes=64)
    async with EventBroadcaster(config) as broadcaster:
        seen = await broadcaster.publish("room", "x")
        with pytest.raises(ValueError, match="max_event_bytes=64"):
            await broadcaster.publish("room", "x" * 100)
        assert sessions(broadcaster) == 0
        async with broadcaster.subscribe("room", last_event_id=seen.id) as sub:
            assert not sub.gap
        following = await broadcaster.publish("room", "y")
        assert following.id == seen.id.rpartition("-")[0] + "-2"
