"""Resumable runs (#13) on the memory backend: start, states, end marker, resume, cancel,
retention, caps, stats, shutdown."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from sse_broadcaster import (
    RUN_END_EVENT,
    BroadcasterClosedError,
    BroadcasterConfig,
    Event,
    EventBroadcaster,
    RunActiveError,
    RunInfo,
    RunLimitError,
    RunState,
    SessionLimitError,
)
from sse_broadcaster.backends import MemoryBackend, MemoryRunStore, RunStore, RunSweep

from .support.clock import FakeClock

pytestmark = pytest.mark.anyio


async def tokens(n: int, *, pause: bool = True) -> AsyncIterator[str]:
    for i in range(n):
        yield f"t{i}"
        if pause:
            await anyio.lowlevel.checkpoint()


async def read_run(
    broadcaster: EventBroadcaster, session_id: str, last_event_id: str | None = None
) -> list[Event]:
    with anyio.fail_after(30):
        async with broadcaster.subscribe(
            session_id, last_event_id=last_event_id, until_end=True
        ) as sub:
            return [event async for event in sub]


def end_data(event: Event) -> dict[str, Any]:
    assert event.event == RUN_END_EVENT
    data = json.loads(event.data)
    assert isinstance(data, dict)
    return data


async def wait_ended(broadcaster: EventBroadcaster, session_id: str) -> RunInfo:
    with anyio.fail_after(30):
        while True:
            info = await broadcaster.run_info(session_id)
            assert info is not None
            if info.ended:
                return info
            await anyio.sleep(0.001)


async def test_start_returns_at_once_and_the_run_publishes_in_order() -> None:
    gate = anyio.Event()

    async def gen() -> AsyncIterator[dict[str, int]]:
        await gate.wait()
        for i in range(3):
            yield {"n": i}

    async with EventBroadcaster() as broadcaster:
        with anyio.fail_after(5):
            info = await broadcaster.start_run("s", gen(), event="token")
        # The generator has not produced anything yet: start_run did not wait for it.
        assert info.state is RunState.RUNNING
        assert info.session_id == "s"
        assert info.events == 0
        assert info.end_event_id is None
        assert (await broadcaster.run_info("s")) is not None
        gate.set()
        events = await read_run(broadcaster, "s")
        assert [e.event for e in events] == ["token"] * 3 + ["end"]
        assert [json.loads(e.data) for e in events[:3]] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert end_data(events[-1]) == {"state": "finished", "runId": info.run_id, "events": 3}
        done = await wait_ended(broadcaster, "s")
        assert done.state is RunState.FINISHED
        assert done.first_event_id == events[0].id
        assert done.end_event_id == events[-1].id
        assert done.events == 3
        assert done.bytes == sum(e.size for e in events[:3])
        assert done.error is None
        assert done.retained
        assert done.ended_at is not None
        assert done.ended_at >= done.started_at


async def test_items_str_bytes_json_and_event_dicts() -> None:
    async def gen() -> AsyncIterator[Any]:
        yield "text"
        yield b"bytes"
        yield [1, 2]
        yield {"data": "named", "event": "custom", "retry": 100}
        yield {"data": {"nested": True}}
        yield {"text": "a dict that is not an event"}

    async with EventBroadcaster() as broadcaster:
        await broadcaster.start_run("s", gen)  # a factory is accepted too
        events = await read_run(broadcaster, "s")
    assert [(e.event, e.data, e.retry) for e in events[:-1]] == [
        (None, "text", None),
        (None, "bytes", None),
        (None, "[1,2]", None),
        ("custom", "named", 100),
        (None, '{"nested":true}', None),
        (None, '{"text":"a dict that is not an event"}', None),
    ]
    assert end_data(events[-1])["state"] == "finished"


async def test_resume_from_any_id_of_a_long_run_gets_the_exact_rest() -> None:
    # 20,000 small tokens: far more than max_history_per_session (500), all resumable.
    n = 20_000
    async with EventBroadcaster() as broadcaster:
        await broadcaster.start_run("s", tokens(n, pause=False), event="token")
        full = await read_run(broadcaster, "s")
        assert len(full) == n + 1
        assert [e.data for e in full[:-1]] == [f"t{i}" for i in range(n)]
        for cut in (0, 1, 499, 501, 12_345, n - 1):
            rest = await read_run(broadcaster, "s", last_event_id=full[cut].id)
            assert [e.id for e in rest] == [e.id for e in full[cut + 1 :]], cut
        # From the end marker: nothing more, and the subscription ends at once.
        assert await read_run(broadcaster, "s", last_event_id=full[-1].id) == []
        assert broadcaster.stats()["totalEvents"] == n + 1


async def test_a_reader_resuming_mid_run_gets_the_rest_then_live() -> None:
    step = anyio.Event()
    release = anyio.Event()

    async def gen() -> AsyncIterator[str]:
        for i in range(5):
            yield str(i)
        step.set()
        await release.wait()
        for i in range(5, 10):
            yield str(i)

    async with EventBroadcaster() as broadcaster:
        await broadcaster.start_run("s", gen())
        await step.wait()
        first = await broadcaster.history("s")
        assert [e.data for e in first] == ["0", "1", "2", "3", "4"]
        async with broadcaster.subscribe("s", last_event_id=first[1].id, until_end=True) as sub:
            assert not sub.gap
            release.set()
            with anyio.fail_after(10):
                got = [e.data async for e in sub]
        assert got == ["2", "3", "4", "5", "6", "7", "8", "9", got[-1]]
        assert json.loads(got[-1])["state"] == "finished"


async def test_two_readers_see_the_same_run() -> None:
    release = anyio.Event()

    async def gen() -> AsyncIterator[str]:
        yield "early"  # before either reader: both replay it from the run's start
        await release.wait()
        async for token in tokens(50):
            yield token

    async with EventBroadcaster() as broadcaster:
        await broadcaster.start_run("s", gen())
        results: list[list[str]] = []

        async def reader() -> None:
            results.append([e.id for e in await read_run(broadcaster, "s")])

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            tg.start_soon(reader)
            await anyio.sleep(0.01)
            release.set()
    assert len(results) == 2
    assert results[0] == results[1]
    assert len(results[0]) == 52


async def test_a_reader_without_until_end_keeps_following_the_session() -> None:
    async with EventBroadcaster() as broadcaster, broadcaster.subscribe("s") as sub:
        await broadcaster.start_run("s", tokens(2))
        with anyio.fail_after(10):
            got = [await sub.receive() for _ in range(3)]
        assert got[-1].event == RUN_END_EVENT
        await broadcaster.publish("s", "after")
        assert (await sub.receive()).data == "after"


async def test_receive_batch_stops_at_the_end_marker() -> None:
    async with EventBroadcaster() as broadcaster:
        await broadcaster.start_run("s", tokens(3, pause=False))
        await wait_ended(broadcaster, "s")
        await broadcaster.publish("s", "not part of the run")
        async with broadcaster.subscribe("s", until_end=True) as sub:
            batch = await sub.receive_batch()
            assert [e.data for e in batch[:-1]] == ["t0", "t1", "t2"]
            assert batch[-1].event == RUN_END_EVENT
            with pytest.raises(anyio.EndOfStream):
                await sub.receive_batch()
            assert sub.closed


async def test_a_failing_generator_ends_failed_without_its_message() -> None:
    async def gen() -> AsyncIterator[str]:
        yield "one"
        raise RuntimeError("secret: db password in this message")

    async with EventBroadcaster() as broadcaster:
        await broadcaster.start_run("s", gen())
        events = await read_run(broadcaster, "s")
        info = await wait_ended(broadcaster, "s")
    assert [e.data for e in events[:-1]] == ["one"]
    data = end_data(events[-1])
    assert data == {
        "state": "failed",
        "runId": info.run_id,
        "events": 1,
        "error": "the run raised RuntimeError",
    }
    assert info.state is RunState.FAILED
    assert info.error == "RuntimeError: secret: db password in this message"


async def test_a_failure_is_logged_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def gen() -> AsyncIterator[str]:
        raise KeyError("boom")
        yield ""  # pragma: no cover

    with caplog.at_level(logging.ERROR, logger="sse_broadcaster"):
        async with EventBroadcaster() as broadcaster:
            await broadcaster.start_run("s", gen())
            await wait_ended(broadcaster, "s")
    records = [r for r in caplog.records if "run of session 's' failed" in r.getMessage()]
    assert len(records) == 1
    assert records[0].exc_info is not None


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        pytest.param(
            {"data": "x", "event": "end"},
            "item 1 refused: event 'end' is reserved for the end of a run",
            id="reserved-name",
        ),
        pytest.param(
            object(), "item 1 refused: data must be str, bytes or JSON-serialisable", id="not-json"
        ),
        pytest.param(
            {"data": "x", "event": "a\nb"}, "item 1 refused: event must not contain", id="bad-name"
        ),
        pytest.param("x" * 70_000, "item 1 refused: event of ", id="too-large"),
    ],
)
async def test_a_refused_item_fails_the_run_with_the_reason(item: Any, reason: str) -> None:
    async def gen() -> AsyncIterator[Any]:
        yield item
        yield "never"

    async with EventBroadcaster() as broadcaster:
        await broadcaster.start_run("s", gen())
        events = await read_run(broadcaster, "s")
    assert len(events) == 1
    data = end_data(events[0])
    assert data["state"] == "failed"
    assert data["error"].startswith(reason)


async def test_cancel_from_another_task_runs_the_generator_finally() -> None:
    cleaned = anyio.Event()
    started = anyio.Event()

    async def gen() -> AsyncIterator[str]:
        try:
            yield "one"
            started.set()
            await anyio.sleep_forever()
            yield "never"  # pragma: no cover
        finally:
            cleaned.set()

    async with EventBroadcaster() as broadcaster:
        info = await broadcaster.start_run("s", gen())
        await started.wait()
        results: list[bool] = []

        async def canceller() -> None:
            results.append(await broadcaster.cancel_run("s"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(canceller)
        assert results == [True]
        assert cleaned.is_set()
        # cancel_run returned after the end marker was published.
        done = await broadcaster.run_info("s")
        assert done is not None
        assert done.state is RunState.CANCELLED
        events = await read_run(broadcaster, "s")
        assert [e.data for e in events[:-1]] == ["one"]
        assert end_data(events[-1]) == {"state": "cancelled", "runId": info.run_id, "events": 1}
        assert not await broadcaster.cancel_run("s")  # nothing runs any more
        assert not await broadcaster.cancel_run("never-had-a-run")


async def test_a_second_start_is_refused_while_one_runs_then_allowed() -> None:
    release = anyio.Event()

    async def gen() -> AsyncIterator[str]:
        yield "a"
        await release.wait()

    async with EventBroadcaster() as broadcaster:
        first = await broadcaster.start_run("s", gen())
        with pytest.raises(RunActiveError, match="session 's' already has a running run"):
            await broadcaster.start_run("s", tokens(1))
        await broadcaster.start_run("other", tokens(1))  # another session is fine
        release.set()
        first_events = await read_run(broadcaster, "s")
        second = await broadcaster.start_run("s", tokens(2))
        assert second.run_id != first.run_id
        # The earlier run's transcript is gone: resuming inside it is a gap, then the
        # new run from its first event.
        async with broadcaster.subscribe(
            "s", last_event_id=first_events[0].id, until_end=True
        ) as sub:
            assert sub.gap
            with anyio.fail_after(10):
                got = [e async for e in sub]
        assert [e.data for e in got[:-1]] == ["t0", "t1"]
        assert end_data(got[-1])["runId"] == second.run_id


async def test_bad_arguments() -> None:
    async with EventBroadcaster() as broadcaster:
        with pytest.raises(TypeError, match="a run needs an async iterable"):
            await broadcaster.start_run("s", [1, 2])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="event 'end' is reserved"):
            await broadcaster.start_run("s", tokens(1), event="end")
        with pytest.raises(ValueError, match="event must not contain"):
            await broadcaster.start_run("s", tokens(1), event="a\nb")
        with pytest.raises(ValueError, match="session_id"):
            await broadcaster.start_run("", tokens(1))
        assert await broadcaster.run_info("s") is None
    with pytest.raises(BroadcasterClosedError):
        await broadcaster.start_run("s", tokens(1))
    with pytest.raises(BroadcasterClosedError):
        await EventBroadcaster().start_run("s", tokens(1))


async def test_the_transcript_outlives_the_session_limits_until_run_ttl() -> None:
    clock = FakeClock()
    config = BroadcasterConfig(
        max_history_per_session=5,
        event_ttl=10.0,
        session_ttl=20.0,
        max_history_bytes=65_536,
        run_ttl=100.0,
    )
    async with EventBroadcaster(config, clock=clock) as broadcaster:
        await broadcaster.publish("s", "before")  # ordinary history of the session
        await broadcaster.start_run("s", tokens(50))
        full = await read_run(broadcaster, "s")
        assert len(full) == 51
        # Other sessions' traffic past max_history_bytes evicts ordinary history only.
        for _ in range(40):
            await broadcaster.publish("noise", "x" * 2000)
        clock.advance(50)  # past event_ttl and session_ttl, within run_ttl
        await broadcaster.cleanup()
        assert [e.id for e in await read_run(broadcaster, "s", full[0].id)] == [
            e.id for e in full[1:]
        ]
        info = await broadcaster.run_info("s")
        assert info is not None
        assert info.retained
        assert broadcaster.stats()["runs"]["retained"] == 1

        clock.advance(51)  # run_ttl after the end: swept
        await broadcaster.cleanup()
        swept = await broadcaster.run_info("s")
        assert swept is not None
        assert not swept.retained
        assert swept.state is RunState.FINISHED
        assert swept.end_event_id == full[-1].id
        assert await broadcaster.history("s") == []
        stats = broadcaster.stats()
        assert stats["runs"]["retained"] == 0
        assert stats["runs"]["expired"] == 1
        assert stats["runs"]["transcriptBytes"] == 0
        # An id inside the expired run: a gap, never a second run.
        async with broadcaster.subscribe("s", last_event_id=full[3].id, until_end=True) as sub:
            assert sub.gap
            assert sub.queued == 0
        # The id of its end marker: ended at once.
        assert await read_run(broadcaster, "s", full[-1].id) == []
        # session_ttl later, the swept run is forgotten too.
        clock.advance(21)
        await broadcaster.cleanup()
        assert await broadcaster.run_info("s") is None


async def test_a_retained_run_holds_its_session_slot() -> None:
    clock = FakeClock()
    config = BroadcasterConfig(max_sessions=2, session_ttl=5.0, run_ttl=10.0)
    async with EventBroadcaster(config, clock=clock) as broadcaster:
        await broadcaster.start_run("a", tokens(2))
        await read_run(broadcaster, "a")
        await broadcaster.publish("b", "x")
        clock.advance(6)
        await broadcaster.cleanup()  # b is idle past session_ttl; a is retained
        assert broadcaster.stats()["totalSessions"] == 1
        await broadcaster.publish("c", "x")
        with pytest.raises(SessionLimitError):
            await broadcaster.start_run("d", tokens(1))
        with pytest.raises(SessionLimitError):
            await broadcaster.publish("d", "x")
        clock.advance(5)
        await broadcaster.cleanup()  # a's transcript is swept: its slot is free
        await broadcaster.publish("d", "x")


async def test_the_event_cap_fails_the_run() -> None:
    config = BroadcasterConfig(max_run_events=10)
    async with EventBroadcaster(config) as broadcaster:
        await broadcaster.start_run("s", tokens(100))
        events = await read_run(broadcaster, "s")
        info = await wait_ended(broadcaster, "s")
    assert len(events) == 10  # nine items and the end marker: max_run_events in all
    data = end_data(events[-1])
    assert data["state"] == "failed"
    assert data["error"] == (
        "the run's transcript reached its cap (max_run_events=10, max_run_bytes=8388608)"
    )
    assert info.state is RunState.FAILED
    assert info.events == 9


async def test_the_byte_cap_fails_the_run() -> None:
    config = BroadcasterConfig(max_run_bytes=4096)

    async def gen() -> AsyncIterator[str]:
        while True:
            yield "x" * 100

    async with EventBroadcaster(config) as broadcaster:
        await broadcaster.start_run("s", gen())
        events = await read_run(broadcaster, "s")
        info = await wait_ended(broadcaster, "s")
        assert sum(e.size for e in events) <= 4096
        assert end_data(events[-1])["state"] == "failed"
        assert "max_run_bytes=4096" in end_data(events[-1])["error"]
        assert info.bytes == sum(e.size for e in events[:-1])
        assert broadcaster.stats()["runs"]["transcriptBytes"] == sum(e.size for e in events)


async def test_max_runs_bounds_running_runs_and_transcripts() -> None:
    config = BroadcasterConfig(max_runs=2)
    release = {"a": anyio.Event(), "b": anyio.Event()}

    async def waiting(name: str) -> AsyncIterator[str]:
        yield "w"
        await release[name].wait()

    async with EventBroadcaster(config) as broadcaster:
        await broadcaster.start_run("a", waiting("a"))
        await broadcaster.start_run("b", waiting("b"))
        with pytest.raises(RunLimitError, match="max_runs=2 runs are running"):
            await broadcaster.start_run("c", tokens(1))
        release["a"].set()
        await wait_ended(broadcaster, "a")
        release["b"].set()
        await wait_ended(broadcaster, "b")
        # Both ended and retained: a third run takes the oldest ended transcript's place.
        await broadcaster.start_run("c", tokens(1))
        await read_run(broadcaster, "c")
        a = await broadcaster.run_info("a")
        b = await broadcaster.run_info("b")
        assert a is not None
        assert b is not None
        assert not a.retained
        assert b.retained
        assert broadcaster.stats()["runs"]["retained"] == 2


async def test_stats_and_prometheus_count_runs() -> None:
    release = anyio.Event()

    async def waiting() -> AsyncIterator[str]:
        yield "w"
        await release.wait()

    async def failing() -> AsyncIterator[str]:
        raise ValueError("no")
        yield ""  # pragma: no cover

    async with EventBroadcaster() as broadcaster:
        await broadcaster.start_run("ok", tokens(3))
        await broadcaster.start_run("bad", failing())
        await broadcaster.start_run("stop", waiting())
        await broadcaster.start_run("live", waiting())
        await wait_ended(broadcaster, "ok")
        await wait_ended(broadcaster, "bad")
        assert await broadcaster.cancel_run("stop")
        runs = broadcaster.stats()["runs"]
        assert {k: v for k, v in runs.items() if k != "transcriptBytes"} == {
            "running": 1,
            "retained": 3,
            "started": 4,
            "finished": 1,
            "failed": 1,
            "cancelled": 1,
            "expired": 0,
        }
        assert runs["transcriptBytes"] > 0
        text = broadcaster._prometheus_text()
        for line in [
            "sse_broadcaster_runs_running 1",
            "sse_broadcaster_runs_retained 3",
            "sse_broadcaster_runs_started_total 4",
            "sse_broadcaster_runs_finished_total 1",
            "sse_broadcaster_runs_failed_total 1",
            "sse_broadcaster_runs_cancelled_total 1",
            "sse_broadcaster_runs_expired_total 0",
            f"sse_broadcaster_run_transcript_bytes {runs['transcriptBytes']}",
        ]:
            assert f"\n{line}\n" in text
        release.set()


async def test_aclose_cancels_running_runs_and_publishes_their_end() -> None:
    cleaned = anyio.Event()
    started = anyio.Event()

    async def gen() -> AsyncIterator[str]:
        try:
            yield "one"
            started.set()
            await anyio.sleep_forever()
            yield "never"  # pragma: no cover
        finally:
            cleaned.set()

    seen: list[Event] = []
    with anyio.fail_after(10):
        async with EventBroadcaster() as broadcaster:
            await broadcaster.start_run("s", gen())
            async with broadcaster.subscribe("s", until_end=True) as sub:
                await started.wait()
                await broadcaster.aclose()
                seen = [e async for e in sub]
    assert cleaned.is_set()
    assert [e.data for e in seen[:-1]] == ["one"]
    assert end_data(seen[-1])["state"] == "cancelled"
    assert broadcaster.stats()["runs"]["cancelled"] == 1


async def test_leaving_the_broadcaster_with_a_running_run_does_not_hang() -> None:
    async def forever() -> AsyncIterator[str]:
        while True:
            yield "x"
            await anyio.sleep(0.01)

    with anyio.fail_after(10):
        async with EventBroadcaster() as broadcaster:
            await broadcaster.start_run("s", forever())
            await anyio.sleep(0.05)
    assert broadcaster.stats()["runs"]["running"] == 0


async def test_a_generator_that_never_awaits_can_be_cancelled() -> None:
    async def busy() -> AsyncIterator[int]:
        i = 0
        while True:
            i += 1
            yield i

    async with EventBroadcaster(BroadcasterConfig(max_run_events=10_000_000)) as broadcaster:
        await broadcaster.start_run("s", busy())
        await anyio.sleep(0.01)
        with anyio.fail_after(10):
            assert await broadcaster.cancel_run("s")
        info = await broadcaster.run_info("s")
        assert info is not None
        assert info.state is RunState.CANCELLED
        assert info.events > 0


async def test_close_session_cancels_its_run() -> None:
    started = anyio.Event()

    async def gen() -> AsyncIterator[str]:
        yield "one"
        started.set()
        await anyio.sleep_forever()

    async with EventBroadcaster() as broadcaster:
        await broadcaster.start_run("s", gen())
        await started.wait()
        with anyio.fail_after(10):
            assert await broadcaster.close_session("s")
        assert await broadcaster.run_info("s") is None
        assert await broadcaster.history("s") == []
        assert broadcaster.stats()["runs"]["running"] == 0
        await broadcaster.start_run("s", tokens(1))  # a new run may start


async def test_a_reader_joining_an_ended_run_reads_it_from_the_start() -> None:
    async with EventBroadcaster() as broadcaster:
        await broadcaster.publish("s", "before the run")
        await broadcaster.start_run("s", tokens(3))
        await wait_ended(broadcaster, "s")
        events = await read_run(broadcaster, "s")
        assert [e.data for e in events[:-1]] == ["t0", "t1", "t2"]
        info = await broadcaster.run_info("s")
        assert info is not None
        assert info.replay_from is not None
        assert info.is_end(events[-1].id)
        assert not info.is_end(events[0].id)
        assert not info.is_end(None)


class BeatingStore(MemoryRunStore):
    """The memory store with the hooks a shared store uses: heartbeats and dead producers.

    It stands for a Redis store in the seam's own test: `heartbeat` records the
    beats, and `sweep` reports as dead the runs named in `dead_sessions`, as a
    store that saw their heartbeat key expire would.
    """

    def __init__(self, backend: MemoryBackend, config: BroadcasterConfig, clock: Any) -> None:
        super().__init__(backend, config, clock)
        self.beats: list[str] = []
        self.dead_sessions: set[str] = set()

    @property
    def heartbeat_interval(self) -> float | None:
        return 0.01

    async def heartbeat(self, info: RunInfo) -> None:
        self.beats.append(info.run_id)

    async def sweep(self) -> RunSweep:
        result = await super().sweep()
        dead = []
        for session_id in sorted(self.dead_sessions):
            info = await self.get(session_id)
            if info is not None and not info.ended:
                dead.append(info)
        self.dead_sessions.clear()
        return RunSweep(result.expired, dead)


class BeatingBackend(MemoryBackend):
    def run_store(self) -> MemoryRunStore:
        if self._run_store is None:
            hub = self._require_hub()
            self._run_store = BeatingStore(self, hub.config, hub.clock)
        return self._run_store


async def test_a_store_with_heartbeats_gets_them_while_the_run_lives() -> None:
    release = anyio.Event()

    async def waiting() -> AsyncIterator[str]:
        yield "w"
        await release.wait()

    backend = BeatingBackend()
    async with EventBroadcaster(backend=backend) as broadcaster:
        store = backend.run_store()
        assert isinstance(store, BeatingStore)
        assert isinstance(store, RunStore)
        info = await broadcaster.start_run("s", waiting())
        with anyio.fail_after(10):
            while len(store.beats) < 3:
                await anyio.sleep(0.01)
        release.set()
        await wait_ended(broadcaster, "s")
        await anyio.sleep(0.05)
        beats = len(store.beats)
        await anyio.sleep(0.05)
        assert len(store.beats) == beats  # no beat after the end
        assert set(store.beats) == {info.run_id}


async def test_a_run_whose_producer_died_ends_failed_for_its_readers() -> None:
    backend = BeatingBackend()
    async with EventBroadcaster(backend=backend) as broadcaster:
        store = backend.run_store()
        assert isinstance(store, BeatingStore)
        # A run claimed by a producer elsewhere (another process), which then dies.
        await store.claim("s", "elsewhere", broadcaster.clock())
        await broadcaster.publish("s", "partial")
        async with broadcaster.subscribe("s", until_end=True) as sub:
            store.dead_sessions.add("s")
            await broadcaster.cleanup()
            with anyio.fail_after(10):
                events = [e async for e in sub]
        assert [e.data for e in events[:-1]] == ["partial"]
        assert end_data(events[-1]) == {
            "state": "failed",
            "runId": "elsewhere",
            "events": 0,
            "error": "the run's producer stopped",
        }
        info = await broadcaster.run_info("s")
        assert info is not None
        assert info.state is RunState.FAILED
        assert info.end_event_id == events[-1].id


async def test_a_run_stopped_at_a_yield_closes_its_generator() -> None:
    # The cap stops the run while the generator is suspended at its yield: the run
    # closes it, so its finally runs once, before the end marker is published.
    order: list[str] = []

    async def gen() -> AsyncIterator[str]:
        try:
            while True:
                yield "x"
        finally:
            order.append("finally")

    broadcaster = EventBroadcaster(BroadcasterConfig(max_run_events=3))
    async with broadcaster, broadcaster.subscribe("s", until_end=True) as sub:
        await broadcaster.start_run("s", gen())
        with anyio.fail_after(10):
            async for event in sub:
                if event.event == RUN_END_EVENT:
                    order.append("end")
    assert order == ["finally", "end"]
